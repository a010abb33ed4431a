// cross_entropy: CUDA implementations of the ops declared in cross_entropy.cpp. Nothing here
// reads device values on the host: a target out of range gives its row NaN loss, lse and
// gradient on the device (fastlm/cross_entropy.h); CPU targets are checked by the Python layer.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <torch/library.h>

#include "cross_entropy_args.h"
#include "fastlm/cross_entropy.h"
#include "gpu_binding.h"

namespace fastlm::bind {
namespace {

std::tuple<at::Tensor, at::Tensor> cross_entropy_fwd_cuda(const at::Tensor& logits, const at::Tensor& target,
                                                          const std::optional<at::Tensor>& weight,
                                                          int64_t ignore_index, double label_smoothing) {
  constexpr const char* op = "cross_entropy";
  const DType dtype = ce_args(op, logits, target, weight, kGpu);
  const GpuGuard guard(logits.device());
  const int64_t rows = logits.size(0), cols = logits.size(1);
  const auto f32 = logits.options().dtype(at::kFloat);
  at::Tensor loss = at::empty({rows}, f32), lse = at::empty({rows}, f32);
  if (rows == 0) return {loss, lse};
  const at::Tensor x = rows_view(logits), t = target.contiguous();
  const at::Tensor w = weight ? weight->contiguous() : at::Tensor();
  check_launch(op, cross_entropy_forward_cuda(dtype, rows, cols, x.data_ptr(), x.stride(0), t.data_ptr<int64_t>(),
                                              opt_float_ptr(w), ignore_index, float(label_smoothing),
                                              loss.data_ptr<float>(), lse.data_ptr<float>(),
                                              gpu_stream()));
  return {loss, lse};
}

at::Tensor cross_entropy_bwd_cuda(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& target,
                                  const std::optional<at::Tensor>& weight, const at::Tensor& lse,
                                  int64_t ignore_index, double label_smoothing) {
  constexpr const char* op = "cross_entropy_backward";
  const DType dtype = ce_backward_args(op, grad_loss, logits, target, weight, lse, kGpu);
  const GpuGuard guard(logits.device());
  at::Tensor grad = at::empty(logits.sizes(), logits.options());
  if (logits.numel() == 0) return grad;
  const at::Tensor x = rows_view(logits), t = target.contiguous(), l = lse.contiguous(), g = grad_loss.contiguous();
  const at::Tensor w = weight ? weight->contiguous() : at::Tensor();
  const at::Tensor wsum = w.defined() ? at::sum(w).reshape({1}) : at::Tensor();
  check_launch(op, cross_entropy_backward_cuda(dtype, x.size(0), x.size(1), x.data_ptr(), x.stride(0),
                                               t.data_ptr<int64_t>(), opt_float_ptr(w), opt_float_ptr(wsum),
                                               ignore_index, float(label_smoothing), l.data_ptr<float>(),
                                               g.data_ptr<float>(), grad.data_ptr(), x.size(1),
                                               gpu_stream()));
  return grad;
}

}  // namespace
}  // namespace fastlm::bind

TORCH_LIBRARY_IMPL(FASTLM_GPU_NAMESPACE, FASTLM_GPU_KEY, m) {
  m.impl("cross_entropy_fwd", &fastlm::bind::cross_entropy_fwd_cuda);
  m.impl("cross_entropy_bwd", &fastlm::bind::cross_entropy_bwd_cuda);
}
