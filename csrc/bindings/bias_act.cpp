// bias_act: op schemas and CPU implementations (the CUDA ones are in bias_act_cuda.cpp).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "common.h"
#include "fastlm/bias_act.h"
#include "cpu_output.h"

namespace fastlm::bind {
namespace {

at::Tensor bias_act_fwd_cpu(const at::Tensor& x, const std::optional<at::Tensor>& bias,
                            c10::string_view activation) {
  constexpr const char* op = "bias_act";
  const Activation act = activation_arg(op, activation);
  const DType dtype = kernel_input_arg(op, "x", x, c10::DeviceType::CPU, /*allow_half=*/false);
  bias_arg(op, bias, x);
  at::Tensor y = empty_output(x.sizes(), x.options());
  if (x.numel() == 0) return y;
  const at::Tensor x2 = rows_view(x);
  const at::Tensor b = bias ? bias->contiguous() : at::Tensor();
  bias_act_forward_cpu(dtype, act, x2.size(0), x2.size(1), x2.data_ptr(), x2.stride(0),
                       b.defined() ? b.data_ptr() : nullptr, y.data_ptr(), x2.size(1));
  return y;
}

std::tuple<at::Tensor, at::Tensor> bias_act_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& x,
                                                    const std::optional<at::Tensor>& bias,
                                                    c10::string_view activation) {
  constexpr const char* op = "bias_act_backward";
  const Activation act = activation_arg(op, activation);
  const DType dtype = kernel_input_arg(op, "x", x, c10::DeviceType::CPU, /*allow_half=*/false);
  bias_arg(op, bias, x);
  grad_out_arg(op, grad_out, x);
  at::Tensor grad_x = empty_output(x.sizes(), x.options());
  at::Tensor grad_bias = bias ? at::empty({last_dim(x)}, x.options()) : at::empty({0}, x.options());
  if (x.numel() == 0) return {grad_x, grad_bias.zero_()};
  const at::Tensor g2 = rows_view(grad_out), x2 = rows_view(x);
  const at::Tensor b = bias ? bias->contiguous() : at::Tensor();
  bias_act_backward_cpu(dtype, act, x2.size(0), x2.size(1), g2.data_ptr(), g2.stride(0),
                        x2.data_ptr(), x2.stride(0), b.defined() ? b.data_ptr() : nullptr,
                        grad_x.data_ptr(), x2.size(1), b.defined() ? grad_bias.data_ptr() : nullptr);
  return {grad_x, grad_bias};
}

}  // namespace
}  // namespace fastlm::bind

TORCH_LIBRARY_IMPL(fastlm, CPU, m) {
  m.impl("bias_act_fwd", &fastlm::bind::bias_act_fwd_cpu);
  m.impl("bias_act_bwd", &fastlm::bind::bias_act_bwd_cpu);
}
