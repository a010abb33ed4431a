// Launchers for the linear epilogue y = act(z + bias) + residual, where z = x @ weight^T is a
// GEMM output, and for the CUDA tensor-core GEMM that applies the same epilogue before its
// single store. act may be absent (has_act false). Row strides in elements; bias (cols,) and
// residual may be null; y may alias z (in place). preact, when non-null, receives z + bias
// rounded to the output dtype (what the backward differentiates act at, rounded once like
// eager's linear output); it may alias z.
#pragma once
#include "fastlm/common.h"

namespace fastlm {

struct LinearEpilogueArgs {
  DType dtype;
  bool has_act;
  Activation act;
  int64_t rows, cols;
  const void* z; int64_t z_stride;
  const void* bias;
  const void* residual; int64_t residual_stride;
  void* y; int64_t y_stride;
  void* preact; int64_t preact_stride;  // or null
};

void linear_epilogue_cpu(const LinearEpilogueArgs& a);

// y (M, N) = act(x (M, K) @ w (N, K)^T + bias) + residual, fp16/bf16, tensor cores
// (mma.sync m16n8k16, cp.async double buffering). Needs K % 8 == 0, N % 8 == 0 and 16-byte
// aligned rows (strides multiples of 8); preact (M, N), when non-null, receives x @ w^T + bias
// for the backward. Returns the launch status.
struct LinearCudaArgs {
  DType dtype;  // kFloat16 or kBFloat16
  bool has_act;
  Activation act;
  int64_t m, n, k;
  const void* x; int64_t x_stride;
  const void* w; int64_t w_stride;
  const void* bias;
  const void* residual; int64_t residual_stride;
  void* y;        // (m, n) contiguous
  void* preact;   // (m, n) contiguous or null: x @ w^T + bias, rounded to the dtype
};
int linear_forward_cuda(const LinearCudaArgs& a, cudaStream_t stream);

}  // namespace fastlm
