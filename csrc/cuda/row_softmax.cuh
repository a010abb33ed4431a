// Row-wise softmax building blocks shared by softmax.cu and cross_entropy.cu: a fast exp, the
// online (max, sum-of-exp) pair folded over the elements a thread holds, its reductions across
// the TPR threads that own a row (sub-warp, warp, or a whole block through shared memory), and
// the row layouts (threads per row sized to the width). Row I/O itself is row_io.cuh.
// Reductions are fixed-order shuffles: deterministic, no atomics.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "activations.cuh"
#include "launch.cuh"
#include "row_io.cuh"

namespace fastlm::cuda {

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }

// e^x through ex2.approx (relative error ~2^-22); e^-inf = 0.
__device__ __forceinline__ float fast_exp(float x) { return exp2f(x * 1.4426950408889634f); }

struct MaxSum {
  float m, s;
};

__device__ __forceinline__ MaxSum merge(MaxSum a, MaxSum b) {
  const float m = fmaxf(a.m, b.m);
  if (m == neg_inf()) return MaxSum{m, a.s + b.s};  // 0, or NaN from a NaN entry: keep it
  return MaxSum{m, a.s * fast_exp(a.m - m) + b.s * fast_exp(b.m - m)};
}

// Folds the elements `slots` holds, z(slot, col), into the running pair with one rescale per
// call. fmaxf skips NaN, so a NaN entry is not the max but makes s NaN; +inf makes the max +inf
// and s NaN (inf - inf): both propagate to every output, as torch's softmax does.
template <typename S, typename Z>
__device__ __forceinline__ MaxSum fold(MaxSum st, const S& slots, Z&& z) {
  float pm = neg_inf();
  slots.for_each([&](int slot, int64_t c) { pm = fmaxf(pm, z(slot, c)); });
  const float m = fmaxf(st.m, pm);
  const float shift = m == neg_inf() ? 0.0f : m;
  float s = st.s * fast_exp(st.m - shift);
  slots.for_each([&](int slot, int64_t c) { s += fast_exp(z(slot, c) - shift); });
  return MaxSum{m, s};
}

__device__ __forceinline__ float shfl_xor(float v, int off) { return __shfl_xor_sync(0xffffffffu, v, off); }
__device__ __forceinline__ MaxSum shfl_xor(MaxSum v, int off) { return MaxSum{shfl_xor(v.m, off), shfl_xor(v.s, off)}; }

// Combines v over the TPR consecutive threads of a row with `op`; every thread gets the result.
// TPR < 32: a sub-warp butterfly (all 32 lanes take part: callers never exit before it).
// TPR > 32: the row is the whole block; `smem` holds TPR / 32 values.
template <int TPR, typename V, typename Op>
__device__ __forceinline__ V row_reduce(V v, Op op, V identity, V* smem) {
#pragma unroll
  for (int off = (TPR < 32 ? TPR : 32) / 2; off > 0; off >>= 1) v = op(v, shfl_xor(v, off));
  if constexpr (TPR > 32) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) smem[warp] = v;
    __syncthreads();
    v = lane < TPR / 32 ? smem[lane] : identity;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v = op(v, shfl_xor(v, off));
    __syncthreads();  // smem may be reused by the caller
  }
  return v;
}

template <int TPR>
__device__ __forceinline__ float row_sum(float v, float* smem) {
  return row_reduce<TPR>(v, [](float a, float b) { return a + b; }, 0.0f, smem);
}

template <int TPR>
__device__ __forceinline__ MaxSum row_merge(MaxSum st, MaxSum* smem) {
  return row_reduce<TPR>(st, [](MaxSum a, MaxSum b) { return merge(a, b); }, MaxSum{neg_inf(), 0.0f}, smem);
}

// A row layout: TPR threads per row, BLOCK threads per CTA (BLOCK / TPR rows; one row when
// TPR > 32), K packs per thread per chunk; kHeld: the whole row fits in K packs per thread.
template <int TPR_, int BLOCK_, int K_, bool HELD>
struct RowLayout {
  static constexpr int TPR = TPR_, BLOCK = BLOCK_, K = K_, kRows = BLOCK_ / TPR_;
  static constexpr bool kHeld = HELD;
  static_assert(TPR <= 32 || TPR == BLOCK, "a row wider than a warp is the whole block");
};

// The row's index for this thread. Threads past the last row shadow it (they load, reduce and do
// not store), so sub-warp rows never leave a shuffle with lanes missing.
template <typename L>
__device__ __forceinline__ int64_t layout_row(int64_t rows, bool& live) {
  const int64_t r = int64_t(blockIdx.x) * L::kRows + threadIdx.x / L::TPR;
  live = r < rows;
  return live ? r : rows - 1;
}

// Picks the layout for `cols` and calls launch(layout, grid). Any row of `cols` elements has at
// most cols / VEC whole packs, so a held layout covers it when cols / VEC <= TPR K. The threads
// per row grow with the width so that K stays 2-8 (loads in flight) and no lane idles on short
// rows; K is capped at KMAX (a kernel holding two operands caps it at 4 to stay in registers).
// Rows beyond 512 KMAX packs (KMAX 8: 32768 halves, 16384 floats) stream in chunks of 512 x 4.
template <typename T, int KMAX, typename F>
int launch_rows(int64_t rows, int64_t cols, F&& launch) {
  const int64_t packs = cols / kVec<T>;
  auto go = [&](auto layout) {
    using L = decltype(layout);
    launch(layout, unsigned((rows + L::kRows - 1) / L::kRows));
  };
  constexpr int k4 = KMAX < 4 ? KMAX : 4, k8 = KMAX < 8 ? KMAX : 8;
  if (packs <= 8 * 2) go(RowLayout<8, 128, 2, true>{});
  else if (packs <= 32 * k4) go(RowLayout<32, 128, k4, true>{});
  else if (packs <= 128 * k8) go(RowLayout<128, 128, k8, true>{});
  else if (packs <= 512 * k8) go(RowLayout<512, 512, k8, true>{});
  else go(RowLayout<512, 512, 4, false>{});
  return int(cudaGetLastError());
}

}  // namespace fastlm::cuda
