// linear on CUDA: y = act(x @ w^T + bias) + residual, and its backward dX = grad_p @ w and
// dW = grad_p^T @ x, all on the one tensor-core GEMM core in gemm_core.cuh (its header has the
// tiling, pipeline and epilogue arithmetic), or on sm_90 its Hopper tier (gemm_sm90.cuh: TMA,
// wgmma, persistent warp-specialised CTAs) with the same operands and epilogue, as
// gemm::use_sm90_tier decides. The forward is A = x, B = w, both K-major, with the
// epilogue (split-K over a fp32 workspace for M <= 64, the decode shapes: see splitk_slices); the backward reads its operands in place through the core's MN-major layouts
// (ldmatrix.trans), so nothing is transposed or copied:
//   dX (M, K) = grad_p (M, N) @ w (N, K):    A = grad_p K-major, B = w read N-major (w^T)
//   dW (N, K) = grad_p^T (N, M) @ x (M, K):  A = grad_p read M-major, B = x read N-major
// grad_p = grad_y * act'(p) is written once by bias_act's backward kernel (with grad_bias = its
// column sums in the same pass) rather than fused into both GEMMs' operand loads: cp.async
// copies global -> shared untouched, so a fused act' would need a second pass over every
// shared tile (a load of p's tile too, an extra 16 KB stage per operand, ~16 more instructions
// per 128 HMMA per thread) in each of the dX and dW GEMMs, which each re-read grad_p
// cdiv(K, 128) times; writing it once costs 3 x M x N x 2 bytes of traffic, once.
#include <cuda_runtime.h>

#include <cstdint>

#include "fastlm/linear.h"
#include "gemm_sm90.cuh"

namespace fastlm::cuda {
namespace {

template <typename T>
int forward(const LinearCudaArgs& a, cudaStream_t stream) {
  gemm::GemmArgs p{};
  p.m = a.m, p.n = a.n, p.k = a.k;
  p.a = a.x, p.lda = a.x_stride, p.b = a.w, p.ldb = a.w_stride;
  p.ep = gemm::Epilogue{a.has_act, a.act, a.bias, a.residual, a.residual_stride, a.y, a.n, a.preact, a.n};
  const int splits = a.workspace ? gemm::splitk_slices(a.m, a.n, a.k) : 1;
  return gemm::launch_gemm_tiered<T, true, true>(p, stream, splits, a.workspace);
}

template <typename T>
int backward(const LinearGradCudaArgs& a, cudaStream_t stream) {
  gemm::GemmArgs dx{};  // (M, K) = grad_p @ w: GEMM extents (M, K, N)
  dx.m = a.m, dx.n = a.k, dx.k = a.n;
  dx.a = a.grad_p, dx.lda = a.grad_p_stride, dx.b = a.w, dx.ldb = a.w_stride;
  dx.ep.y = a.grad_x, dx.ep.y_ld = a.k;
  gemm::GemmArgs dw{};  // (N, K) = grad_p^T @ x: GEMM extents (N, K, M)
  dw.m = a.n, dw.n = a.k, dw.k = a.m;
  dw.a = a.grad_p, dw.lda = a.grad_p_stride, dw.b = a.x, dw.ldb = a.x_stride;
  dw.ep.y = a.grad_w, dw.ep.y_ld = a.k;
  if (a.k == 0) return 0;  // both outputs are empty
  if (a.m > 0) {
    const int err = gemm::launch_gemm_tiered<T, true, false>(dx, stream);
    if (err) return err;
  }
  return a.n > 0 ? gemm::launch_gemm_tiered<T, false, false>(dw, stream) : 0;  // M == 0: zeros
}

}  // namespace
}  // namespace fastlm::cuda

namespace fastlm {

int linear_forward_cuda(const LinearCudaArgs& a, cudaStream_t stream) {
  // K == 0 runs no K tile (x and w are never read): the epilogue alone gives act(bias) + residual.
  using cuda::gemm::aligned;
  const bool rows_ok = a.k == 0 || (a.k % 8 == 0 && aligned(a.x, a.x_stride) && aligned(a.w, a.w_stride));
  const bool epilogue_ok = (!a.bias || aligned(a.bias, 0)) && (!a.residual || aligned(a.residual, a.residual_stride));
  if (a.n % 8 || !rows_ok || !epilogue_ok) return int(cudaErrorInvalidValue);
  if (a.m == 0 || a.n == 0) return 0;
  if (a.dtype == DType::kFloat16) return cuda::forward<__half>(a, stream);
  if (a.dtype == DType::kBFloat16) return cuda::forward<__nv_bfloat16>(a, stream);
  return int(cudaErrorInvalidValue);
}

int64_t linear_forward_cuda_workspace(int64_t m, int64_t n, int64_t k) {
  const int splits = cuda::gemm::splitk_slices(m, n, k);
  return splits > 1 ? int64_t(splits) * m * n : 0;
}

int linear_backward_cuda(const LinearGradCudaArgs& a, cudaStream_t stream) {
  using cuda::gemm::aligned;
  const bool ok = a.n % 8 == 0 && a.k % 8 == 0 && aligned(a.grad_p, a.grad_p_stride) && aligned(a.x, a.x_stride) &&
                  aligned(a.w, a.w_stride);
  if (!ok) return int(cudaErrorInvalidValue);
  if (a.dtype == DType::kFloat16) return cuda::backward<__half>(a, stream);
  if (a.dtype == DType::kBFloat16) return cuda::backward<__nv_bfloat16>(a, stream);
  return int(cudaErrorInvalidValue);
}

}  // namespace fastlm
