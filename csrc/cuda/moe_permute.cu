// MoE token permutation on CUDA (semantics: csrc/cpu/moe_permute.cpp, fastlm/ops/moe_permute.py).
//
// Forward: a counting sort of the T*k assignments, stable by flat index t*k + slot, in three
// launches after one memset, none of which waits on the host:
//   1. count: a block per chunk of 256 assignments adds each to its (bucket, chunk) cell with an
//      integer atomic; bucket E collects the dropped (-1) ones, so they get the zero-filled tail
//      rows [offsets[E], T*k) by the same arithmetic as kept rows get theirs.
//   2. scan: one block turns the (E+1) x chunks table, bucket-major, into exclusive prefix sums:
//      cell (e, c) becomes the first row of bucket e's assignments from chunk c, and offsets[e] is
//      cell (e, 0). 4096 cells per pass of the 1024 threads (E=64, T*k=64k: 65 x 256 cells, 5 passes).
//   3. place: the chunk's buckets in shared memory; an assignment's rank among the same bucket's
//      earlier assignments of its chunk is a scan of <= 255 broadcast shared reads; then each warp
//      copies whole rows, 16-byte loads when row bytes, row stride and both pointers allow (else
//      4- or 2-byte units), four loads in flight per lane: 2 KiB per warp, the row's bytes read
//      once and written once.
// The reductions (permute backward = unpermute with unit weights, unpermute forward and
// backward) give a token to a warp: its k rows are gathered pack by pack (16-byte packs when
// aligned) and summed in fp32 registers, the slot loop unrolled 4 deep (4 rows' 16-byte loads in
// flight per lane, 16 KiB per block of 8 warps, SASS: 4 LDG.128 per iteration); the backward writes each
// referenced row once, reduces dot(y_row, grad_out) with a fixed shuffle tree, and a second
// kernel zero-fills the rows nobody references (marked in a byte map), so each output byte is
// written exactly once and no float atomics are used: results are the same every run.
#include <cuda_runtime.h>

#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include "fastlm/moe.h"
#include "launch.cuh"
#include "row_io.cuh"

