// Argument checks for cross_entropy_fwd/_bwd, shared by the CPU and CUDA bindings.
#pragma once
#include <ATen/core/Tensor.h>

#include "common.h"

namespace fastlm::bind {

// The forward's arguments on `device`; returns the dtype the kernel computes in (fp16 on CUDA only).
inline DType ce_args(const char* op, const at::Tensor& logits, const at::Tensor& target,
                     const std::optional<at::Tensor>& weight, c10::DeviceType device) {
  const DType dtype = kernel_input_arg(op, "logits", logits, device, /*allow_half=*/half_kernels(device));
  TORCH_CHECK_VALUE(logits.dim() == 2, op, ": logits must be 2-D (N, C), got shape ", logits.sizes());
  TORCH_CHECK_VALUE(target.device() == logits.device(), op, ": target is on ", target.device().str(),
                    " but logits is on ", logits.device().str());
  TORCH_CHECK_TYPE(target.scalar_type() == at::kLong, op, ": target must be int64, got ", target.scalar_type());
  TORCH_CHECK_VALUE(target.dim() == 1 && target.size(0) == logits.size(0), op, ": target must have shape (",
                    logits.size(0), ",) to match logits, got ", target.sizes());
  if (!weight.has_value()) return dtype;
  TORCH_CHECK_VALUE(weight->device() == logits.device(), op, ": weight is on ", weight->device().str(),
                    " but logits is on ", logits.device().str());
  TORCH_CHECK_TYPE(weight->scalar_type() == at::kFloat, op, ": weight must be float32, got ", weight->scalar_type());
  TORCH_CHECK_VALUE(weight->dim() == 1 && weight->size(0) == logits.size(1), op, ": weight must have shape (",
                    logits.size(1), ",), got ", weight->sizes());
  return dtype;
}

// A per-row fp32 vector (lse, grad_loss) of the backward.
inline void ce_row_vector_arg(const char* op, const char* arg, const at::Tensor& v, const at::Tensor& logits) {
  TORCH_CHECK_VALUE(v.device() == logits.device(), op, ": ", arg, " is on ", v.device().str(),
                    " but logits is on ", logits.device().str());
  TORCH_CHECK_TYPE(v.scalar_type() == at::kFloat, op, ": ", arg, " must be float32, got ", v.scalar_type());
  TORCH_CHECK_VALUE(v.dim() == 1 && v.size(0) == logits.size(0), op, ": ", arg, " must have shape (",
                    logits.size(0), ",), got ", v.sizes());
}

// The backward's: the forward's, plus its saved lse and the incoming grad_loss.
inline DType ce_backward_args(const char* op, const at::Tensor& grad_loss, const at::Tensor& logits,
                              const at::Tensor& target, const std::optional<at::Tensor>& weight,
                              const at::Tensor& lse, c10::DeviceType device) {
  const DType dtype = ce_args(op, logits, target, weight, device);
  ce_row_vector_arg(op, "lse", lse, logits);
  ce_row_vector_arg(op, "grad_loss", grad_loss, logits);
  return dtype;
}

inline const float* opt_float_ptr(const at::Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }

}  // namespace fastlm::bind
