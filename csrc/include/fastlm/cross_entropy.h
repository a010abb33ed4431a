// Launchers for cross-entropy over (rows, cols) logits whose columns are contiguous, with
// class-index targets (int64), optional fp32 class weights w (null = all ones) and label
// smoothing eps. Per row r with target t (W = sum of w, C = cols):
//   lse[r]  = log sum_c exp(x[r, c])                                   (fp32, saved)
//   loss[r] = (1 - eps) w[t] (lse - x[t]) + eps / C * sum_c w[c] (lse - x[c]),  0 if t == ignore_index
// Backward, from the saved lse only (no probability tensor is kept), p = exp(x - lse):
//   grad[r, c] = gscale[r] * ((1 - eps) w[t] (p[c] - [c == t]) + eps / C (W p[c] - w[c])),  0 if ignored
// The logits are read once in the forward and once in the backward.
#pragma once
#include "fastlm/common.h"

namespace fastlm {

// Returns -1, or the first row whose target is neither ignore_index nor in [0, cols)
// (then nothing is guaranteed about loss and lse).
int64_t cross_entropy_forward_cpu(DType dtype, int64_t rows, int64_t cols, const void* logits,
                                  int64_t logits_row_stride, const int64_t* target, const float* weight,
                                  int64_t ignore_index, float label_smoothing, float* loss, float* lse);

void cross_entropy_backward_cpu(DType dtype, int64_t rows, int64_t cols, const void* logits,
                                int64_t logits_row_stride, const int64_t* target, const float* weight,
                                int64_t ignore_index, float label_smoothing,
                                const float* lse, const float* gscale, void* grad, int64_t grad_row_stride);

// CUDA launchers return the launch status; they never synchronize. A target neither
// ignore_index nor in [0, cols) gives its row NaN loss and lse (forward) and a NaN gradient row
// (backward), decided on the device; nothing is read out of bounds.
int cross_entropy_forward_cuda(DType dtype, int64_t rows, int64_t cols, const void* logits,
                               int64_t logits_row_stride, const int64_t* target, const float* weight,
                               int64_t ignore_index, float label_smoothing, float* loss, float* lse,
                               cudaStream_t stream);

// weight_sum: device pointer to sum(w) (read only when weight is given).
int cross_entropy_backward_cuda(DType dtype, int64_t rows, int64_t cols, const void* logits,
                                int64_t logits_row_stride, const int64_t* target, const float* weight,
                                const float* weight_sum, int64_t ignore_index, float label_smoothing,
                                const float* lse, const float* gscale, void* grad, int64_t grad_row_stride,
                                cudaStream_t stream);

}  // namespace fastlm
