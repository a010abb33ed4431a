// The last step of a deterministic column reduction (grad_weight / grad_bias of the norms,
// grad_bias of bias_act): the main kernel leaves one fp32 partial row per CTA, summed in
// registers over the rows that CTA visited; this sums those `parts` rows column by column.
// A thread owns 4 adjacent columns (one 16-byte load per partial row: the callers pad their
// partial rows to whole packs, `ld` a multiple of 4 floats, and the pad columns are read but
// never stored), a block's 32 threads 128 columns (each warp reads 512 contiguous bytes of a
// partial row), and its 8 warps split the parts (warp y takes y, y + 8, ...; unrolled by 4 so
// 4 x 16 B are in flight per thread), then meet in shared memory in a fixed order: the result
// depends on the part count only, never on timing. The partials are a few MB at most (CTAs x
// cols, sized by the grid, not by the rows), so this costs one L2-resident read of them.
#pragma once
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "activations.cuh"
#include "launch.cuh"
#include "row_io.cuh"

namespace fastlm::cuda {

constexpr int kColumnSumThreads = 32, kColumnSumWarps = 8, kColumnSumVec = 4;

// partial: parts rows of `cols` floats, `ld` floats apart (ld % 4 == 0, partial 16-byte aligned);
// out (cols,) in T.
template <typename T>
__global__ void __launch_bounds__(kColumnSumThreads * kColumnSumWarps)
    column_sum_kernel(const float* __restrict__ partial, int64_t parts, int64_t ld, int64_t cols, T* __restrict__ out) {
  FASTLM_SHARED(float, folded, [kColumnSumWarps][kColumnSumThreads * kColumnSumVec]);
  using Quad = Pack<float, kColumnSumVec>;
  const int64_t c = (int64_t(blockIdx.x) * kColumnSumThreads + threadIdx.x) * kColumnSumVec;
  float s[kColumnSumVec] = {0.0f, 0.0f, 0.0f, 0.0f};
  if (c < cols) {
#pragma unroll 4
    for (int64_t p = threadIdx.y; p < parts; p += kColumnSumWarps) {
      const Quad q = *reinterpret_cast<const Quad*>(partial + p * ld + c);
#pragma unroll
      for (int i = 0; i < kColumnSumVec; ++i) s[i] += q.v[i];
    }
  }
#pragma unroll
  for (int i = 0; i < kColumnSumVec; ++i) folded[threadIdx.y][threadIdx.x * kColumnSumVec + i] = s[i];
  __syncthreads();
  if (threadIdx.y != 0 || c >= cols) return;
  for (int w = 1; w < kColumnSumWarps; ++w) {
#pragma unroll
    for (int i = 0; i < kColumnSumVec; ++i) s[i] += folded[w][threadIdx.x * kColumnSumVec + i];
  }
#pragma unroll
  for (int i = 0; i < kColumnSumVec; ++i) {
    if (c + i < cols) out[c + i] = from_float<T>(s[i]);
  }
}

template <typename T>
inline void launch_column_sum(const float* partial, int64_t parts, int64_t ld, int64_t cols, T* out,
                              cudaStream_t stream) {
  constexpr int64_t kCols = kColumnSumThreads * kColumnSumVec;
  const unsigned blocks = unsigned((cols + kCols - 1) / kCols);
  launch_kernel(column_sum_kernel<T>, dim3(blocks), dim3(kColumnSumThreads, kColumnSumWarps), 0, stream, partial,
                parts, ld, cols, out);
}

// Streaming multiprocessors of the current device: the persistent grids of the row kernels
// are sized by it (and with them the partials above).
inline int sm_count() {
  static int cache[64] = {0};  // per device; a racing fill writes the same value
  int dev = 0;
  cudaGetDevice(&dev);
  if (dev >= 0 && dev < 64 && cache[dev] > 0) return cache[dev];
  int n = 0;
  cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev);
  n = std::max(n, 1);
  if (dev >= 0 && dev < 64) cache[dev] = n;
  return n;
}

}  // namespace fastlm::cuda
