// softmax: op schemas and CPU implementations (the CUDA ones are in softmax_cuda.cpp).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "fastlm/softmax.h"
#include "softmax_args.h"
#include "cpu_output.h"

namespace fastlm::bind {
namespace {

at::Tensor softmax_fwd_cpu(const at::Tensor& x, const std::optional<at::Tensor>& mask, double scale,
                           int64_t causal_rows, bool log) {
  constexpr const char* op = "softmax";
  const DType dtype = kernel_input_arg(op, "x", x, c10::DeviceType::CPU, /*allow_half=*/false);
  at::Tensor y = empty_output(x.sizes(), x.options());
  if (x.numel() == 0) return y;
  const at::Tensor x2 = rows_view(x);
  const SoftmaxMask m = softmax_mask_arg(op, mask, x, x2.size(0), x2.size(1));
  TORCH_CHECK_VALUE(causal_rows >= 0, op, ": causal_rows must be >= 0, got ", causal_rows);
  softmax_forward_cpu(dtype, log, x2.size(0), x2.size(1), x2.data_ptr(), x2.stride(0), float(scale),
                      m.kind, m.ptr, m.rows, causal_rows, y.data_ptr(), x2.size(1));
  return y;
}

at::Tensor softmax_bwd_cpu(const at::Tensor& grad_y, const at::Tensor& y, double scale, bool log) {
  constexpr const char* op = "softmax_backward";
  const DType dtype = kernel_input_arg(op, "y", y, c10::DeviceType::CPU, /*allow_half=*/false);
  softmax_bwd_args(op, grad_y, y);
  at::Tensor grad_x = empty_output(y.sizes(), y.options());
  if (y.numel() == 0) return grad_x;
  const at::Tensor g2 = rows_view(grad_y), y2 = rows_view(y);
  softmax_backward_cpu(dtype, log, y2.size(0), y2.size(1), g2.data_ptr(), g2.stride(0), y2.data_ptr(),
                       y2.stride(0), float(scale), grad_x.data_ptr(), y2.size(1));
  return grad_x;
}

}  // namespace
}  // namespace fastlm::bind

TORCH_LIBRARY_IMPL(fastlm, CPU, m) {
  m.impl("softmax_fwd", &fastlm::bind::softmax_fwd_cpu);
  m.impl("softmax_bwd", &fastlm::bind::softmax_bwd_cpu);
}
