// Validation, allocation and launcher arguments for the norm ops, shared by the CPU and CUDA
// bindings. Outputs: y (rows, cols); h = x + residual (rows, cols), or (0,) without residual
// (then h is x itself); mean (rows,) fp32, (0,) for rms; rstd (rows,) fp32.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <cmath>
#include <tuple>

#include "common.h"
#include "cpu_output.h"
#include "fastlm/norms.h"

namespace fastlm::bind {

using NormOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using NormGrads = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

inline void matrix_arg(const char* op, const char* arg, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.dim() == 2, op, ": ", arg, " must be 2-D (rows, cols), got shape ", t.sizes());
}

inline void vector_arg(const char* op, const char* arg, const std::optional<at::Tensor>& v, const at::Tensor& x) {
  if (!v) return;
  same_place_arg(op, arg, *v, x);
  TORCH_CHECK_VALUE(v->dim() == 1 && v->size(0) == x.size(1), op, ": ", arg, " must have shape (", x.size(1),
                    ",) to match the columns of x, got ", v->sizes());
}

inline void stats_arg(const char* op, const char* arg, const at::Tensor& s, int64_t rows, const at::Tensor& x) {
  TORCH_CHECK_VALUE(s.device() == x.device(), op, ": ", arg, " is on ", s.device().str(), " but h is on ",
                    x.device().str());
  TORCH_CHECK_TYPE(s.scalar_type() == at::kFloat, op, ": ", arg, " must be float32, got ", s.scalar_type());
  TORCH_CHECK_VALUE(s.dim() == 1 && s.size(0) == rows, op, ": ", arg, " must have shape (", rows, ",), got ",
                    s.sizes());
}

inline void* ptr(const at::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

struct NormForwardPlan {
  NormForwardArgs args;
  at::Tensor x, residual, weight, bias, y, h, mean, rstd;  // keep the views alive
  NormOutputs outputs() const { return {y, h, mean, rstd}; }
};

inline NormForwardPlan plan_norm_forward(const char* op, const at::Tensor& x_in,
                                         const std::optional<at::Tensor>& residual,
                                         const std::optional<at::Tensor>& weight,
                                         const std::optional<at::Tensor>& bias, double eps, bool rms,
                                         c10::DeviceType device) {
  matrix_arg(op, "x", x_in);
  NormForwardPlan p;
  const DType dtype = kernel_input_arg(op, "x", x_in, device, /*allow_half=*/half_kernels(device));
  if (residual) {
    same_place_arg(op, "residual", *residual, x_in);
    TORCH_CHECK_VALUE(residual->sizes() == x_in.sizes(), op, ": residual has shape ", residual->sizes(),
                      " but x has shape ", x_in.sizes());
  }
  vector_arg(op, "weight", weight, x_in);
  vector_arg(op, "bias", bias, x_in);
  TORCH_CHECK_VALUE(!(rms && bias), op, ": rms norm takes no bias");
  TORCH_CHECK_VALUE(eps >= 0.0, op, ": eps must be >= 0, got ", eps);
  const int64_t rows = x_in.size(0), cols = x_in.size(1);
  p.x = rows_view(x_in);
  if (residual) p.residual = rows_view(*residual);
  if (weight) p.weight = weight->contiguous();
  if (bias) p.bias = bias->contiguous();
  p.y = empty_output({rows, cols}, x_in.options());
  p.h = residual ? empty_output({rows, cols}, x_in.options()) : at::empty({0}, x_in.options());
  const auto f32 = x_in.options().dtype(at::kFloat);
  p.mean = rms ? at::empty({0}, f32) : at::empty({rows}, f32);
  p.rstd = at::empty({rows}, f32);
  if (cols == 0 && rows > 0) {  // torch gives NaN statistics for an empty row; nothing else to write
    if (!rms) p.mean.fill_(NAN);
    p.rstd.fill_(NAN);
  }
  p.args = NormForwardArgs{dtype, rms, rows, cols, float(eps),
                           ptr(p.x), p.x.stride(0),
                           ptr(p.residual), p.residual.defined() ? p.residual.stride(0) : 0,
                           ptr(p.weight), ptr(p.bias), ptr(p.h), ptr(p.y),
                           rms ? nullptr : p.mean.data_ptr<float>(), p.rstd.data_ptr<float>()};
  return p;
}

struct NormBackwardPlan {
  NormBackwardArgs args;
  at::Tensor grad_y, grad_sum, h, weight, mean, rstd, grad_h, grad_weight, grad_bias;
  NormGrads outputs() const { return {grad_h, grad_weight, grad_bias}; }
};

inline NormBackwardPlan plan_norm_backward(const char* op, const at::Tensor& grad_y,
                                           const std::optional<at::Tensor>& grad_sum, const at::Tensor& h,
                                           const std::optional<at::Tensor>& weight, const at::Tensor& mean,
                                           const at::Tensor& rstd, bool rms, bool bias_grad, c10::DeviceType device) {
  matrix_arg(op, "h", h);
  NormBackwardPlan p;
  const DType dtype = kernel_input_arg(op, "h", h, device, /*allow_half=*/half_kernels(device));
  const int64_t rows = h.size(0), cols = h.size(1);
  same_place_arg(op, "grad_y", grad_y, h);
  TORCH_CHECK_VALUE(grad_y.sizes() == h.sizes(), op, ": grad_y has shape ", grad_y.sizes(), " but h has shape ",
                    h.sizes());
  if (grad_sum) {
    same_place_arg(op, "grad_sum", *grad_sum, h);
    TORCH_CHECK_VALUE(grad_sum->sizes() == h.sizes(), op, ": grad_sum has shape ", grad_sum->sizes(),
                      " but h has shape ", h.sizes());
  }
  vector_arg(op, "weight", weight, h);
  if (!rms) stats_arg(op, "mean", mean, rows, h);
  stats_arg(op, "rstd", rstd, rows, h);
  TORCH_CHECK_VALUE(!(rms && bias_grad), op, ": rms norm has no bias gradient");
  p.grad_y = rows_view(grad_y);
  if (grad_sum) p.grad_sum = rows_view(*grad_sum);
  p.h = rows_view(h);
  if (weight) p.weight = weight->contiguous();
  p.mean = rms ? at::Tensor() : mean.contiguous();
  p.rstd = rstd.contiguous();
  p.grad_h = empty_output({rows, cols}, h.options());
  p.grad_weight = weight ? at::zeros({cols}, h.options()) : at::empty({0}, h.options());
  p.grad_bias = bias_grad ? at::zeros({cols}, h.options()) : at::empty({0}, h.options());
  p.args = NormBackwardArgs{dtype, rms, rows, cols,
                            ptr(p.grad_y), p.grad_y.stride(0),
                            ptr(p.grad_sum), p.grad_sum.defined() ? p.grad_sum.stride(0) : 0,
                            ptr(p.h), p.h.stride(0), ptr(p.weight),
                            rms ? nullptr : p.mean.data_ptr<float>(), p.rstd.data_ptr<float>(),
                            ptr(p.grad_h),
                            (weight && rows > 0) ? ptr(p.grad_weight) : nullptr,
                            (bias_grad && rows > 0) ? ptr(p.grad_bias) : nullptr};
  return p;
}

}  // namespace fastlm::bind
