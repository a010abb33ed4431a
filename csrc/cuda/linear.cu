// linear on CUDA: y = act(x @ w^T + bias) + residual with a hand-written tensor-core GEMM whose
// epilogue applies bias, activation and residual in registers before the single store.
// fp16/bf16 in, fp32 accumulate. x (M, K) and w (N, K) are both K-contiguous, which is exactly
// mma.sync's row.col operand pair, so no transposes anywhere.
//  - CTA tile 128 x 128 x 32, 8 warps in a 2 x 4 grid, warp tile 64 x 32: per k16 step each warp
//    issues 4 x 4 mma.sync.m16n8k16 from fragments loaded with ldmatrix.x4.
//  - cp.async (16-byte, L2-only .cg) double buffering: the next K tile streams into shared
//    memory while the current one feeds the tensor cores. Rows padded by 8 halves so the
//    eight 16-byte rows an ldmatrix phase reads fall in distinct banks.
//  - Edges: rows past M / N and K chunks past K are zero-filled by cp.async's src-size operand,
//    so any M works; N and K must be multiples of 8 (16-byte chunks), which the binding checks.
#include <cuda_runtime.h>

#include <cstdint>

#include "activations.cuh"
#include "fastlm/linear.h"
#include "launch.cuh"
#include "ptx.cuh"