namespace fastlm::cuda {
namespace {

constexpr int kChunk = 256;          // assignments per block of count / place (one per thread)
constexpr int kScanThreads = 1024, kScanItems = 4;
constexpr int kRowWarps = 8, kRowThreads = kRowWarps * 32;

struct alignas(16) Bytes16 {
  uint32_t w[4];
};

// The bucket of assignment a: its expert, or E for dropped (-1) and out-of-range ids.
__device__ __forceinline__ int bucket_of(const int32_t* __restrict__ ids, int64_t s0, int64_t s1, int64_t k, int E,
                                         int64_t a) {
  const int32_t e = ids[(a / k) * s0 + (a % k) * s1];
  return e >= 0 && e < E ? e : E;
}

__global__ void __launch_bounds__(kChunk)
    count_kernel(int64_t n, int64_t k, int E, const int32_t* __restrict__ ids, int64_t s0, int64_t s1,
                 int32_t* __restrict__ table, int64_t chunks) {
  const int64_t a = int64_t(blockIdx.x) * kChunk + threadIdx.x;
  if (a < n) atomicAdd(&table[bucket_of(ids, s0, s1, k, E, a) * chunks + blockIdx.x], 1);  // integers: order-free
}

// Exclusive prefix sum of table[0, cells) in place (one block), then offsets[e] = table[e * chunks].
__global__ void __launch_bounds__(kScanThreads)
    scan_kernel(int32_t* __restrict__ table, int64_t cells, int64_t chunks, int E, int32_t* __restrict__ offsets) {
  FASTLM_SHARED(int32_t, warp_sums, [kScanThreads / 32]);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  int32_t carry = 0;
  for (int64_t base = 0; base < cells; base += int64_t(kScanThreads) * kScanItems) {
    const int64_t i0 = base + int64_t(threadIdx.x) * kScanItems;
    int32_t v[kScanItems], local = 0;
#pragma unroll
    for (int j = 0; j < kScanItems; ++j) {
      v[j] = i0 + j < cells ? table[i0 + j] : 0;
      local += v[j];
    }
    int32_t inclusive = local;
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
      const int32_t o = __shfl_up_sync(0xffffffffu, inclusive, off);
      if (lane >= off) inclusive += o;
    }
    if (lane == 31) warp_sums[warp] = inclusive;
    __syncthreads();
    if (warp == 0) {
      int32_t w = warp_sums[lane];
#pragma unroll
      for (int off = 1; off < 32; off <<= 1) {
        const int32_t o = __shfl_up_sync(0xffffffffu, w, off);
        if (lane >= off) w += o;
      }
      warp_sums[lane] = w;  // inclusive over warps
    }
    __syncthreads();
    int32_t running = carry + inclusive - local + (warp ? warp_sums[warp - 1] : 0);
    carry += warp_sums[kScanThreads / 32 - 1];
    __syncthreads();  // warp_sums is rewritten by the next pass
#pragma unroll
    for (int j = 0; j < kScanItems; ++j) {
      if (i0 + j < cells) table[i0 + j] = running;
      running += v[j];
    }
  }
  __syncthreads();  // offsets read cells other threads wrote
  for (int e = threadIdx.x; e <= E; e += kScanThreads) offsets[e] = table[int64_t(e) * chunks];
}

// Copies (or zero-fills, when src is null) one row of `units` U's with the warp's 32 lanes.
template <typename U>
__device__ __forceinline__ void copy_row(const U* __restrict__ src, U* __restrict__ dst, int64_t units) {
  const int lane = threadIdx.x % 32;
  int64_t i = lane;
  if (src) {
    for (; i + 96 < units; i += 128) {  // four loads in flight before the stores
      const U a = src[i], b = src[i + 32], c = src[i + 64], d = src[i + 96];
      dst[i] = a;
      dst[i + 32] = b;
      dst[i + 64] = c;
      dst[i + 96] = d;
    }
    for (; i < units; i += 32) dst[i] = src[i];
  } else {
    const U zero{};
    for (; i < units; i += 32) dst[i] = zero;
  }
}

template <typename U>
__global__ void __launch_bounds__(kChunk)
    place_kernel(int64_t n, int64_t k, int E, const int32_t* __restrict__ ids, int64_t s0, int64_t s1,
                 const int32_t* __restrict__ table, int64_t chunks, const U* __restrict__ x, int64_t x_stride,
                 int64_t units, U* __restrict__ x_sorted, int32_t* __restrict__ row_index) {
  FASTLM_SHARED(int32_t, bucket, [kChunk]);
  FASTLM_SHARED(int32_t, row, [kChunk]);
  const int i = threadIdx.x;
  const int64_t first = int64_t(blockIdx.x) * kChunk, a = first + i;
  const int b = a < n ? bucket_of(ids, s0, s1, k, E, a) : -1;
  bucket[i] = b;
  __syncthreads();
  if (a < n) {
    int rank = 0;
    for (int j = 0; j < i; ++j) rank += bucket[j] == b;
    const int32_t r = table[int64_t(b) * chunks + blockIdx.x] + rank;
    row[i] = r;
    row_index[a] = b < E ? r : -1;
  }
  __syncthreads();
  const int in_chunk = int(n - first < kChunk ? n - first : kChunk);
  for (int j = threadIdx.x / 32; j < in_chunk; j += kChunk / 32) {
    const U* src = bucket[j] < E ? x + ((first + j) / k) * x_stride : nullptr;
    copy_row(src, x_sorted + int64_t(row[j]) * units, units);
  }
}

template <typename U>
void permute_t(int64_t n, int64_t k, int E, const int32_t* ids, int64_t s0, int64_t s1, int32_t* table,
               int64_t chunks, const void* x, int64_t x_stride_bytes, int64_t row_bytes, void* x_sorted,
               int32_t* row_index, cudaStream_t stream) {
  launch_kernel(place_kernel<U>, unsigned(chunks), kChunk, 0, stream, n, k, E, ids, s0, s1,
                static_cast<const int32_t*>(table), chunks, static_cast<const U*>(x),
                x_stride_bytes / int64_t(sizeof(U)), row_bytes / int64_t(sizeof(U)), static_cast<U*>(x_sorted),
                row_index);
}

// ---------------------------------------------------------------- the reductions (a warp per token)
__device__ __forceinline__ bool row_ok(int32_t r, int64_t rows) { return r >= 0 && r < rows; }

template <typename T, int VEC>
__global__ void __launch_bounds__(kRowThreads)
    gather_kernel(int64_t tokens, int64_t k, int64_t H, int64_t rows, const T* __restrict__ y, int64_t ys,
                  const int32_t* __restrict__ ri, int64_t ri0, int64_t ri1, const float* __restrict__ w, int64_t w0,
                  int64_t w1, T* __restrict__ out, int64_t os) {
  const int lane = threadIdx.x % 32;
  const int64_t t = int64_t(blockIdx.x) * kRowWarps + threadIdx.x / 32;
  if (t >= tokens) return;
  for (int64_t c = int64_t(lane) * VEC; c < H; c += 32 * VEC) {
    float acc[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) acc[i] = 0.0f;
    for (int64_t s = 0; s < k; ++s) {
      const int32_t r = ri[t * ri0 + s * ri1];
      if (!row_ok(r, rows)) continue;
      const float wt = w ? w[t * w0 + s * w1] : 1.0f;
      const Pack<T, VEC> p = *reinterpret_cast<const Pack<T, VEC>*>(y + r * ys + c);
#pragma unroll
      for (int i = 0; i < VEC; ++i) acc[i] += wt * to_float(p.v[i]);
    }
    Pack<T, VEC> o;
#pragma unroll
    for (int i = 0; i < VEC; ++i) o.v[i] = from_float<T>(acc[i]);
    *reinterpret_cast<Pack<T, VEC>*>(out + t * os + c) = o;
  }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kRowThreads)
    scatter_kernel(int64_t tokens, int64_t k, int64_t H, int64_t rows, const T* __restrict__ go, int64_t gos,
                   const T* __restrict__ y, int64_t ys, const int32_t* __restrict__ ri, int64_t ri0, int64_t ri1,
                   const float* __restrict__ w, int64_t w0, int64_t w1, T* __restrict__ gy, int64_t gys,
                   float* __restrict__ gw) {
  const int lane = threadIdx.x % 32;
  const int64_t t = int64_t(blockIdx.x) * kRowWarps + threadIdx.x / 32;
  if (t >= tokens) return;
  for (int64_t s = 0; s < k; ++s) {
    const int32_t r = ri[t * ri0 + s * ri1];
    if (!row_ok(r, rows)) {
      if (lane == 0) gw[t * k + s] = 0.0f;
      continue;
    }
    const float wt = w[t * w0 + s * w1];
    float dot = 0.0f;
    for (int64_t c = int64_t(lane) * VEC; c < H; c += 32 * VEC) {
      const Pack<T, VEC> g = *reinterpret_cast<const Pack<T, VEC>*>(go + t * gos + c);
      const Pack<T, VEC> yv = *reinterpret_cast<const Pack<T, VEC>*>(y + r * ys + c);
      Pack<T, VEC> o;
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        const float gf = to_float(g.v[i]);
        o.v[i] = from_float<T>(wt * gf);
        dot += gf * to_float(yv.v[i]);
      }
      *reinterpret_cast<Pack<T, VEC>*>(gy + r * gys + c) = o;
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, off);
    if (lane == 0) gw[t * k + s] = dot;
  }
}

