// Pieces shared by the tensor-core attention kernels (attention.cu forward, attention_bwd.cu
// backward): launch parameters, staging of strided (T, D) tiles into shared memory, and the
// visibility rule of fastlm/attention.h for one (query, key) score.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cstdint>
#include <type_traits>

#include "activations.cuh"
#include "fastlm/attention.h"
#include "launch.cuh"

namespace fastlm::cuda::attn {

namespace wmma = nvcuda::wmma;

constexpr int kWarps = 4;
constexpr int kRows = 16 * kWarps;  // query (or key) rows per CTA: 16 per warp

__device__ __forceinline__ float neg_inf() { return -__int_as_float(0x7f800000); }

struct Params {
  AttentionShape sh;
  Strided4 q, k, v, mask;
  void* out;   // forward: written; backward: read (contiguous (B, H, Tq, Dv))
  float* lse;  // forward: written; backward: read
  const void* grad_out = nullptr;  // backward: contiguous (B, H, Tq, Dv)
  float* delta = nullptr;          // backward: rowsum(grad_out * out), (B, H, Tq) scratch
  void* grad_q = nullptr;          // backward outputs, contiguous like q, k, v
  void* grad_k = nullptr;
  void* grad_v = nullptr;
  float* part = nullptr;  // split-KV forward: (B*H, splits, Tq, Dv + 2) partial O, max, sum
  int64_t chunk = 0;      // split-KV forward: keys per split (a multiple of every key tile)
};

// Rows [r0, r0 + rows) x cols [0, HD) of a strided (T, D) matrix into shared memory, zero padded.
template <typename T, int HD>
__device__ __forceinline__ void stage(T* dst, int ld, const T* src, int64_t rs, int64_t cs, int64_t r0, int rows,
                                      int64_t valid_rows, int64_t cols) {
  for (int idx = threadIdx.x; idx < rows * HD; idx += blockDim.x) {
    const int r = idx / HD, c = idx % HD;
    T val = from_float<T>(0.0f);
    if (r0 + r < valid_rows && c < cols) val = src[(r0 + r) * rs + c * cs];
    dst[r * ld + c] = val;
  }
}

// The mask of one (batch, head), as a byte pointer (null without a mask).
template <typename T>
__device__ __forceinline__ const char* head_mask(const Params& p, int64_t b, int64_t h) {
  if (p.mask.data == nullptr) return nullptr;
  const int64_t elt = p.sh.mask_kind == MaskKind::kBool ? 1 : int64_t(sizeof(T));
  return static_cast<const char*>(p.mask.data) + (b * p.mask.s[0] + h * p.mask.s[1]) * elt;
}

// Whether query qi sees key j; adds an additive mask into *s. Out-of-range indices are hidden.
template <typename T>
__device__ __forceinline__ bool visible(const Params& p, const char* mg, int64_t qi, int64_t j, int64_t offset,
                                        float* s) {
  const AttentionShape& sh = p.sh;
  bool ok = qi < sh.tq && j < sh.tk && (sh.causal == Causal::kNone || j <= qi + offset);
  if (ok && sh.mask_kind == MaskKind::kBool) {
    ok = reinterpret_cast<const uint8_t*>(mg)[qi * p.mask.s[2] + j * p.mask.s[3]] != 0;
  } else if (ok && sh.mask_kind == MaskKind::kAdditive) {
    *s += to_float(reinterpret_cast<const T*>(mg)[qi * p.mask.s[2] + j * p.mask.s[3]]);
    ok = *s != neg_inf();
  }
  return ok;
}

// Grids are 1-D over (head, row tile) pairs, tiles fastest, so the CTAs of one head run together
// (its K/V stay in L2) and no head count hits the 65,535 limit of gridDim.y (decode at B = 2048,
// H = 32 has 65,536 heads). tile_head splits blockIdx.x back.
__host__ __device__ constexpr int64_t row_tiles(int64_t rows) { return (rows + kRows - 1) / kRows; }
struct TileHead {
  int64_t tile, head;  // head: the flat (batch, head) index
};
__host__ __device__ inline TileHead tile_head(int64_t block, int64_t rows) {
  const int64_t tiles = row_tiles(rows) > 0 ? row_tiles(rows) : 1;
  return {block % tiles, block / tiles};
}

__host__ __device__ constexpr int64_t max_head_dim(const AttentionShape& sh) {
  return sh.head_dim > sh.value_dim ? sh.head_dim : sh.value_dim;
}

__host__ __device__ constexpr int64_t causal_offset(const AttentionShape& sh) {
  return sh.causal == Causal::kBottomRight ? sh.tk - sh.tq : 0;
}

// C (16 x 16*NC, fp32 in shared memory, ldc) += A (16 x 16*KC, row-major T) * B, where B is
// (16*KC x 16*NC) row-major (B_ROW) or given as its transpose (16*NC x 16*KC) row-major.
template <typename T, int KC, int NC, bool B_ROW>
__device__ __forceinline__ void mma_acc(float* C, int ldc, const T* A, int lda, const T* B, int ldb, bool zero) {
#pragma unroll
  for (int n = 0; n < NC; ++n) {
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    if (zero) wmma::fill_fragment(acc, 0.0f);
    else wmma::load_matrix_sync(acc, C + n * 16, ldc, wmma::mem_row_major);
#pragma unroll
    for (int kk = 0; kk < KC; ++kk) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
      wmma::load_matrix_sync(a, A + kk * 16, lda);
      if constexpr (B_ROW) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> bf;
        wmma::load_matrix_sync(bf, B + kk * 16 * ldb + n * 16, ldb);
        wmma::mma_sync(acc, a, bf, acc);
      } else {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> bf;
        wmma::load_matrix_sync(bf, B + n * 16 * ldb + kk * 16, ldb);
        wmma::mma_sync(acc, a, bf, acc);
      }
    }
    wmma::store_matrix_sync(C + n * 16, acc, ldc, wmma::mem_row_major);
  }
}

}  // namespace fastlm::cuda::attn
