// Argument checks for the linear ops, shared by the CPU and CUDA bindings.
#pragma once
#include <ATen/core/Tensor.h>

#include <string>

#include "common.h"
#include "fastlm/linear.h"

namespace fastlm::bind {

// "none" or one of activation_arg's names; returns whether there is an activation.
inline bool optional_activation_arg(const char* op, c10::string_view name, Activation* act) {
  if (std::string(name) == "none") return false;
  TORCH_CHECK_VALUE(parse_activation(std::string(name), act), op, ": unknown activation '", std::string(name),
                    "'; expected one of none, gelu, gelu_tanh, relu, silu");
  return true;
}

inline void linear_args(const char* op, const at::Tensor& x, const at::Tensor& weight,
                        const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual) {
  TORCH_CHECK_VALUE(x.dim() == 2, op, ": x must be 2-D (M, K), got shape ", x.sizes());
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.size(1) == x.size(1), op, ": weight must have shape (N, ",
                    x.size(1), ") to match x's K, got ", weight.sizes());
  same_place_arg(op, "weight", weight, x);
  if (bias) {
    same_place_arg(op, "bias", *bias, x);
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == weight.size(0), op, ": bias must have shape (",
                      weight.size(0), ",), got ", bias->sizes());
  }
  if (residual) {
    same_place_arg(op, "residual", *residual, x);
    TORCH_CHECK_VALUE(residual->dim() == 2 && residual->size(0) == x.size(0) && residual->size(1) == weight.size(0),
                      op, ": residual must have shape (", x.size(0), ", ", weight.size(0), "), got ",
                      residual->sizes());
  }
}

// The CPU epilogue pass y = act(z + bias) + residual over a GEMM output z (csrc/cpu/linear.cpp).
// Undefined tensors are absent; y may be z (in place); preact, when defined, receives z + bias.
inline void run_linear_epilogue_cpu(DType dtype, bool has_act, Activation act, const at::Tensor& z,
                                    const at::Tensor& bias, const at::Tensor& residual_rows, const at::Tensor& y,
                                    const at::Tensor& preact) {
  if (z.size(0) == 0 || z.size(1) == 0) return;
  auto ptr = [](const at::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; };
  auto stride = [](const at::Tensor& t) { return t.defined() ? t.stride(0) : int64_t(0); };
  linear_epilogue_cpu(LinearEpilogueArgs{dtype, has_act, act, z.size(0), z.size(1), z.data_ptr(), z.stride(0),
                                         ptr(bias), ptr(residual_rows), stride(residual_rows), y.data_ptr(),
                                         y.stride(0), ptr(preact), stride(preact)});
}

}  // namespace fastlm::bind