__global__ void __launch_bounds__(kRowThreads)
    mark_kernel(int64_t tokens, int64_t k, int64_t rows, const int32_t* __restrict__ ri, int64_t ri0, int64_t ri1,
                uint8_t* __restrict__ referenced) {
  const int64_t a = int64_t(blockIdx.x) * kRowThreads + threadIdx.x;
  if (a >= tokens * k) return;
  const int32_t r = ri[(a / k) * ri0 + (a % k) * ri1];
  if (row_ok(r, rows)) referenced[r] = 1;
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kRowThreads)
    zero_unreferenced_kernel(int64_t rows, int64_t H, const uint8_t* __restrict__ referenced, T* __restrict__ gy,
                             int64_t gys) {
  const int lane = threadIdx.x % 32;
  const int64_t r = int64_t(blockIdx.x) * kRowWarps + threadIdx.x / 32;
  if (r >= rows || referenced[r]) return;
  Pack<T, VEC> zero;
#pragma unroll
  for (int i = 0; i < VEC; ++i) zero.v[i] = from_float<T>(0.0f);
  for (int64_t c = int64_t(lane) * VEC; c < H; c += 32 * VEC)
    *reinterpret_cast<Pack<T, VEC>*>(gy + r * gys + c) = zero;
}

inline unsigned blocks_for(int64_t n, int64_t per_block) { return unsigned((n + per_block - 1) / per_block); }

