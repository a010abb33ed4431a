// Launchers for y = act(x + bias) over a (rows, cols) view whose columns are contiguous.
// Row strides are in elements; bias (cols,) may be null. Backward recomputes x + bias
// instead of saving it, and reduces grad_bias in the same pass when grad_bias is non-null.
#pragma once
#include "fastlm/common.h"

namespace fastlm {

void bias_act_forward_cpu(DType dtype, Activation act, int64_t rows, int64_t cols,
                          const void* x, int64_t x_row_stride, const void* bias,
                          void* y, int64_t y_row_stride);

void bias_act_backward_cpu(DType dtype, Activation act, int64_t rows, int64_t cols,
                           const void* grad_y, int64_t grad_y_row_stride,
                           const void* x, int64_t x_row_stride, const void* bias,
                           void* grad_x, int64_t grad_x_row_stride, void* grad_bias);

// CUDA launchers return the launch status; they never synchronize.
int bias_act_forward_cuda(DType dtype, Activation act, int64_t rows, int64_t cols,
                          const void* x, int64_t x_row_stride, const void* bias,
                          void* y, int64_t y_row_stride, cudaStream_t stream);

// Floats of scratch the backward needs for a deterministic grad_bias reduction.
int64_t bias_act_backward_cuda_workspace(int64_t rows, int64_t cols);

int bias_act_backward_cuda(DType dtype, Activation act, int64_t rows, int64_t cols,
                           const void* grad_y, int64_t grad_y_row_stride,
                           const void* x, int64_t x_row_stride, const void* bias,
                           void* grad_x, int64_t grad_x_row_stride, void* grad_bias,
                           float* workspace, cudaStream_t stream);

}  // namespace fastlm
