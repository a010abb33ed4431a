// Pieces shared by the tensor-core attention kernels (attention.cu forward, attention_bwd.cu
// backward): launch parameters, the 1-D grid's (head, tile) split, and the index math of row
// groups (GQA packing), key ranges and tile classes, as __host__ __device__ helpers.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "activations.cuh"
#include "fastlm/attention.h"
#include "launch.cuh"
#include "ptx.cuh"

namespace fastlm::cuda::attn {

constexpr int kWarps = 4, kThreads = kWarps * 32;
constexpr int kRows = 16 * kWarps;  // query (or key) rows per CTA: 16 per warp
constexpr int kPad = 8;             // halves of padding per shared row: an ldmatrix phase's 8 rows in distinct banks
constexpr float kLog2e = 1.4426950408889634f;

__device__ __forceinline__ float neg_inf() { return -__int_as_float(0x7f800000); }

// Soft-capping: tanh(x) = 1 - 2 r with r = 1 / (2^y + 1), y = 2 log2(e) x, on one MUFU.EX2 and one
// fast reciprocal, ~1e-7 absolute (as the CPU kernels' vtanh). No clamp is needed: 2^y = inf
// gives r = 0 (tanh 1), 2^y = 0 gives r = 1 (tanh -1), and NaN stays NaN.
__device__ __forceinline__ float tanh_rcp(float y) { return __fdividef(1.0f, exp2_approx(y) + 1.0f); }

struct Params {
  AttentionShape sh;
  Strided4 q, k, v, mask;
  void* out;   // forward: written; backward: read (contiguous (B, H, Tq, Dv))
  float* lse;  // forward: written; backward: read
  Strided4 dout{};                 // backward: grad_out, rows 16-byte aligned like q, k, v
  float* delta = nullptr;          // backward: rowsum(grad_out * out), (B, H, Tq) scratch
  void* grad_q = nullptr;          // backward outputs, contiguous like q, k, v
  void* grad_k = nullptr;
  void* grad_v = nullptr;
  float* part = nullptr;  // split-KV forward: (B*H, splits, Tq, Dv + 2) partial O, max, sum
  int64_t chunk = 0;      // split-KV forward: keys per split (a multiple of every key tile)
  float* dq_acc = nullptr;   // backward: fp32 (B, H, Tq, D) dQ sums, zeroed, then scaled into grad_q
  int* dq_turn = nullptr;    // backward: per (b, h, query tile), the key tile whose turn it is to add
  int* cta_ticket = nullptr; // backward: zeroed counter handing out (head, key tile) in start order
  float* dkv_part = nullptr; // backward, head_splits > 1: fp32 (B, Hkv, splits, Tk, D + Dv) partials
  int64_t head_splits = 1;   // backward: CTAs sharing one KV head's group of query heads
  // softcap > 0 (set_softcap): y = cap_in * s for a raw product s (tanh_rcp), and the capped
  // score in log2 units is cap_out * tanh. Kernel parameters, so the FMULs read them from the
  // constant bank and they take no registers.
  float cap_in = 0.0f, cap_out = 0.0f;
};

inline void set_softcap(Params& p) {
  if (p.sh.softcap > 0.0f) p.cap_in = 2.0f * kLog2e * p.sh.scale / p.sh.softcap, p.cap_out = p.sh.softcap * kLog2e;
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

// ---- The flash-attention-2 kernels' index math (attention.cu), host-testable.
// Query rows of a CTA come from a "row group": one query head (prefill), or, for decode-like
// calls (Tq <= kPackMaxTq) under GQA, the G query heads that share one KV head, packed as row
// r = g * Tq + t. Packing makes one CTA read each K/V tile once for the whole group and fills
// the 64-row tile with real queries instead of 1 row and 63 of padding.
constexpr int64_t kPackMaxTq = 16;
__host__ __device__ constexpr int64_t packed_heads(const AttentionShape& sh) {
  return sh.tq <= kPackMaxTq && sh.heads > sh.kv_heads ? sh.heads / sh.kv_heads : 1;
}
struct RowGroup {
  int64_t batch, head0, kv_head, rows;  // rows = packed heads * Tq
};
__host__ __device__ inline RowGroup row_group(const AttentionShape& sh, int64_t group) {
  const int64_t pack = packed_heads(sh), per_batch = sh.heads / pack;
  const int64_t h0 = group % per_batch * pack;
  return {group / per_batch, h0, h0 / (sh.heads / sh.kv_heads), pack * sh.tq};
}
struct QueryRow {
  int64_t head, t;  // query head and position of packed row r
};
__host__ __device__ inline QueryRow query_row(const AttentionShape& sh, const RowGroup& g, int64_t r) {
  return {g.head0 + r / sh.tq, r % sh.tq};
}

// The keys a CTA walks, [lo, hi). A tile [j0, j0 + bn) of them is full (no visibility test at
// all; full_tiles_end) when no user mask exists, it lies inside Tk and, under causal, its last
// key is visible to the CTA's first query: j0 + bn - 1 <= t_min + offset.
struct KeyRange {
  int64_t lo, hi;  // keys to visit; hi <= lo: none
  int64_t t_min;   // smallest query position among the CTA's rows
};
__host__ __device__ inline KeyRange key_range(const AttentionShape& sh, int64_t rows, int64_t r0, int64_t rows_per_cta,
                                              int64_t split_lo, int64_t split_hi) {
  const bool packed = rows > sh.tq;
  const int64_t last = r0 + rows_per_cta < rows ? r0 + rows_per_cta : rows;  // one past the CTA's last row
  const int64_t t_min = packed ? 0 : r0, t_max = packed ? sh.tq - 1 : last - 1;
  int64_t hi = sh.tk < split_hi ? sh.tk : split_hi;
  if (sh.causal != Causal::kNone) {
    const int64_t seen = t_max + causal_offset(sh) + 1;  // keys [0, seen) visible to some row
    hi = seen < hi ? seen : hi;
  }
  return {split_lo, hi, t_min};
}
// Backward: the first query tile (of bm queries) with a query that sees key j0 under causal.
// Non-decreasing in j0, so the key tiles adding into one query tile's dQ are a prefix 0..n of
// the key tiles: what lets them take turns in key-tile order (attention_bwd.cu).
__host__ __device__ inline int64_t first_query_tile(const AttentionShape& sh, int64_t j0, int64_t bm) {
  if (sh.causal == Causal::kNone) return 0;
  const int64_t t = j0 - causal_offset(sh);  // the first query that sees key j0
  return (t > 0 ? t : 0) / bm;
}

// Backward: the query tiles [lo, hi) in which every query sees every key of [j0, j0 + bn) (no
// user mask, the keys inside Tk, the queries inside Tq, under causal past the diagonal): the
// maskless ones. Outside them (the diagonal before, a ragged Tq after) tiles are masked.
struct QueryTiles {
  int64_t lo, hi;
};
__host__ __device__ inline QueryTiles full_query_tiles(const AttentionShape& sh, int64_t j0, int64_t bn, int64_t bm) {
  if (sh.mask_kind != MaskKind::kNone || j0 + bn > sh.tk) return {0, 0};
  int64_t lo = 0;
  if (sh.causal != Causal::kNone) {  // m * bm >= j0 + bn - 1 - offset
    const int64_t first = j0 + bn - 1 - causal_offset(sh);
    lo = first > 0 ? (first + bm - 1) / bm : 0;
  }
  const int64_t hi = sh.tq / bm;  // tiles wholly inside Tq
  return {lo, hi > lo ? hi : lo};
}

// Full tiles come first (the conditions only get harder as j0 grows): the walk from kr.lo in
// steps of bn is full exactly before this key. A scale <= 0 (or NaN) makes every tile partial:
// full tiles take the max of unscaled scores.
__host__ __device__ inline int64_t full_tiles_end(const AttentionShape& sh, const KeyRange& kr, int64_t bn) {
  if (sh.mask_kind != MaskKind::kNone || !(sh.scale > 0.0f)) return kr.lo;
  int64_t last = sh.tk - bn;  // the last full tile's first key
  if (sh.causal != Causal::kNone && kr.t_min + causal_offset(sh) - bn + 1 < last) last = kr.t_min + causal_offset(sh) - bn + 1;
  if (last < kr.lo) return kr.lo;
  const int64_t end = kr.lo + ((last - kr.lo) / bn + 1) * bn;
  return end < kr.hi ? end : (kr.hi > kr.lo ? kr.hi : kr.lo);
}

// ROWS x HD of a (rows, d) operand into shared memory (rows HD + kPad apart) as 16-byte
// cp.async chunks; row_ptr(r) is a row's global address, or null past the end (zero fill, read
// from row 0: cp.async's source must be a global address even when it copies 0 bytes).
// Columns past d zero-fill too. Rows must be 16-byte aligned (the bindings make them so).
template <typename T, int HD, int ROWS, typename RowPtr>
__device__ __forceinline__ void load_rows(T* dst, int64_t d, RowPtr row_ptr) {
  constexpr int kChunks = HD / 8;
  const T* row0 = row_ptr(0);  // a CTA's first row always exists: the zero-fill chunks' (global) source
#pragma unroll
  for (int i = 0; i < (ROWS * kChunks + kThreads - 1) / kThreads; ++i) {
    const int idx = threadIdx.x + i * kThreads;
    if (ROWS * kChunks % kThreads != 0 && idx >= ROWS * kChunks) break;
    const int r = idx / kChunks, c = idx % kChunks * 8;
    const T* src = row_ptr(r);
    const int64_t left = d - c;
    const int bytes = src == nullptr || left <= 0 ? 0 : (left >= 8 ? 16 : int(left) * 2);
    cp_async16(dst + r * (HD + kPad) + c, bytes > 0 ? src + c : row0, bytes);
  }
}

// Warp-level GEMMs on mma.sync.m16n8k16 fragments (PTX ISA layouts: lane l holds rows l / 4 and
// l / 4 + 8 of a C fragment, columns 2 (l % 4) + {0, 1}).
// acc (16 x 8*NT fp32 C fragments) += A (16 x K, given as K/16 fragment sets a[ks]) times B, where
// B (K x 8*NT) is read from a [k][n] row-major shared tile by ldmatrix.trans. keep(ks, lo, hi)
// may clear 16-bit halves of the B fragments: lo covers k rows ks*16 + 2 (l % 4) + {0, 1}, hi
// the same + 8 (how a key nobody sees is kept out of the product, NaN included).
struct KeepAll {
  __device__ __forceinline__ void operator()(int, uint32_t&, uint32_t&) const {}
};
template <typename T, int KS, int NT, typename Keep = KeepAll>
__device__ __forceinline__ void mma_ab_trans(float (&acc)[NT][4], const uint32_t (&a)[KS][4], const T* b, int ldb,
                                             int lane, Keep keep = {}) {
#pragma unroll
  for (int ks = 0; ks < KS; ++ks) {
    uint32_t lo = 0xffffffffu, hi = 0xffffffffu;
    keep(ks, lo, hi);
#pragma unroll
    for (int n = 0; n < NT; n += 2) {
      uint32_t f[4];
      ldmatrix_x4_trans(f, b + (ks * 16 + (lane / 8) % 2 * 8 + lane % 8) * ldb + n * 8 + lane / 16 * 8);
      mma_m16n8k16<T>(acc[n], a[ks], f[0] & lo, f[1] & hi);
      mma_m16n8k16<T>(acc[n + 1], a[ks], f[2] & lo, f[3] & hi);
    }
  }
}

// acc (16 x 8*NT) = A B^T: A rows at a (16 x HD, row-major), B^T rows at b (8*NT x HD, row-major).
template <typename T, int HD, int NT>
__device__ __forceinline__ void mma_abt(float (&acc)[NT][4], const T* a, const T* b, int ld, int lane) {
#pragma unroll
  for (int n = 0; n < NT; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.0f;
#pragma unroll
  for (int kk = 0; kk < HD / 16; ++kk) {
    uint32_t fa[4];
    ldmatrix_x4(fa, a + (lane % 16) * ld + kk * 16 + lane / 16 * 8);
#pragma unroll
    for (int n = 0; n < NT; n += 2) {
      uint32_t fb[4];
      ldmatrix_x4(fb, b + (n * 8 + lane / 16 * 8 + lane % 8) * ld + kk * 16 + (lane / 8) % 2 * 8);
      mma_m16n8k16<T>(acc[n], fa, fb[0], fb[1]);
      mma_m16n8k16<T>(acc[n + 1], fa, fb[2], fb[3]);
    }
  }
}

// C fragments (16 x 8*NT, fp32) repacked as A fragments (16 x 16 per k step) of T.
template <typename T, int NT>
__device__ __forceinline__ void as_a_fragments(uint32_t (&a)[NT / 2][4], const float (&c)[NT][4]) {
#pragma unroll
  for (int ks = 0; ks < NT / 2; ++ks) {
    a[ks][0] = pack2<T>(c[2 * ks][0], c[2 * ks][1]);
    a[ks][1] = pack2<T>(c[2 * ks][2], c[2 * ks][3]);
    a[ks][2] = pack2<T>(c[2 * ks + 1][0], c[2 * ks + 1][1]);
    a[ks][3] = pack2<T>(c[2 * ks + 1][2], c[2 * ks + 1][3]);
  }
}


// The 16-bit halves of a B fragment register to keep, from bits `bit` and `bit + 1` of `live`.
__device__ __forceinline__ uint32_t keep_halves(uint64_t live, int bit) {
  return (live >> bit & 1 ? 0xffffu : 0u) | (live >> (bit + 1) & 1 ? 0xffff0000u : 0u);
}

// Loads ROWS x HD tiles of consecutive rows src + r * stride (r < valid_rows, >= 1, are real; the
// rest zero-fill) by 16-byte cp.async. Built once per kernel for one operand width d: where a
// thread's chunk column is the same in every pass (HD / 8 divides the block), the column's byte
// count is computed once and each chunk costs a compare, two 64-bit selects and an add. Rows
// past valid_rows re-read the tile's row 0 with src-size 0, so no address leaves the tensor.
template <typename T, int HD, int ROWS>
struct TileLoader {
  static constexpr int kChunks = HD / 8, kPasses = (ROWS * kChunks + kThreads - 1) / kThreads;
  static constexpr bool kFixedColumn = kThreads % kChunks == 0;
  int r0, c0, bytes0;  // this thread's first row, its column (0 where it is past d) and bytes there
  __device__ __forceinline__ static int column_bytes(int64_t d, int c) {
    const int64_t left = d - c;
    return left <= 0 ? 0 : (left >= 8 ? 16 : int(left) * 2);
  }
  __device__ __forceinline__ explicit TileLoader(int64_t d)
      : r0(threadIdx.x / kChunks), c0(threadIdx.x % kChunks * 8), bytes0(column_bytes(d, c0)) {
    if (bytes0 == 0) c0 = 0;
  }
  __device__ __forceinline__ void operator()(T* dst, const T* src, int64_t stride, int valid_rows, int64_t d) const {
    if constexpr (kFixedColumn) {
      constexpr int kRowStep = kThreads / kChunks;
      const int col = int(threadIdx.x % kChunks * 8);
#pragma unroll
      for (int i = 0; i < kPasses; ++i) {
        const int r = r0 + i * kRowStep;
        if (ROWS % kRowStep != 0 && r >= ROWS) break;
        const bool in = r < valid_rows;
        cp_async16(dst + r * (HD + kPad) + col, src + (in ? r * stride : 0) + c0, in ? bytes0 : 0);
      }
    } else {
#pragma unroll
      for (int i = 0; i < kPasses; ++i) {
        const int idx = threadIdx.x + i * kThreads;
        if (ROWS * kChunks % kThreads != 0 && idx >= ROWS * kChunks) break;
        const int r = idx / kChunks, c = idx % kChunks * 8, bytes = column_bytes(d, c);
        const bool in = r < valid_rows && bytes > 0;
        cp_async16(dst + r * (HD + kPad) + c, src + (in ? r * stride + c : 0), in ? bytes : 0);
      }
    }
  }
};

}  // namespace fastlm::cuda::attn
