// moe_base_assignment: the CUDA implementation (kernel in csrc/cuda/moe_base_assignment.cu; in the
// emulator build, torch.ops.fastlm_emu.moe_base_assignment on CPU tensors). The one host-to-device
// transfer is a custom capacity list (host values, staged through pinned memory, non-blocking);
// the default split is computed on the device. Nothing is read back: non-finite scores and an
// exceeded round cap come back as the invalid result (ids -1, prices NaN).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "fastlm/moe.h"
#include "gpu_binding.h"
#include "moe_args.h"

namespace fastlm::bind {
namespace {

std::tuple<at::Tensor, at::Tensor> moe_base_assignment_cuda_impl(const at::Tensor& scores, at::IntArrayRef capacity,
                                                                 double eps, int64_t max_rounds) {
  constexpr const char* op = "moe_base_assignment";
  BaseAssignmentCall call = base_assignment_call(scores, capacity, eps, max_rounds, kGpu);
  BaseAssignmentArgs& a = call.args;
  const std::vector<int64_t>& cap = call.capacity;
  TORCH_CHECK_VALUE(a.experts <= kBaseMaxExpertsCuda, op, ": the CUDA kernel takes up to ", kBaseMaxExpertsCuda,
                    " experts, got scores of shape ", scores.sizes());
  const GpuGuard guard(scores.device());
  const at::TensorOptions on = scores.options();
  at::Tensor device_capacity;
  if (call.custom) {
#ifdef FASTLM_EMU
    device_capacity = at::empty({a.experts}, on.dtype(at::kLong));
    std::copy(cap.begin(), cap.end(), device_capacity.data_ptr<int64_t>());
#else
    at::Tensor staged = at::empty({a.experts}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
    std::copy(cap.begin(), cap.end(), staged.data_ptr<int64_t>());
    device_capacity = staged.to(scores.device(), /*non_blocking=*/true);
#endif
    a.capacity = device_capacity.data_ptr<int64_t>();
  }
  at::Tensor ids = at::empty({a.tokens}, on.dtype(at::kInt));
  at::Tensor prices = at::empty({a.experts}, on.dtype(at::kDouble));
  at::Tensor ws = at::empty({int64_t(moe_base_assignment_workspace_bytes_cuda(a.tokens, a.experts))},
                            on.dtype(at::kByte));
  check_launch(op, moe_base_assignment_cuda(a, ws.data_ptr(), ids.data_ptr<int32_t>(), prices.data_ptr<double>(),
                                            gpu_stream()));
  return {ids, prices.to(scores.scalar_type())};
}

}  // namespace
}  // namespace fastlm::bind

TORCH_LIBRARY_IMPL(FASTLM_GPU_NAMESPACE, FASTLM_GPU_KEY, m) {
  m.impl("moe_base_assignment", &fastlm::bind::moe_base_assignment_cuda_impl);
}