// Calls launch(integral_constant<VEC>): 16-byte packs when H, every row stride and every pointer
// are pack-aligned, else single elements.
template <typename T, typename F>
void with_vec(int64_t H, std::initializer_list<int64_t> strides, std::initializer_list<const void*> ptrs, F&& launch) {
  bool packs = H % kVec<T> == 0;
  for (int64_t s : strides) packs = packs && s % kVec<T> == 0;
  for (const void* p : ptrs) packs = packs && reinterpret_cast<uintptr_t>(p) % 16 == 0;
  if (packs) launch(std::integral_constant<int, kVec<T>>{});
  else launch(std::integral_constant<int, 1>{});
}

template <typename T>
void gather_t(int64_t tokens, int64_t k, int64_t H, int64_t rows, const void* y, int64_t ys, const int32_t* ri,
              int64_t ri0, int64_t ri1, const float* w, int64_t w0, int64_t w1, void* out, int64_t os,
              cudaStream_t stream) {
  with_vec<T>(H, {ys, os}, {y, out}, [&](auto vec) {
    launch_kernel(gather_kernel<T, vec.value>, blocks_for(tokens, kRowWarps), kRowThreads, 0, stream, tokens, k, H,
                  rows, static_cast<const T*>(y), ys, ri, ri0, ri1, w, w0, w1, static_cast<T*>(out), os);
  });
}

template <typename T>
void scatter_t(int64_t tokens, int64_t k, int64_t H, int64_t rows, const void* go, int64_t gos, const void* y,
               int64_t ys, const int32_t* ri, int64_t ri0, int64_t ri1, const float* w, int64_t w0, int64_t w1,
               void* gy, int64_t gys, float* gw, const uint8_t* referenced, cudaStream_t stream) {
  with_vec<T>(H, {gos, ys, gys}, {go, y, gy}, [&](auto vec) {
    if (tokens > 0)
      launch_kernel(scatter_kernel<T, vec.value>, blocks_for(tokens, kRowWarps), kRowThreads, 0, stream, tokens, k,
                    H, rows, static_cast<const T*>(go), gos, static_cast<const T*>(y), ys, ri, ri0, ri1, w, w0, w1,
                    static_cast<T*>(gy), gys, gw);
    if (rows > 0)
      launch_kernel(zero_unreferenced_kernel<T, vec.value>, blocks_for(rows, kRowWarps), kRowThreads, 0, stream,
                    rows, H, referenced, static_cast<T*>(gy), gys);
  });
}

}  // namespace
}  // namespace fastlm::cuda

