// softmax: CUDA implementations of the ops declared in softmax.cpp.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "fastlm/softmax.h"
#include "gpu_binding.h"
#include "softmax_args.h"

namespace fastlm::bind {
namespace {

at::Tensor softmax_fwd_cuda(const at::Tensor& x, const std::optional<at::Tensor>& mask, double scale,
                            int64_t causal_rows, bool log) {
  constexpr const char* op = "softmax";
  const DType dtype = kernel_input_arg(op, "x", x, kGpu, /*allow_half=*/true);
  const GpuGuard guard(x.device());
  at::Tensor y = at::empty(x.sizes(), x.options());
  if (x.numel() == 0) return y;
  const at::Tensor x2 = rows_view(x);
  const SoftmaxMask m = softmax_mask_arg(op, mask, x, x2.size(0), x2.size(1));
  TORCH_CHECK_VALUE(causal_rows >= 0, op, ": causal_rows must be >= 0, got ", causal_rows);
  check_launch(op, softmax_forward_cuda(dtype, log, x2.size(0), x2.size(1), x2.data_ptr(), x2.stride(0),
                                        float(scale), m.kind, m.ptr, m.rows, causal_rows, y.data_ptr(),
                                        x2.size(1), gpu_stream()));
  return y;
}

at::Tensor softmax_bwd_cuda(const at::Tensor& grad_y, const at::Tensor& y, double scale, bool log) {
  constexpr const char* op = "softmax_backward";
  const DType dtype = kernel_input_arg(op, "y", y, kGpu, /*allow_half=*/true);
  softmax_bwd_args(op, grad_y, y);
  const GpuGuard guard(y.device());
  at::Tensor grad_x = at::empty(y.sizes(), y.options());
  if (y.numel() == 0) return grad_x;
  const at::Tensor g2 = rows_view(grad_y), y2 = rows_view(y);
  check_launch(op, softmax_backward_cuda(dtype, log, y2.size(0), y2.size(1), g2.data_ptr(), g2.stride(0),
                                         y2.data_ptr(), y2.stride(0), float(scale), grad_x.data_ptr(),
                                         y2.size(1), gpu_stream()));
  return grad_x;
}

}  // namespace
}  // namespace fastlm::bind

TORCH_LIBRARY_IMPL(FASTLM_GPU_NAMESPACE, FASTLM_GPU_KEY, m) {
  m.impl("softmax_fwd", &fastlm::bind::softmax_fwd_cuda);
  m.impl("softmax_bwd", &fastlm::bind::softmax_bwd_cuda);
}
