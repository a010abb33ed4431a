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
// (csrc/cuda/gemm_core.cuh: mma.sync m16n8k16, 3-stage cp.async). Needs K % 8 == 0, N % 8 == 0,
// 16-byte aligned rows (strides multiples of 8) for x, w and residual and a 16-byte aligned bias;
// preact (M, N), when non-null, receives x @ w^T + bias for the backward. Returns the launch status.
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
  float* workspace;  // linear_forward_cuda_workspace(m, n, k) floats, or null (no split-K)
};
int linear_forward_cuda(const LinearCudaArgs& a, cudaStream_t stream);
// The fp32 workspace the forward's split-K path wants (small M: K is split over CTAs so that
// the weight streams at full bandwidth); 0 when it runs unsplit.
int64_t linear_forward_cuda_workspace(int64_t m, int64_t n, int64_t k);

// The backward GEMMs on the same core: grad_x (M, K) = grad_p (M, N) @ w (N, K) and
// grad_w (N, K) = grad_p^T @ x (M, K), both contiguous outputs, operands read in place (no
// transposes). Same alignment needs as the forward; N % 8 == 0, K % 8 == 0, any M.
struct LinearGradCudaArgs {
  DType dtype;
  int64_t m, n, k;
  const void* grad_p; int64_t grad_p_stride;
  const void* x; int64_t x_stride;
  const void* w; int64_t w_stride;
  void* grad_x;  // (m, k)
  void* grad_w;  // (n, k)
};
int linear_backward_cuda(const LinearGradCudaArgs& a, cudaStream_t stream);

}  // namespace fastlm
