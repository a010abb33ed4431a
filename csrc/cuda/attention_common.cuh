// Pieces shared by the tensor-core attention kernels (attention.cu forward, attention_bwd.cu
// backward): launch parameters, the 1-D grid's (head, tile) split, and the index math of row
// groups (GQA packing), key ranges and tile classes, as __host__ __device__ helpers. Causal
// masks and sliding windows are one band of visible keys around the diagonal (band), so loop
// bounds, tile classes and per-score tests agree by construction; ALiBi's bias is computed in
// the kernels from the slope (alibi_slope2). Varlen and KV-cache calls give each CTA its own
// problem (seq_span, seq_shape): the same helpers then run on a sequence's Tq and Tk.
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
  // Where rows live, as (batch, head, row) strides counted in rows (set_layouts): out and grad_q
  // (rows of Dv / D elements), lse (floats), grad_k and grad_v (rows of D / Dv). The row of query
  // t of batch b is q0 + t, q0 the sequence's first packed row (0 unless varlen), likewise keys.
  int64_t out_s[3] = {0, 0, 0}, lse_s[3] = {0, 0, 0}, dkv_s[3] = {0, 0, 0};
  // Decode (attention_decode_forward_cuda): the cache's block table and lengths, key rows gathered
  // through it. Split-KV: the CTAs that may share a row group's keys; decode sequences cut their
  // own keys in sight by split_chunk(keys, split_want) (chunk == 0 there), so a sequence's split
  // depends on its length, not on the cache's capacity that sizes the grid.
  KvCacheLayout cache{nullptr, 0, 1, nullptr};
  int64_t split_want = 1;
  // set_score_params: scale2 = scale * log2(e) takes a raw product s to log2 units; softcap > 0:
  // y = cap_in * s (tanh_rcp), and the capped score in log2 units is cap_out * tanh. Kernel
  // parameters, so the FMULs read them from the constant bank and they take no registers.
  float scale2 = 0.0f, cap_in = 0.0f, cap_out = 0.0f;
};

// Row layouts (Params::out_s ...): dense out (B, H, Tq, Dv), lse (B, H, Tq), grads like q, k, v
// contiguous; varlen out (total_q, H, Dv), lse (H, total_q), grad_k/v (total_k, Hkv, D); decode
// out (B, Tq, H, Dv) and lse (B, H, Tq).
enum class Layout { kDense, kVarlen, kDecode };
inline void set_layouts(Params& p, Layout layout) {
  const AttentionShape& sh = p.sh;
  const int64_t lse_dense[3] = {sh.heads * sh.tq, sh.tq, 1};
  auto set = [](int64_t (&dst)[3], int64_t b, int64_t h, int64_t t) { dst[0] = b, dst[1] = h, dst[2] = t; };
  switch (layout) {
    case Layout::kDense:
      set(p.out_s, sh.heads * sh.tq, sh.tq, 1);
      set(p.lse_s, lse_dense[0], lse_dense[1], lse_dense[2]);
      set(p.dkv_s, sh.kv_heads * sh.tk, sh.tk, 1);
      break;
    case Layout::kVarlen:
      set(p.out_s, 0, 1, sh.heads);
      set(p.lse_s, 0, sh.total_q, 1);
      set(p.dkv_s, 0, 1, sh.kv_heads);
      break;
    case Layout::kDecode:
      set(p.out_s, sh.tq * sh.heads, 1, sh.heads);
      set(p.lse_s, lse_dense[0], lse_dense[1], lse_dense[2]);
      break;
  }
}

inline void set_score_params(Params& p) {
  p.scale2 = p.sh.scale * kLog2e;
  if (p.sh.softcap > 0.0f) p.cap_in = 2.0f * kLog2e * p.sh.scale / p.sh.softcap, p.cap_out = p.sh.softcap * kLog2e;
}

// Softcap and ALiBi both rewrite each score between S = Q K^T and the softmax, so they share one
// kernel variant, the kScoreMod template flag, and are told apart there by runtime flags that are
// uniform over a launch. A template flag per option would double the attention binaries again; one
// shared flag keeps the plain kernels' maskless loops (whose SASS is asserted) exactly as they were.
__host__ __device__ constexpr bool score_mod(const AttentionShape& sh) {
  return sh.softcap > 0.0f || sh.alibi_slopes != nullptr;
}
// ALiBi's slope of (batch b, query head h) in log2 units and negated, so that the bias of a score
// is slope2 * |i + offset - j|; 0 without ALiBi.
__device__ __forceinline__ float alibi_slope2(const AttentionShape& sh, int64_t b, int64_t h) {
  return sh.alibi_slopes == nullptr ? 0.0f : -kLog2e * sh.alibi_slopes[b * sh.alibi_batch_stride + h];
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

__host__ __device__ constexpr int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
__host__ __device__ constexpr int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }
__host__ __device__ constexpr int64_t clamp_to(int64_t x, int64_t hi) { return imax(0, imin(x, hi)); }

