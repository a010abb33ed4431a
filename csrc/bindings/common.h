// Input checks and views shared by the CPU and CUDA bindings. Every message names the
// argument and the offending value, because users call torch.ops.fastlm.* directly too.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>
#include <string>

#include "fastlm/common.h"

namespace fastlm::bind {

inline Activation activation_arg(const char* op, c10::string_view name) {
  Activation act;
  TORCH_CHECK_VALUE(parse_activation(std::string(name), &act), op, ": unknown activation '",
                    std::string(name), "'; expected one of gelu, gelu_tanh, relu, silu");
  return act;
}

inline DType dtype_arg(const char* op, const char* arg, const at::Tensor& t, bool allow_half) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kHalf:
      if (allow_half) return DType::kFloat16;
      break;
    default: break;
  }
  TORCH_CHECK_TYPE(false, op, ": ", arg, " must be float32", allow_half ? ", float16" : "",
                   " or bfloat16 on ", t.device().str(), ", got ", t.scalar_type());
  return DType::kFloat32;  // unreachable: the check above throws
}

// Whether the kernels serving `device` take float16: the CUDA ones do. In the emulator build
// (fastlm._C_emu) every binding is a CUDA one, serving CPU tensors.
inline bool half_kernels(c10::DeviceType device) {
#ifdef FASTLM_EMU
  (void)device;
  return true;
#else
  return device == c10::DeviceType::CUDA;
#endif
}

// The tensor a kernel's dtype and device come from: on `device` (the backend this binding
// serves) and in a dtype it computes in.
inline DType kernel_input_arg(const char* op, const char* arg, const at::Tensor& t, c10::DeviceType device,
                              bool allow_half) {
  TORCH_CHECK_VALUE(t.device().type() == device, op, ": ", arg, " must be a ",
                    device == c10::DeviceType::CUDA ? "CUDA" : "CPU", " tensor here, got ", t.device().str());
  return dtype_arg(op, arg, t, allow_half);
}

// `other` must live where `x` lives and share its dtype.
inline void same_place_arg(const char* op, const char* arg, const at::Tensor& other,
                           const at::Tensor& x) {
  TORCH_CHECK_VALUE(other.device() == x.device(), op, ": ", arg, " is on ", other.device().str(),
                    " but x is on ", x.device().str());
  TORCH_CHECK_TYPE(other.scalar_type() == x.scalar_type(), op, ": ", arg, " has dtype ",
                   other.scalar_type(), " but x has dtype ", x.scalar_type());
}

inline void bias_arg(const char* op, const std::optional<at::Tensor>& bias, const at::Tensor& x) {
  if (!bias.has_value()) return;
  TORCH_CHECK_VALUE(x.dim() >= 1, op, ": bias given but x is 0-dimensional");
  same_place_arg(op, "bias", *bias, x);
  TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == x.size(-1), op,
                    ": bias must have shape (", x.size(-1), ",) to match the last dim of x, got ",
                    bias->sizes());
}

// bias_act_backward's grad_out: beside x, of x's shape.
inline void grad_out_arg(const char* op, const at::Tensor& grad_out, const at::Tensor& x) {
  same_place_arg(op, "grad_out", grad_out, x);
  TORCH_CHECK_VALUE(grad_out.sizes() == x.sizes(), op, ": grad_out has shape ", grad_out.sizes(),
                    " but x has shape ", x.sizes());
}

inline int64_t last_dim(const at::Tensor& t) { return t.dim() ? t.size(-1) : 1; }

// (rows, cols) view with unit column stride; copies only when no such view exists.
inline at::Tensor rows_view(const at::Tensor& t) {
  at::Tensor v = t.reshape({-1, last_dim(t)});
  if (v.stride(1) != 1 && v.size(1) > 1) v = v.contiguous();
  return v;
}

}  // namespace fastlm::bind
