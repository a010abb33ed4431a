// moe_router: CUDA implementations of moe_router_fwd / moe_router_bwd (kernels in
// csrc/cuda/moe_router.cu). In the emulator build this file also defines the MoE schemas that have
// emulated kernels (router and permutations) in torch.ops.fastlm_emu.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstring>

#include "fastlm/moe.h"
#include "gpu_binding.h"
#include "moe_args.h"
#include "schemas.h"

namespace fastlm::bind {
namespace {

MoeRouterArgs router_args(const char* op, const at::Tensor& logits, int64_t top_k, bool sigmoid, bool normalize,
                          int64_t capacity) {
  const DType dtype = kernel_input_arg(op, "logits", logits, kGpu, /*allow_half=*/true);
  TORCH_CHECK_VALUE(logits.dim() == 2, op, ": logits must be 2-D (T, E), got shape ", logits.sizes());
  const int64_t E = logits.size(1);
  TORCH_CHECK_VALUE(top_k >= 1 && top_k <= E, op, ": top_k must be in [1, E] = [1, ", E, "], got ", top_k);
  TORCH_CHECK_VALUE(E <= kMoeRouterMaxExpertsCuda, op, ": the CUDA router takes up to ", kMoeRouterMaxExpertsCuda,
                    " experts, got logits of shape ", logits.sizes());
  TORCH_CHECK_VALUE(capacity >= -1, op, ": capacity must be -1 (none) or >= 0, got ", capacity);
  TORCH_CHECK_VALUE(logits.size(0) * top_k <= INT32_MAX, op, ": logits shape ", logits.sizes(), " with top_k ",
                    top_k, " is past the int32 expert ids");
  return MoeRouterArgs{dtype, logits.size(0), E, logits.data_ptr(), logits.stride(0), logits.stride(1),
                       top_k, sigmoid,        normalize, capacity};
}

at::Tensor workspace(const at::Tensor& like, size_t bytes) {
  return at::empty({int64_t(bytes)}, like.options().dtype(at::kByte));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_router_fwd_cuda(
    const at::Tensor& logits, int64_t top_k, bool sigmoid, bool normalize, int64_t capacity) {
  constexpr const char* op = "moe_router_fwd";
  const MoeRouterArgs a = router_args(op, logits, top_k, sigmoid, normalize, capacity);
  const GpuGuard guard(logits.device());
  const at::TensorOptions on = logits.options();
  at::Tensor ids = at::empty({a.tokens, top_k}, on.dtype(at::kInt));
  at::Tensor weights = at::empty({a.tokens, top_k}, on.dtype(at::kFloat));
  at::Tensor counts = at::empty({a.experts}, on.dtype(at::kInt));
  at::Tensor aux = at::empty({}, on.dtype(at::kFloat)), z = at::empty({}, on.dtype(at::kFloat));
  at::Tensor ws = workspace(logits, moe_router_workspace_bytes_cuda(a));
  check_launch(op, moe_router_forward_cuda(a, ws.data_ptr(), ids.data_ptr<int32_t>(), weights.data_ptr<float>(),
                                           counts.data_ptr<int32_t>(), aux.data_ptr<float>(), z.data_ptr<float>(),
                                           gpu_stream()));
  return {ids, weights, counts, aux, z};
}

// grad_aux / grad_z: one float each beside the logits, handed to the kernel as an fp32 device
// pointer (never read on the host).
at::Tensor scalar_grad_arg(const char* op, const char* arg, const at::Tensor& g, const at::Tensor& logits) {
  same_device_arg(op, arg, g, "logits", logits);
  TORCH_CHECK_VALUE(g.numel() == 1, op, ": ", arg, " must be a single value (shape ()), got shape ", g.sizes());
  TORCH_CHECK_TYPE(g.is_floating_point(), op, ": ", arg, " must be a float tensor, got ", g.scalar_type());
  return g.to(at::kFloat).reshape({});
}

at::Tensor moe_router_bwd_cuda(const at::Tensor& grad_weights, const at::Tensor& grad_aux, const at::Tensor& grad_z,
                               const at::Tensor& logits, int64_t top_k, bool sigmoid, bool normalize,
                               int64_t capacity) {
  constexpr const char* op = "moe_router_bwd";
  const MoeRouterArgs a = router_args(op, logits, top_k, sigmoid, normalize, capacity);
  same_device_arg(op, "grad_weights", grad_weights, "logits", logits);
  TORCH_CHECK_TYPE(grad_weights.scalar_type() == at::kFloat, op, ": grad_weights must be float32, got ",
                   grad_weights.scalar_type());
  TORCH_CHECK_VALUE(grad_weights.dim() == 2 && grad_weights.size(0) == a.tokens && grad_weights.size(1) == top_k,
                    op, ": grad_weights must have shape (", a.tokens, ", ", top_k, "), got ", grad_weights.sizes());
  const at::Tensor ga = scalar_grad_arg(op, "grad_aux", grad_aux, logits);
  const at::Tensor gz = scalar_grad_arg(op, "grad_z", grad_z, logits);
  const GpuGuard guard(logits.device());
  at::Tensor grad_logits = at::empty({a.tokens, a.experts}, logits.options());
  at::Tensor ws = workspace(logits, moe_router_workspace_bytes_cuda(a));
  check_launch(op, moe_router_backward_cuda(a, ws.data_ptr(), grad_weights.data_ptr<float>(), grad_weights.stride(0),
                                            grad_weights.stride(1), ga.data_ptr<float>(), gz.data_ptr<float>(),
                                            grad_logits.data_ptr(), gpu_stream()));
  return grad_logits;
}

}  // namespace
}  // namespace fastlm::bind

#ifdef FASTLM_EMU
// fastlm._C defines every MoE schema (moe_router.cpp); the emulator module only those it has
// kernels for: the router's and the permutations' (named moe_*).
TORCH_LIBRARY_FRAGMENT(fastlm_emu, m) {
  for (const char* schema : fastlm::bind::kMoeSchemas)
    if (std::strncmp(schema, "moe_", 4) == 0) m.def(schema);
}
#endif

TORCH_LIBRARY_IMPL(FASTLM_GPU_NAMESPACE, FASTLM_GPU_KEY, m) {
  m.impl("moe_router_fwd", &fastlm::bind::moe_router_fwd_cuda);
  m.impl("moe_router_bwd", &fastlm::bind::moe_router_bwd_cuda);
}