namespace fastlm::cuda {
namespace {

constexpr int kBM = 128, kBN = 128, kBK = 32, kPad = 8, kStride = kBK + kPad;  // halves
constexpr int kThreads = 256;
constexpr int kWarpM = 64, kWarpN = 32;                    // warp tile
constexpr int kMT = kWarpM / 16, kNT = kWarpN / 8;         // mma tiles per warp: 4 x 4

// One K tile of A (kBM x kBK) and B (kBN x kBK) into shared memory: 512 16-byte chunks each,
// two per thread per operand.
template <typename T>
__device__ __forceinline__ void load_tile(T* sa, T* sb, const LinearCudaArgs& p, int64_t m0, int64_t n0,
                                          int64_t k0) {
  const T* x = static_cast<const T*>(p.x);
  const T* w = static_cast<const T*>(p.w);
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int chunk = threadIdx.x + i * kThreads;  // 0..511
    const int row = chunk / (kBK / 8), col = (chunk % (kBK / 8)) * 8;
    const int64_t k = k0 + col;
    const int64_t m = m0 + row, n = n0 + row;
    const bool ka = k < p.k;
    const bool in_a = ka && m < p.m, in_b = ka && n < p.n;
    // Out-of-range chunks still need a valid address; src-size 0 means nothing is read.
    cp_async16(sa + row * kStride + col, in_a ? x + m * p.x_stride + k : x, in_a ? 16 : 0);
    cp_async16(sb + row * kStride + col, in_b ? w + n * p.w_stride + k : w, in_b ? 16 : 0);
  }
}

template <typename T, bool HasAct, Activation A>
__global__ void __launch_bounds__(kThreads) gemm_kernel(const LinearCudaArgs p) {
  FASTLM_SHARED(T, sa, [2][kBM * kStride]);
  FASTLM_SHARED(T, sb, [2][kBN * kStride]);
  const int64_t m0 = int64_t(blockIdx.y) * kBM, n0 = int64_t(blockIdx.x) * kBN;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int wm = (warp / 4) * kWarpM, wn = (warp % 4) * kWarpN;

  float acc[kMT][kNT][4];
#pragma unroll
  for (int i = 0; i < kMT; ++i)
#pragma unroll
    for (int j = 0; j < kNT; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[i][j][r] = 0.0f;

  const int64_t tiles = (p.k + kBK - 1) / kBK;
  load_tile<T>(sa[0], sb[0], p, m0, n0, 0);
  cp_async_commit();
  for (int64_t t = 0; t < tiles; ++t) {
    const int s = int(t & 1);
    if (t + 1 < tiles) {
      load_tile<T>(sa[s ^ 1], sb[s ^ 1], p, m0, n0, (t + 1) * kBK);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kBK; kk += 16) {
      uint32_t af[kMT][4], bf[kNT][2];
#pragma unroll
      for (int i = 0; i < kMT; ++i)  // A 16x16: lanes 0-15 rows at k, lanes 16-31 rows at k + 8
        ldmatrix_x4(af[i], &sa[s][(wm + i * 16 + lane % 16) * kStride + kk + (lane / 16) * 8]);
#pragma unroll
      for (int j = 0; j < kNT; j += 2) {  // two n8 tiles x two k8 halves per ldmatrix.x4
        uint32_t r[4];
        ldmatrix_x4(r, &sb[s][(wn + j * 8 + lane % 8 + (lane / 16) * 8) * kStride + kk + ((lane / 8) % 2) * 8]);
        bf[j][0] = r[0];
        bf[j][1] = r[1];
        bf[j + 1][0] = r[2];
        bf[j + 1][1] = r[3];
      }
#pragma unroll
      for (int i = 0; i < kMT; ++i)
#pragma unroll
        for (int j = 0; j < kNT; ++j) mma_m16n8k16<T>(acc[i][j], af[i], bf[j][0], bf[j][1]);
    }
    __syncthreads();  // the next iteration's cp.async overwrites this stage
  }
  cp_async_wait<0>();  // K == 0: the prologue's (empty) copies are still in flight

  // Epilogue: accumulator (i, j, r) is row wm + 16 i + lane / 4 + 8 (r / 2), column
  // wn + 8 j + 2 (lane % 4) + r % 2. Pairs (r, r + 1) are adjacent columns: one 4-byte store.
  const T* bias = static_cast<const T*>(p.bias);
  const T* res = static_cast<const T*>(p.residual);
  T* y = static_cast<T*>(p.y);
  T* pre = static_cast<T*>(p.preact);
#pragma unroll
  for (int i = 0; i < kMT; ++i)
#pragma unroll
    for (int j = 0; j < kNT; ++j) {
      const int64_t n = n0 + wn + j * 8 + 2 * (lane % 4);
      if (n >= p.n) continue;  // N % 8 == 0: both columns of the pair are in or both out
      const float b0 = bias ? to_float(bias[n]) : 0.0f, b1 = bias ? to_float(bias[n + 1]) : 0.0f;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t m = m0 + wm + i * 16 + lane / 4 + 8 * h;
        if (m >= p.m) continue;
        T v0 = from_float<T>(acc[i][j][2 * h] + b0), v1 = from_float<T>(acc[i][j][2 * h + 1] + b1);
        if (pre) {  // z + bias rounded once: what the backward differentiates act at
          pre[m * p.n + n] = v0;
          pre[m * p.n + n + 1] = v1;
        }
        float o0 = to_float(v0), o1 = to_float(v1);
        if constexpr (HasAct) {
          o0 = act_forward<A>(o0);
          o1 = act_forward<A>(o1);
        }
        if (res) {
          o0 += to_float(res[m * p.residual_stride + n]);
          o1 += to_float(res[m * p.residual_stride + n + 1]);
        }
        y[m * p.n + n] = from_float<T>(o0);
        y[m * p.n + n + 1] = from_float<T>(o1);
      }
    }
}

template <typename T>
int launch(const LinearCudaArgs& p, cudaStream_t stream) {
  const dim3 grid(unsigned((p.n + kBN - 1) / kBN), unsigned((p.m + kBM - 1) / kBM));
  const auto go = [&](auto kernel) { launch_kernel(kernel, grid, kThreads, 0, stream, p); };
  if (!p.has_act) go(gemm_kernel<T, false, Activation::kRelu>);
  else switch (p.act) {
    case Activation::kGelu: go(gemm_kernel<T, true, Activation::kGelu>); break;
    case Activation::kGeluTanh: go(gemm_kernel<T, true, Activation::kGeluTanh>); break;
    case Activation::kRelu: go(gemm_kernel<T, true, Activation::kRelu>); break;
    case Activation::kSilu: go(gemm_kernel<T, true, Activation::kSilu>); break;
  }
  return int(cudaGetLastError());
}

}  // namespace
}  // namespace fastlm::cuda

namespace fastlm {

int linear_forward_cuda(const LinearCudaArgs& a, cudaStream_t stream) {
  // K == 0 runs no K tile (x and w are never read): the epilogue alone gives act(bias) + residual.
  const bool rows_ok = a.k == 0 || (a.k % 8 == 0 && a.x_stride % 8 == 0 && a.w_stride % 8 == 0);
  if (a.n % 8 || !rows_ok || a.m > int64_t(65535) * cuda::kBM) return int(cudaErrorInvalidValue);
  if (a.m == 0 || a.n == 0) return 0;
  if (a.dtype == DType::kFloat16) return cuda::launch<__half>(a, stream);
  if (a.dtype == DType::kBFloat16) return cuda::launch<__nv_bfloat16>(a, stream);
  return int(cudaErrorInvalidValue);
}

}  // namespace fastlm
