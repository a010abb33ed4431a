// Row-wise softmax building blocks shared by softmax.cu and cross_entropy.cu: 16-byte packs,
// a fast exp, the online (max, sum-of-exp) pair and its reductions across the TPR threads that
// own a row (a warp, or a whole block through shared memory). Reductions are fixed-order
// shuffles: deterministic, no atomics.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include "activations.cuh"
#include "launch.cuh"

namespace fastlm::cuda {

template <typename T, int N>
struct alignas(sizeof(T) * N) RowPack {
  T v[N];
};


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

// Folds VEC values into the running pair with one rescale per pack.
template <int VEC>
__device__ __forceinline__ MaxSum online_add(MaxSum st, const float (&z)[VEC]) {
  float pm = z[0];
#pragma unroll
  for (int i = 1; i < VEC; ++i) pm = fmaxf(pm, z[i]);
  const float m = fmaxf(st.m, pm);  // fmaxf skips NaN: a NaN entry makes s NaN below instead
  const float shift = m == neg_inf() ? 0.0f : m;
  float s = st.s * fast_exp(st.m - shift);
#pragma unroll
  for (int i = 0; i < VEC; ++i) s += fast_exp(z[i] - shift);
  return MaxSum{m, s};
}

// Reductions over the TPR consecutive threads of a row. For TPR > 32 the row is the whole
// block (one row per block), `smem` holds TPR/32 entries, and every thread gets the result.
template <int TPR>
__device__ __forceinline__ float row_sum(float v, float* smem) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  if constexpr (TPR > 32) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) smem[warp] = v;
    __syncthreads();
    v = lane < TPR / 32 ? smem[lane] : 0.0f;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    __syncthreads();  // smem may be reused by the caller
  }
  return v;
}

template <int TPR>
__device__ __forceinline__ MaxSum row_merge(MaxSum st, float* smem_m, float* smem_s) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const MaxSum o{__shfl_xor_sync(0xffffffffu, st.m, off), __shfl_xor_sync(0xffffffffu, st.s, off)};
    st = merge(st, o);
  }
  if constexpr (TPR > 32) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) {
      smem_m[warp] = st.m;
      smem_s[warp] = st.s;
    }
    __syncthreads();
    st = lane < TPR / 32 ? MaxSum{smem_m[lane], smem_s[lane]} : MaxSum{neg_inf(), 0.0f};
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      const MaxSum o{__shfl_xor_sync(0xffffffffu, st.m, off), __shfl_xor_sync(0xffffffffu, st.s, off)};
      st = merge(st, o);
    }
    __syncthreads();
  }
  return st;
}

inline bool aligned16_ptr(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

// 16-byte packs need cols, every row stride and every row start to be pack-aligned.
template <typename T>
int pick_vec(int64_t cols, std::initializer_list<int64_t> strides, std::initializer_list<const void*> ptrs) {
  constexpr int kVec = 16 / sizeof(T);
  if (cols % kVec) return 1;
  for (int64_t s : strides) if (s % kVec) return 1;
  for (const void* p : ptrs) if (p && !aligned16_ptr(p)) return 1;
  return kVec;
}

// The row layout for `cols`: launch(TPR, BLOCK, VEC, grid) gets integral constants for the
// kernel<T, TPR, BLOCK, VEC> to launch on `grid` blocks of BLOCK threads. Short rows (<= 1024
// columns) get a warp each, 4 rows per block; longer rows a 512-thread block each.
template <typename T, typename F>
int launch_rows(int64_t rows, int64_t cols, int vec, F&& launch) {
  constexpr int kVec = 16 / sizeof(T);
  using Warp = std::integral_constant<int, 32>;
  using Block = std::integral_constant<int, 512>;
  using Packs = std::integral_constant<int, kVec>;
  using Scalars = std::integral_constant<int, 1>;
  if (cols <= 1024) {
    const unsigned grid = unsigned((rows + 3) / 4);
    if (vec == kVec) launch(Warp{}, std::integral_constant<int, 128>{}, Packs{}, grid);
    else launch(Warp{}, std::integral_constant<int, 128>{}, Scalars{}, grid);
  } else {
    if (vec == kVec) launch(Block{}, Block{}, Packs{}, unsigned(rows));
    else launch(Block{}, Block{}, Scalars{}, unsigned(rows));
  }
  return int(cudaGetLastError());
}

}  // namespace fastlm::cuda