// ---- Varlen: each CTA's own problem. The launch's shape bounds the sequences (tq, tk =
// max_seqlen_q/k, the grid and the workspace are sized by them); seq_span reads a sequence's
// first packed rows and lengths from device memory, and seq_shape gives the index math below its
// own Tq and Tk (diagonal, band, tile walks). Dense: the launch's shape itself. One uniform branch
// per CTA, nothing per score.
struct SeqSpan {
  int64_t q0, k0, tq, tk;  // first packed query and key row, lengths
};
__device__ __forceinline__ SeqSpan seq_span(const AttentionShape& sh, int64_t b) {
  if (sh.cu_seqlens_q == nullptr) return {0, 0, sh.tq, sh.tk};
  const int64_t q0 = sh.cu_seqlens_q[b], k0 = sh.cu_seqlens_k[b];
  return {q0, k0, sh.cu_seqlens_q[b + 1] - q0, sh.cu_seqlens_k[b + 1] - k0};
}
__host__ __device__ inline AttentionShape seq_shape(const AttentionShape& sh, int64_t tq, int64_t tk) {
  AttentionShape s = sh;
  s.tq = tq, s.tk = tk;
  return s;
}

// diagonal_offset (attention.h) for device code too: key j = query i + diagonal(sh) is the
// diagonal that causal masks, windows and ALiBi are measured from.
__host__ __device__ constexpr int64_t diagonal(const AttentionShape& sh) {
  return sh.causal == Causal::kTopLeft ? 0 : sh.tk - sh.tq;
}

