// cross_entropy: op schemas and CPU implementations (the CUDA ones are in cross_entropy_cuda.cpp).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "cross_entropy_args.h"
#include "fastlm/cross_entropy.h"
#include "cpu_output.h"

namespace fastlm::bind {
namespace {

std::tuple<at::Tensor, at::Tensor> cross_entropy_fwd_cpu(const at::Tensor& logits, const at::Tensor& target,
                                                         const std::optional<at::Tensor>& weight,
                                                         int64_t ignore_index, double label_smoothing) {
  constexpr const char* op = "cross_entropy";
  const DType dtype = ce_args(op, logits, target, weight, c10::DeviceType::CPU);
  const int64_t rows = logits.size(0), cols = logits.size(1);
  const auto f32 = logits.options().dtype(at::kFloat);
  at::Tensor loss = at::empty({rows}, f32), lse = at::empty({rows}, f32);
  if (rows == 0) return {loss, lse};
  const at::Tensor x = rows_view(logits), t = target.contiguous();
  const at::Tensor w = weight ? weight->contiguous() : at::Tensor();
  const int64_t bad = cross_entropy_forward_cpu(dtype, rows, cols, x.data_ptr(), x.stride(0), t.data_ptr<int64_t>(),
                                                opt_float_ptr(w), ignore_index, float(label_smoothing),
                                                loss.data_ptr<float>(), lse.data_ptr<float>());
  TORCH_CHECK_INDEX(bad < 0, op, ": target value ", bad < 0 ? 0 : t.data_ptr<int64_t>()[bad],
                    " (row ", bad, ") is out of range for ", cols, " classes (ignore_index is ", ignore_index, ")");
  return {loss, lse};
}

at::Tensor cross_entropy_bwd_cpu(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& target,
                                 const std::optional<at::Tensor>& weight, const at::Tensor& lse,
                                 int64_t ignore_index, double label_smoothing) {
  constexpr const char* op = "cross_entropy_backward";
  const DType dtype = ce_backward_args(op, grad_loss, logits, target, weight, lse, c10::DeviceType::CPU);
  at::Tensor grad = empty_output(logits.sizes(), logits.options());
  if (logits.numel() == 0) return grad;
  const at::Tensor x = rows_view(logits), t = target.contiguous(), l = lse.contiguous(), g = grad_loss.contiguous();
  const at::Tensor w = weight ? weight->contiguous() : at::Tensor();
  cross_entropy_backward_cpu(dtype, x.size(0), x.size(1), x.data_ptr(), x.stride(0), t.data_ptr<int64_t>(),
                             opt_float_ptr(w), ignore_index, float(label_smoothing), l.data_ptr<float>(),
                             g.data_ptr<float>(), grad.data_ptr(), x.size(1));
  return grad;
}

}  // namespace
}  // namespace fastlm::bind

TORCH_LIBRARY_IMPL(fastlm, CPU, m) {
  m.impl("cross_entropy_fwd", &fastlm::bind::cross_entropy_fwd_cpu);
  m.impl("cross_entropy_bwd", &fastlm::bind::cross_entropy_bwd_cpu);
}
