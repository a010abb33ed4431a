// moe_base_assignment: the CPU implementation (kernel in csrc/cpu/moe_base_assignment.cpp). The
// schema is one of schemas.h's kMoeSchemas, defined by moe_router.cpp.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "fastlm/moe.h"
#include "moe_args.h"

namespace fastlm::bind {
namespace {

// (expert_ids (T,) int32, prices (E,) in scores' dtype)
std::tuple<at::Tensor, at::Tensor> moe_base_assignment_cpu_impl(const at::Tensor& scores, at::IntArrayRef capacity,
                                                                double eps, int64_t max_rounds) {
  BaseAssignmentCall call = base_assignment_call(scores, capacity, eps, max_rounds, c10::DeviceType::CPU);
  BaseAssignmentArgs& a = call.args;
  if (call.custom) a.capacity = call.capacity.data();
  at::Tensor ids = at::empty({a.tokens}, scores.options().dtype(at::kInt));
  at::Tensor prices = at::empty({a.experts}, scores.options().dtype(at::kDouble));
  moe_base_assignment_cpu(a, ids.data_ptr<int32_t>(), prices.data_ptr<double>());
  return {ids, prices.to(scores.scalar_type())};
}

}  // namespace
}  // namespace fastlm::bind

TORCH_LIBRARY_IMPL(fastlm, CPU, m) { m.impl("moe_base_assignment", &fastlm::bind::moe_base_assignment_cpu_impl); }