namespace fastlm {

namespace {
int64_t permute_chunks(int64_t tokens, int64_t top_k) { return (tokens * top_k + cuda::kChunk - 1) / cuda::kChunk; }
}  // namespace

size_t moe_permute_workspace_bytes_cuda(int64_t tokens, int64_t top_k, int64_t experts) {
  return sizeof(int32_t) * size_t(experts + 1) * size_t(permute_chunks(tokens, top_k));
}

int moe_permute_forward_cuda(int64_t tokens, int64_t top_k, int64_t experts, const int32_t* expert_ids,
                             int64_t ids_stride0, int64_t ids_stride1, const void* x, int64_t x_stride_bytes,
                             int64_t row_bytes, void* x_sorted, int32_t* row_index, int32_t* offsets,
                             void* workspace, cudaStream_t stream) {
  using namespace cuda;
  const int64_t n = tokens * top_k, chunks = permute_chunks(tokens, top_k), cells = (experts + 1) * chunks;
  const int E = int(experts);
  if (n == 0) {
    cudaMemsetAsync(offsets, 0, sizeof(int32_t) * size_t(experts + 1), stream);
    return int(cudaGetLastError());
  }
  int32_t* table = static_cast<int32_t*>(workspace);
  cudaMemsetAsync(table, 0, sizeof(int32_t) * size_t(cells), stream);
  launch_kernel(count_kernel, unsigned(chunks), kChunk, 0, stream, n, top_k, E, expert_ids, ids_stride0, ids_stride1,
                table, chunks);
  launch_kernel(scan_kernel, 1u, kScanThreads, 0, stream, table, cells, chunks, E, offsets);
  auto fits = [&](int64_t unit) {
    return row_bytes % unit == 0 && x_stride_bytes % unit == 0 && reinterpret_cast<uintptr_t>(x) % unit == 0 &&
           reinterpret_cast<uintptr_t>(x_sorted) % unit == 0;
  };
  if (fits(16))
    permute_t<Bytes16>(n, top_k, E, expert_ids, ids_stride0, ids_stride1, table, chunks, x, x_stride_bytes,
                       row_bytes, x_sorted, row_index, stream);
  else if (fits(4))
    permute_t<uint32_t>(n, top_k, E, expert_ids, ids_stride0, ids_stride1, table, chunks, x, x_stride_bytes,
                        row_bytes, x_sorted, row_index, stream);
  else
    permute_t<uint16_t>(n, top_k, E, expert_ids, ids_stride0, ids_stride1, table, chunks, x, x_stride_bytes,
                        row_bytes, x_sorted, row_index, stream);
  return int(cudaGetLastError());
}

int moe_unpermute_forward_cuda(DType dtype, int64_t tokens, int64_t top_k, int64_t hidden, int64_t rows,
                               const void* y_sorted, int64_t y_stride, const int32_t* row_index, int64_t ri_stride0,
                               int64_t ri_stride1, const float* weights, int64_t w_stride0, int64_t w_stride1,
                               void* out, int64_t out_stride, cudaStream_t stream) {
  if (tokens == 0 || hidden == 0) return 0;
  auto gather = [&](auto zero) {
    cuda::gather_t<decltype(zero)>(tokens, top_k, hidden, rows, y_sorted, y_stride, row_index, ri_stride0,
                                   ri_stride1, weights, w_stride0, w_stride1, out, out_stride, stream);
  };
  switch (dtype) {
    case DType::kFloat32: gather(float{}); break;
    case DType::kFloat16: gather(__half{}); break;
    case DType::kBFloat16: gather(__nv_bfloat16{}); break;
  }
  return int(cudaGetLastError());
}

int moe_unpermute_backward_cuda(DType dtype, int64_t tokens, int64_t top_k, int64_t hidden, int64_t rows,
                                const void* grad_out, int64_t go_stride, const void* y_sorted, int64_t y_stride,
                                const int32_t* row_index, int64_t ri_stride0, int64_t ri_stride1,
                                const float* weights, int64_t w_stride0, int64_t w_stride1, void* grad_y_sorted,
                                int64_t gy_stride, float* grad_weights, uint8_t* referenced, cudaStream_t stream) {
  using namespace cuda;
  if (rows == 0 && tokens * top_k == 0) return 0;
  if (hidden == 0) {  // no rows to write; the dots are empty sums
    if (tokens * top_k) cudaMemsetAsync(grad_weights, 0, sizeof(float) * size_t(tokens * top_k), stream);
    return int(cudaGetLastError());
  }
  if (rows > 0) {
    cudaMemsetAsync(referenced, 0, size_t(rows), stream);
    if (tokens * top_k > 0)
      launch_kernel(mark_kernel, blocks_for(tokens * top_k, kRowThreads), kRowThreads, 0, stream, tokens, top_k, rows,
                    row_index, ri_stride0, ri_stride1, referenced);
  }
  auto scatter = [&](auto zero) {
    scatter_t<decltype(zero)>(tokens, top_k, hidden, rows, grad_out, go_stride, y_sorted, y_stride, row_index,
                              ri_stride0, ri_stride1, weights, w_stride0, w_stride1, grad_y_sorted, gy_stride,
                              grad_weights, referenced, stream);
  };
  switch (dtype) {
    case DType::kFloat32: scatter(float{}); break;
    case DType::kFloat16: scatter(__half{}); break;
    case DType::kBFloat16: scatter(__nv_bfloat16{}); break;
  }
  return int(cudaGetLastError());
}

}  // namespace fastlm
