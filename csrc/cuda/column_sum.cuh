// The last step of a deterministic column reduction (grad_weight / grad_bias of the norms,
// grad_bias of bias_act): the main kernel leaves one fp32 partial row per CTA, summed in
// registers over the rows that CTA visited; this sums those `parts` rows column by column.
// A block owns 32 adjacent columns (each warp reads 128 contiguous bytes of a partial row) and
// its 8 warps split the parts (warp y takes y, y + 8, ...; unrolled by 4 so 4 loads are in
// flight per thread), then meet in shared memory in a fixed order: the result depends on the
// part count only, never on timing. The partials are a few MB at most (CTAs x cols, sized by
// the grid, not by the rows), so this costs one L2-resident read of them.
#pragma once
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "activations.cuh"
#include "launch.cuh"

namespace fastlm::cuda {

constexpr int kColumnSumCols = 32, kColumnSumWarps = 8;

// partial: parts rows of `cols` floats, `ld` floats apart; out (cols,) in T.
template <typename T>
__global__ void __launch_bounds__(kColumnSumCols * kColumnSumWarps)
    column_sum_kernel(const float* __restrict__ partial, int64_t parts, int64_t ld, int64_t cols, T* __restrict__ out) {
  FASTLM_SHARED(float, folded, [kColumnSumWarps][kColumnSumCols]);
  const int64_t c = int64_t(blockIdx.x) * kColumnSumCols + threadIdx.x;
  float s = 0.0f;
  if (c < cols) {
#pragma unroll 4
    for (int64_t p = threadIdx.y; p < parts; p += kColumnSumWarps) s += partial[p * ld + c];
  }
  folded[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y != 0 || c >= cols) return;
  for (int w = 1; w < kColumnSumWarps; ++w) s += folded[w][threadIdx.x];
  out[c] = from_float<T>(s);
}

template <typename T>
inline void launch_column_sum(const float* partial, int64_t parts, int64_t ld, int64_t cols, T* out,
                              cudaStream_t stream) {
  const unsigned blocks = unsigned((cols + kColumnSumCols - 1) / kColumnSumCols);
  launch_kernel(column_sum_kernel<T>, dim3(blocks), dim3(kColumnSumCols, kColumnSumWarps), 0, stream, partial,
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
