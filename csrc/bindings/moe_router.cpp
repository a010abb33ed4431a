// moe_router: CPU implementations of moe_router_fwd / moe_router_bwd (kernels in
// csrc/cpu/moe_router.cpp), and the definition of every MoE schema (schemas.h's kMoeSchemas).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "cpu_output.h"
#include "fastlm/moe.h"
#include "moe_args.h"
#include "schemas.h"

namespace fastlm::bind {
namespace {

MoeRouterArgs router_args(const char* op, const at::Tensor& logits, int64_t top_k, bool sigmoid, bool normalize,
                          int64_t capacity) {
  const DType dtype = kernel_input_arg(op, "logits", logits, c10::DeviceType::CPU, /*allow_half=*/false);
  TORCH_CHECK_VALUE(logits.dim() == 2, op, ": logits must be 2-D (T, E), got shape ", logits.sizes());
  const int64_t E = logits.size(1);
  TORCH_CHECK_VALUE(top_k >= 1 && top_k <= E, op, ": top_k must be in [1, E] = [1, ", E, "], got ", top_k);
  TORCH_CHECK_VALUE(capacity >= -1, op, ": capacity must be -1 (none) or >= 0, got ", capacity);
  TORCH_CHECK_VALUE(logits.size(0) * top_k <= INT32_MAX && E <= INT32_MAX, op, ": logits shape ", logits.sizes(),
                    " with top_k ", top_k, " is past the int32 expert ids");
  return MoeRouterArgs{dtype,         logits.size(0), E,     logits.data_ptr(), logits.stride(0), logits.stride(1),
                       top_k,         sigmoid,        normalize, capacity};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_router_fwd_cpu(
    const at::Tensor& logits, int64_t top_k, bool sigmoid, bool normalize, int64_t capacity) {
  constexpr const char* op = "moe_router_fwd";
  const MoeRouterArgs a = router_args(op, logits, top_k, sigmoid, normalize, capacity);
  const at::TensorOptions cpu = logits.options();
  at::Tensor ids = empty_output({a.tokens, top_k}, cpu.dtype(at::kInt));
  at::Tensor weights = empty_output({a.tokens, top_k}, cpu.dtype(at::kFloat));
  at::Tensor counts = at::empty({a.experts}, cpu.dtype(at::kInt));
  at::Tensor aux = at::empty({}, cpu.dtype(at::kFloat)), z = at::empty({}, cpu.dtype(at::kFloat));
  moe_router_forward_cpu(a, ids.data_ptr<int32_t>(), weights.data_ptr<float>(), counts.data_ptr<int32_t>(),
                         aux.data_ptr<float>(), z.data_ptr<float>());
  return {ids, weights, counts, aux, z};
}

// grad_aux / grad_z: one float each (0-dim as autograd hands them over; any float dtype).
float scalar_grad_arg(const char* op, const char* arg, const at::Tensor& g) {
  cpu_arg(op, arg, g);
  TORCH_CHECK_VALUE(g.numel() == 1, op, ": ", arg, " must be a single value (shape ()), got shape ", g.sizes());
  TORCH_CHECK_TYPE(g.is_floating_point(), op, ": ", arg, " must be a float tensor, got ", g.scalar_type());
  return g.item<float>();
}

at::Tensor moe_router_bwd_cpu(const at::Tensor& grad_weights, const at::Tensor& grad_aux, const at::Tensor& grad_z,
                              const at::Tensor& logits, int64_t top_k, bool sigmoid, bool normalize,
                              int64_t capacity) {
  constexpr const char* op = "moe_router_bwd";
  const MoeRouterArgs a = router_args(op, logits, top_k, sigmoid, normalize, capacity);
  cpu_arg(op, "grad_weights", grad_weights);
  TORCH_CHECK_TYPE(grad_weights.scalar_type() == at::kFloat, op, ": grad_weights must be float32, got ",
                   grad_weights.scalar_type());
  TORCH_CHECK_VALUE(grad_weights.dim() == 2 && grad_weights.size(0) == a.tokens && grad_weights.size(1) == top_k,
                    op, ": grad_weights must have shape (", a.tokens, ", ", top_k, "), got ", grad_weights.sizes());
  const float ga = scalar_grad_arg(op, "grad_aux", grad_aux), gz = scalar_grad_arg(op, "grad_z", grad_z);
  at::Tensor grad_logits = empty_output({a.tokens, a.experts}, logits.options());
  moe_router_backward_cpu(a, grad_weights.data_ptr<float>(), grad_weights.stride(0), grad_weights.stride(1), ga, gz,
                          grad_logits.data_ptr());
  return grad_logits;
}

}  // namespace
}  // namespace fastlm::bind

TORCH_LIBRARY_FRAGMENT(fastlm, m) {
  for (const char* schema : fastlm::bind::kMoeSchemas) m.def(schema);
}

TORCH_LIBRARY_IMPL(fastlm, CPU, m) {
  m.impl("moe_router_fwd", &fastlm::bind::moe_router_fwd_cpu);
  m.impl("moe_router_bwd", &fastlm::bind::moe_router_bwd_cpu);
}
