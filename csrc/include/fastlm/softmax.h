// Launchers for softmax / log_softmax over the last dim of a (rows, cols) view whose columns
// are contiguous: y = softmax(scale * x + mask) with optional causal masking.
//   mask_kind 0: none; 1: bool (uint8, nonzero keeps); 2: additive, same dtype as x.
//   mask: (mask_rows, cols) contiguous; row r uses mask row r % mask_rows.
//   causal_rows 0: off; else row r keeps columns c <= r % causal_rows (top-left aligned, as
//   torch's scaled_dot_product_attention does for is_causal).
// Fully masked rows give 0 (softmax) or -inf (log_softmax), never NaN; their grads are 0.
// The backward reads only y and grad_y (nothing else is saved).
#pragma once
#include "fastlm/common.h"

namespace fastlm {

void softmax_forward_cpu(DType dtype, bool log, int64_t rows, int64_t cols, const void* x,
                         int64_t x_row_stride, float scale, int mask_kind, const void* mask,
                         int64_t mask_rows, int64_t causal_rows, void* y, int64_t y_row_stride);

void softmax_backward_cpu(DType dtype, bool log, int64_t rows, int64_t cols, const void* grad_y,
                          int64_t grad_y_row_stride, const void* y, int64_t y_row_stride,
                          float scale, void* grad_x, int64_t grad_x_row_stride);

// CUDA launchers return the launch status; they never synchronize.
int softmax_forward_cuda(DType dtype, bool log, int64_t rows, int64_t cols, const void* x,
                         int64_t x_row_stride, float scale, int mask_kind, const void* mask,
                         int64_t mask_rows, int64_t causal_rows, void* y, int64_t y_row_stride,
                         cudaStream_t stream);

int softmax_backward_cuda(DType dtype, bool log, int64_t rows, int64_t cols, const void* grad_y,
                          int64_t grad_y_row_stride, const void* y, int64_t y_row_stride,
                          float scale, void* grad_x, int64_t grad_x_row_stride,
                          cudaStream_t stream);

}  // namespace fastlm
