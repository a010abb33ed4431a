// Launchers for layer_norm / rms_norm over a (rows, cols) view with contiguous columns, with an
// optional residual added first (the pre-norm pattern): h = x + residual is written once and
// normalized in the same pass. Statistics are fp32: mean (layer_norm only) and rstd per row.
// Row strides are in elements; weight, bias (cols,) may be null.
#pragma once
#include "fastlm/common.h"

namespace fastlm {

struct NormForwardArgs {
  DType dtype;
  bool rms;            // rms_norm when true (no mean, no bias), layer_norm otherwise
  int64_t rows, cols;
  float eps;
  const void* x; int64_t x_stride;
  const void* residual; int64_t residual_stride;  // null: h = x
  const void* weight;  // (cols,) or null
  const void* bias;    // (cols,) or null; ignored for rms
  void* h;             // (rows, cols) contiguous, written only when residual is given
  void* y;             // (rows, cols) contiguous
  float* mean;         // (rows,) or null for rms
  float* rstd;         // (rows,)
};

// grad_h = d loss / d h from grad_y (through the norm) plus grad_sum (the gradient reaching h
// directly, may be null); it is both grad_x and grad_residual. grad_weight / grad_bias are
// reduced over rows deterministically when non-null.
struct NormBackwardArgs {
  DType dtype;
  bool rms;
  int64_t rows, cols;
  const void* grad_y; int64_t grad_y_stride;
  const void* grad_sum; int64_t grad_sum_stride;  // null when h has no other consumer
  const void* h; int64_t h_stride;
  const void* weight;
  const float* mean;   // null for rms
  const float* rstd;
  void* grad_h;        // (rows, cols) contiguous
  void* grad_weight;   // (cols,) or null
  void* grad_bias;     // (cols,) or null
};

void norm_forward_cpu(const NormForwardArgs& a);
void norm_backward_cpu(const NormBackwardArgs& a);

int norm_forward_cuda(const NormForwardArgs& a, cudaStream_t stream);
// Floats of scratch the backward needs for these arguments (0: pass null): deterministic
// grad_weight / grad_bias partials (one fp32 row per CTA and gradient) and, for rows that take
// the split pair (wider than 16384, or not 16-byte aligned), 2 floats of row sums a row. Every
// element is written by the kernels before it is read: no memset.
int64_t norm_backward_cuda_workspace(const NormBackwardArgs& a);
int norm_backward_cuda(const NormBackwardArgs& a, float* workspace, cudaStream_t stream);

}  // namespace fastlm
