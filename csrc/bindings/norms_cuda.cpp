// layer_norm / rms_norm: CUDA implementations of the ops declared in norms.cpp.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "gpu_binding.h"
#include "norms_common.h"

namespace fastlm::bind {
namespace {

NormOutputs norm_fwd_cuda(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                          const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                          double eps, bool rms) {
  constexpr const char* op = "norm_fwd";
  const GpuGuard guard(x.device());
  NormForwardPlan p = plan_norm_forward(op, x, residual, weight, bias, eps, rms, kGpu);
  if (p.args.rows > 0 && p.args.cols > 0)
    check_launch(op, norm_forward_cuda(p.args, gpu_stream()));
  return p.outputs();
}

NormGrads norm_bwd_cuda(const at::Tensor& grad_y, const std::optional<at::Tensor>& grad_sum, const at::Tensor& h,
                        const std::optional<at::Tensor>& weight, const at::Tensor& mean, const at::Tensor& rstd,
                        bool rms, bool bias_grad) {
  constexpr const char* op = "norm_bwd";
  const GpuGuard guard(h.device());
  NormBackwardPlan p = plan_norm_backward(op, grad_y, grad_sum, h, weight, mean, rstd, rms, bias_grad,
                                          kGpu);
  if (p.args.rows > 0 && p.args.cols > 0) {
    // Per-CTA fp32 partials of grad_weight / grad_bias and per-row sums, every element written by
    // the kernels (no memset); none at all when the plan needs neither.
    at::Tensor ws;
    if (const int64_t floats = norm_backward_cuda_workspace(p.args); floats > 0)
      ws = at::empty({floats}, h.options().dtype(at::kFloat));
    check_launch(op, norm_backward_cuda(p.args, ws.defined() ? ws.data_ptr<float>() : nullptr, gpu_stream()));
  }
  return p.outputs();
}

}  // namespace
}  // namespace fastlm::bind

TORCH_LIBRARY_IMPL(FASTLM_GPU_NAMESPACE, FASTLM_GPU_KEY, m) {
  m.impl("norm_fwd", &fastlm::bind::norm_fwd_cuda);
  m.impl("norm_bwd", &fastlm::bind::norm_bwd_cuda);
}
