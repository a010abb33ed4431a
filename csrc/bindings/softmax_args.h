// Argument checks for softmax_fwd/softmax_bwd, shared by the CPU and CUDA bindings.
#pragma once
#include <ATen/core/Tensor.h>

#include "common.h"

namespace fastlm::bind {

struct SoftmaxMask {
  int kind = 0;  // 0 none, 1 bool, 2 additive (see fastlm/softmax.h)
  int64_t rows = 1;
  const void* ptr = nullptr;
};

// mask: (mask_rows, cols) contiguous, bool or x's dtype, mask_rows dividing x's row count.
inline SoftmaxMask softmax_mask_arg(const char* op, const std::optional<at::Tensor>& mask,
                                    const at::Tensor& x, int64_t rows, int64_t cols) {
  SoftmaxMask m;
  if (!mask.has_value()) return m;
  TORCH_CHECK_VALUE(mask->device() == x.device(), op, ": mask is on ", mask->device().str(),
                    " but x is on ", x.device().str());
  TORCH_CHECK_TYPE(mask->scalar_type() == at::kBool || mask->scalar_type() == x.scalar_type(), op,
                   ": mask must be bool or x's dtype ", x.scalar_type(), ", got ", mask->scalar_type());
  TORCH_CHECK_VALUE(mask->dim() == 2 && mask->size(1) == cols && mask->size(0) > 0 &&
                        rows % mask->size(0) == 0 && mask->is_contiguous(),
                    op, ": mask must be a contiguous (mask_rows, ", cols,
                    ") tensor with mask_rows dividing the ", rows, " rows of x, got ", mask->sizes());
  m.kind = mask->scalar_type() == at::kBool ? 1 : 2;
  m.rows = mask->size(0);
  m.ptr = mask->data_ptr();
  return m;
}

inline void softmax_bwd_args(const char* op, const at::Tensor& grad_y, const at::Tensor& y) {
  same_place_arg(op, "grad_y", grad_y, y);
  TORCH_CHECK_VALUE(grad_y.sizes() == y.sizes(), op, ": grad_y has shape ", grad_y.sizes(),
                    " but y has shape ", y.sizes());
}

}  // namespace fastlm::bind
