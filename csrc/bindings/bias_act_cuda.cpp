// bias_act: CUDA implementations of the ops declared in bias_act.cpp. Validate, allocate on
// the input's device, launch on the current stream. The stream comes from c10/cuda only, so
// this builds without the cuBLAS/cuSPARSE headers that ATen/cuda/CUDAContext.h drags in.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "common.h"
#include "fastlm/bias_act.h"
#include "gpu_binding.h"

namespace fastlm::bind {
namespace {

at::Tensor bias_act_fwd_cuda(const at::Tensor& x, const std::optional<at::Tensor>& bias,
                             c10::string_view activation) {
  constexpr const char* op = "bias_act";
  const Activation act = activation_arg(op, activation);
  const DType dtype = kernel_input_arg(op, "x", x, kGpu, /*allow_half=*/true);
  bias_arg(op, bias, x);
  const GpuGuard guard(x.device());
  at::Tensor y = at::empty(x.sizes(), x.options());
  if (x.numel() == 0) return y;
  const at::Tensor x2 = rows_view(x);
  const at::Tensor b = bias ? bias->contiguous() : at::Tensor();
  check_launch(op, bias_act_forward_cuda(dtype, act, x2.size(0), x2.size(1), x2.data_ptr(),
                                         x2.stride(0), b.defined() ? b.data_ptr() : nullptr,
                                         y.data_ptr(), x2.size(1),
                                         gpu_stream()));
  return y;
}

std::tuple<at::Tensor, at::Tensor> bias_act_bwd_cuda(const at::Tensor& grad_out, const at::Tensor& x,
                                                     const std::optional<at::Tensor>& bias,
                                                     c10::string_view activation) {
  constexpr const char* op = "bias_act_backward";
  const Activation act = activation_arg(op, activation);
  const DType dtype = kernel_input_arg(op, "x", x, kGpu, /*allow_half=*/true);
  bias_arg(op, bias, x);
  grad_out_arg(op, grad_out, x);
  const GpuGuard guard(x.device());
  at::Tensor grad_x = at::empty(x.sizes(), x.options());
  at::Tensor grad_bias = at::empty({bias ? last_dim(x) : 0}, x.options());
  if (x.numel() == 0) return {grad_x, grad_bias.zero_()};
  const at::Tensor g2 = rows_view(grad_out), x2 = rows_view(x);
  const at::Tensor b = bias ? bias->contiguous() : at::Tensor();
  const int64_t rows = x2.size(0), cols = x2.size(1);
  at::Tensor workspace;
  if (b.defined())
    workspace = at::empty({bias_act_backward_cuda_workspace(rows, cols)}, x.options().dtype(at::kFloat));
  check_launch(op, bias_act_backward_cuda(
                       dtype, act, rows, cols, g2.data_ptr(), g2.stride(0), x2.data_ptr(),
                       x2.stride(0), b.defined() ? b.data_ptr() : nullptr, grad_x.data_ptr(), cols,
                       b.defined() ? grad_bias.data_ptr() : nullptr,
                       b.defined() ? workspace.data_ptr<float>() : nullptr,
                       gpu_stream()));
  return {grad_x, grad_bias};
}

}  // namespace
}  // namespace fastlm::bind

TORCH_LIBRARY_IMPL(FASTLM_GPU_NAMESPACE, FASTLM_GPU_KEY, m) {
  m.impl("bias_act_fwd", &fastlm::bind::bias_act_fwd_cuda);
  m.impl("bias_act_bwd", &fastlm::bind::bias_act_bwd_cuda);
}