// The keys query i may see as a band around its diagonal key: [i + offset - left, i + offset +
// right]. Causal caps right at 0; an unbounded side is kFar, beyond any index difference and far
// from overflowing int64 when added to one. Every visibility rule but the user mask is this band
// clipped to [0, Tk): the tile walks, the tile classes and the per-score tests all derive from it.
constexpr int64_t kFar = int64_t(1) << 48;
struct Band {
  int64_t left, right;
};
__host__ __device__ constexpr Band band(const AttentionShape& sh) {
  const int64_t right = sh.window_right < 0 ? kFar : sh.window_right;
  return {sh.window_left < 0 ? kFar : sh.window_left, sh.causal != Causal::kNone && right > 0 ? 0 : right};
}
struct Span {
  int64_t lo, hi;  // [lo, hi); hi <= lo: empty
};
// Keys some query of [t0, t1] may see.
__host__ __device__ inline Span keys_seen(const AttentionShape& sh, int64_t t0, int64_t t1) {
  const Band bd = band(sh);
  return {imax(0, t0 + diagonal(sh) - bd.left), imin(sh.tk, t1 + diagonal(sh) + bd.right + 1)};
}
// Queries that may see some key of [j0, j1].
__host__ __device__ inline Span queries_seeing(const AttentionShape& sh, int64_t j0, int64_t j1) {
  const Band bd = band(sh);
  return {imax(0, j0 - diagonal(sh) - bd.right), imin(sh.tq, j1 - diagonal(sh) + bd.left + 1)};
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
// sh: the launch's shape (packing is decided once per launch, by max_seqlen_q under varlen); rows
// is pack * the launch's tq, a bound of the sequence's pack * Tq_b (forward_tiles sets its own).
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

// Split-KV decode (Tq <= kPackMaxTq): every CTA holds all of [0, Tq) (one tile, or packed heads),
// so the keys any of them may see are one range, and the splits cut that range, not [0, Tk).
__host__ __device__ inline Span split_keys(const AttentionShape& sh) { return keys_seen(sh, 0, sh.tq - 1); }

// The keys a CTA walks, [lo, hi), from lo in steps of bn: those its rows may see, within its
// split. Tiles [j0, j0 + bn) in [full_lo, full_hi) are full: no visibility test at all, because no
// user mask exists and every row of the CTA sees every key (all inside [lo, hi), the first one
// past the last row's left window edge, the last one before the first row's diagonal or right
// edge). Since both conditions are monotone in j0, the full tiles are one run: masked tiles
// before it (a left window edge), masked ones after it (causal diagonal, right edge, Tk). A
// scale <= 0 (or NaN) makes every tile masked: full tiles take the max of unscaled scores.
struct KeyRange {
  int64_t lo, hi;            // keys to visit; hi <= lo: none
  int64_t full_lo, full_hi;  // the full tiles, on the walk's grid; full_hi == full_lo: none
};
__host__ __device__ inline KeyRange key_range(const AttentionShape& sh, int64_t rows, int64_t r0, int64_t rows_per_cta,
                                              int64_t split_lo, int64_t split_hi, int64_t bn) {
  const bool packed = rows > sh.tq;
  const int64_t t_min = packed ? 0 : r0, t_max = packed ? sh.tq - 1 : imin(r0 + rows_per_cta, rows) - 1;
  const Span seen = keys_seen(sh, t_min, t_max);
  KeyRange kr{imax(split_lo, seen.lo), imin(split_hi, seen.hi), 0, 0};
  kr.full_lo = kr.full_hi = kr.lo;
  if (sh.mask_kind != MaskKind::kNone || !(sh.scale > 0.0f)) return kr;
  const Band bd = band(sh);
  const int64_t first = t_max + diagonal(sh) - bd.left;                          // every row sees keys >= first ...
  const int64_t last = imin(kr.hi, t_min + diagonal(sh) + bd.right + 1) - bn;  // ... and the tile from last
  const int64_t lo = first > kr.lo ? kr.lo + (first - kr.lo + bn - 1) / bn * bn : kr.lo;
  if (last >= lo) kr.full_lo = lo, kr.full_hi = lo + ((last - lo) / bn + 1) * bn;
  return kr;
}

// Backward: the query tiles (of bm queries) with a query that may see some key of [j0, j0 + bn).
// Both ends are non-decreasing in j0 (key tiles nobody sees lie before or after all others, and
// get an empty range there), so the key tiles adding into one query tile's dQ are a contiguous
// run, starting at first_key_tile: what lets them take turns in key-tile order (attention_bwd.cu).
struct QueryTiles {
  int64_t lo, hi;
};
__host__ __device__ inline QueryTiles query_tiles(const AttentionShape& sh, int64_t j0, int64_t bn, int64_t bm) {
  const Span q = queries_seeing(sh, j0, imin(j0 + bn, sh.tk) - 1);
  if (q.hi > q.lo) return {q.lo / bm, (q.hi - 1) / bm + 1};
  const int64_t at = (imin(q.lo, sh.tq) + bm - 1) / bm;
  return {at, at};
}
// The first key tile (of bn keys) with a key that some query of the tile starting at m0 may see.
__host__ __device__ inline int64_t first_key_tile(const AttentionShape& sh, int64_t m0, int64_t bn) {
  return keys_seen(sh, m0, m0).lo / bn;
}

// Backward: the query tiles [lo, hi) in which every query sees every key of [j0, j0 + bn) (no
// user mask, the keys inside Tk, the queries inside Tq and inside the band): the maskless ones.
// Outside them (a left window edge or the diagonal before, a right window edge or a ragged Tq
// after) tiles are masked.
__host__ __device__ inline QueryTiles full_query_tiles(const AttentionShape& sh, int64_t j0, int64_t bn, int64_t bm) {
  if (sh.mask_kind != MaskKind::kNone || j0 + bn > sh.tk) return {0, 0};
  const Band bd = band(sh);
  const int64_t first = j0 + bn - 1 - diagonal(sh) - bd.right;  // queries >= first see the last key
  const int64_t last = j0 - diagonal(sh) + bd.left;             // queries <= last see the first key
  const int64_t lo = first > 0 ? (first + bm - 1) / bm : 0;
  const int64_t hi = imin(sh.tq / bm, last >= bm - 1 ? (last + 1) / bm : 0);  // tiles wholly inside Tq
  return {lo, hi > lo ? hi : lo};
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

// Split-KV: keys per split when `visible` keys are in sight and at most `want` CTAs may share
// them: splits only from 1024 keys on, each streaming >= 4 tiles of 64 keys, the chunk a whole
// number of every key tile. A function of its two arguments alone, so a decode sequence's split
// depends on its own length only (paged == contiguous bit for bit). visible >= 1.
constexpr int64_t kSplitGrain = 64;
__host__ __device__ constexpr int64_t split_count(int64_t visible, int64_t want) {
  return visible < 1024 ? 1 : imax(1, imin(want, (visible + 4 * kSplitGrain - 1) / (4 * kSplitGrain)));
}
__host__ __device__ constexpr int64_t split_chunk(int64_t visible, int64_t want) {
  return ((visible + split_count(visible, want) - 1) / split_count(visible, want) + kSplitGrain - 1) / kSplitGrain *
         kSplitGrain;
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
    gather(dst, src, [stride](int r) { return r * stride; }, valid_rows, d);
  }
  // The same for rows anywhere: tile row r (< valid_rows) at src + row(r) (a KV cache's pages).
  template <typename RowOffset>
  __device__ __forceinline__ void gather(T* dst, const T* src, RowOffset row, int valid_rows, int64_t d) const {
    if constexpr (kFixedColumn) {
      constexpr int kRowStep = kThreads / kChunks;
      const int col = int(threadIdx.x % kChunks * 8);
#pragma unroll
      for (int i = 0; i < kPasses; ++i) {
        const int r = r0 + i * kRowStep;
        if (ROWS % kRowStep != 0 && r >= ROWS) break;
        const bool in = r < valid_rows;
        cp_async16(dst + r * (HD + kPad) + col, src + (in ? row(r) : 0) + c0, in ? bytes0 : 0);
      }
    } else {
#pragma unroll
      for (int i = 0; i < kPasses; ++i) {
        const int idx = threadIdx.x + i * kThreads;
        if (ROWS * kChunks % kThreads != 0 && idx >= ROWS * kChunks) break;
        const int r = idx / kChunks, c = idx % kChunks * 8, bytes = column_bytes(d, c);
        const bool in = r < valid_rows && bytes > 0;
        cp_async16(dst + r * (HD + kPad) + c, src + (in ? row(r) + c : 0), in ? bytes : 0);
      }
    }
  }
};

}  // namespace fastlm::cuda::attn
