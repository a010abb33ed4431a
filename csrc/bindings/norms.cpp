// layer_norm / rms_norm (with optional fused residual add): schemas and CPU implementations
// (the CUDA ones are in norms_cuda.cpp). The ops see (rows, cols) views; fastlm/ops/norms.py
// flattens normalized_shape into cols.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "norms_common.h"

namespace fastlm::bind {
namespace {

NormOutputs norm_fwd_cpu(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                         const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                         double eps, bool rms) {
  constexpr const char* op = "norm_fwd";
  NormForwardPlan p = plan_norm_forward(op, x, residual, weight, bias, eps, rms, c10::DeviceType::CPU);
  if (p.args.rows > 0 && p.args.cols > 0) norm_forward_cpu(p.args);
  return p.outputs();
}

NormGrads norm_bwd_cpu(const at::Tensor& grad_y, const std::optional<at::Tensor>& grad_sum,
                       const at::Tensor& h, const std::optional<at::Tensor>& weight, const at::Tensor& mean,
                       const at::Tensor& rstd, bool rms, bool bias_grad) {
  constexpr const char* op = "norm_bwd";
  NormBackwardPlan p = plan_norm_backward(op, grad_y, grad_sum, h, weight, mean, rstd, rms, bias_grad,
                                          c10::DeviceType::CPU);
  if (p.args.rows > 0 && p.args.cols > 0) norm_backward_cpu(p.args);
  return p.outputs();
}

}  // namespace
}  // namespace fastlm::bind

TORCH_LIBRARY_IMPL(fastlm, CPU, m) {
  m.impl("norm_fwd", &fastlm::bind::norm_fwd_cpu);
  m.impl("norm_bwd", &fastlm::bind::norm_bwd_cpu);
}
