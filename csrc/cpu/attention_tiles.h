// Building blocks of the CPU flash attention (attention.cpp, attention_bwd.cpp): a register-
// blocked fp32 GEMM micro-kernel on vec_math.h vectors, packing of (bf16 or fp32, strided)
// tiles into fp32 scratch, and the passes over a score tile: softcap, ALiBi (computed from
// positions, never materialised) and the mask (causal, sliding window, bool / additive).
//
// Scores are kept transposed, St[j][i] = key j x query i, so the per-query softmax statistics
// are plain vector max/sum over rows, and every product is one form: rows of C accumulate a
// broadcast element of A times contiguous rows of B.
//
// Causal and the window make query i see the band of keys i + lo .. i + hi, so a query tile
// sees one contiguous key range (TileMask::keys): key tiles outside it are never visited, and
// tiles wholly inside the band with no mask skip the mask pass (TileMask::full).
//
// Variable-length packed sequences (AttentionShape::cu_seqlens_*) take the same code: each
// sequence b is a Seq (its first query / key row in the packed T dims and its own Tq, Tk), and
// positions inside tiles stay relative to the sequence; dense is every Seq at row 0 with Tq, Tk.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <utility>
#include <vector>

#include "fastlm/attention.h"
#include "philox.h"
#include "vec_math.h"

namespace fastlm::cpu::attn {

constexpr int64_t kBlockQ = 64;  // queries per tile (multiple of kLanes)
constexpr int64_t kBlockK = 64;  // keys per tile
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

FASTLM_INLINE int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// C[r][0:16*NV] = (accumulate ? C[r] * rowscale[r] : 0) + sum_k A[r*ars + k*aks] * B[k*ldb + 0:16*NV]
template <int R, int NV>
FASTLM_INLINE void micro(int64_t K, const float* A, int64_t ars, int64_t aks, const float* B, int64_t ldb,
                         float* C, int64_t ldc, const float* rowscale, bool accumulate) {
  vf acc[R][NV];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    const vf s = rowscale ? splat(rowscale[r]) : splat(1.0f);
#pragma GCC unroll 8
    for (int c = 0; c < NV; ++c) acc[r][c] = accumulate ? load(C + r * ldc + c * kLanes) * s : splat(0.0f);
  }
  for (int64_t k = 0; k < K; ++k) {
    vf b[NV];
#pragma GCC unroll 8
    for (int c = 0; c < NV; ++c) b[c] = load(B + k * ldb + c * kLanes);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const vf a = splat(A[r * ars + k * aks]);
#pragma GCC unroll 8
      for (int c = 0; c < NV; ++c) acc[r][c] += a * b[c];
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int c = 0; c < NV; ++c) store(C + r * ldc + c * kLanes, acc[r][c]);
}

template <int NV>
FASTLM_INLINE void micro_rows(int64_t rows, int64_t K, const float* A, int64_t ars, int64_t aks, const float* B,
                              int64_t ldb, float* C, int64_t ldc, const float* rowscale, bool accumulate) {
  int64_t m = 0;
  for (; m + 4 <= rows; m += 4)
    micro<4, NV>(K, A + m * ars, ars, aks, B, ldb, C + m * ldc, ldc, rowscale ? rowscale + m : nullptr, accumulate);
  const float* rs = rowscale ? rowscale + m : nullptr;
  switch (rows - m) {
    case 3: micro<3, NV>(K, A + m * ars, ars, aks, B, ldb, C + m * ldc, ldc, rs, accumulate); break;
    case 2: micro<2, NV>(K, A + m * ars, ars, aks, B, ldb, C + m * ldc, ldc, rs, accumulate); break;
    case 1: micro<1, NV>(K, A + m * ars, ars, aks, B, ldb, C + m * ldc, ldc, rs, accumulate); break;
    default: break;
  }
}

// C (M x N, N a multiple of kLanes) (+)= A (M x K, strides ars/aks) * B (K x N, row stride ldb).
// Column panels of 64 outside, rows inside: the B panel stays in L1 while A streams.
inline void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t ars, int64_t aks, const float* B,
                 int64_t ldb, float* C, int64_t ldc, const float* rowscale, bool accumulate) {
  for (int64_t n = 0; n < N; n += 4 * kLanes) {
    const float* b = B + n;
    float* c = C + n;
    switch (std::min<int64_t>(4, (N - n) / kLanes)) {
      case 4: micro_rows<4>(M, K, A, ars, aks, b, ldb, c, ldc, rowscale, accumulate); break;
      case 3: micro_rows<3>(M, K, A, ars, aks, b, ldb, c, ldc, rowscale, accumulate); break;
      case 2: micro_rows<2>(M, K, A, ars, aks, b, ldb, c, ldc, rowscale, accumulate); break;
      default: micro_rows<1>(M, K, A, ars, aks, b, ldb, c, ldc, rowscale, accumulate); break;
    }
  }
}

// dst[r*ld + c] = src[r*rs + c*cs] * mul for r < rows, c < cols; columns cols..ld zeroed.
template <typename T>
inline void pack_rows(const T* src, int64_t rs, int64_t cs, int64_t rows, int64_t cols, float* dst, int64_t ld,
                      float mul = 1.0f) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* s = src + r * rs;
    float* d = dst + r * ld;
    int64_t c = 0;
    if (cs == 1) {
      for (; c + kLanes <= cols; c += kLanes) store(d + c, load(s + c) * mul);
      if (c < cols) store_partial(d + c, load_partial(s + c, cols - c) * mul, cols - c);
    } else {
      for (; c < cols; ++c) d[c] = scalar_to_float(s[c * cs]) * mul;
    }
    std::memset(d + cols, 0, size_t(ld - cols) * sizeof(float));
  }
}

// dst[c*ld + r] = src[r*rs + c*cs] * mul (a transposed tile); rows rows..ld zeroed.
template <typename T>
inline void pack_transposed(const T* src, int64_t rs, int64_t cs, int64_t rows, int64_t cols, float* dst,
                            int64_t ld, float mul) {
  for (int64_t c = 0; c < cols; ++c) {
    float* d = dst + c * ld;
    for (int64_t r = 0; r < rows; ++r) d[r] = scalar_to_float(src[r * rs + c * cs]) * mul;
    std::memset(d + rows, 0, size_t(ld - rows) * sizeof(float));
  }
}

// Writes n floats times mul as T (fp32 or bf16 bits).
template <typename T>
FASTLM_INLINE void write_row(T* dst, const float* src, int64_t n, float mul) {
  int64_t c = 0;
  for (; c + kLanes <= n; c += kLanes) store(dst + c, load(src + c) * mul);
  if (c < n) store_partial(dst + c, load_partial(src + c, n - c) * mul, n - c);
}

constexpr int64_t kFar = int64_t(1) << 60;  // an unbounded side of the band (no overflow adding positions)

// Where one (query tile, key tile) pair sits and what hides keys from queries.
struct TileMask {
  int64_t i0, nq, j0, nk;  // first query / key and how many are valid
  int64_t nqp;             // query columns computed: nq rounded up to whole vectors
  int64_t offset;          // the diagonal: key j = query i + offset (ALiBi distance 0)
  int64_t lo, hi;          // causal and window: query i sees keys i + lo .. i + hi (+-kFar: unbounded)
  float slope;             // ALiBi: scores get -slope * |i + offset - j|; 0: off
  MaskKind kind;
  const void* mask;   // already offset to this (batch, head)
  int64_t msq, msk;   // mask strides along queries and keys

  // Keys [first, end) that some valid query of the tile sees through causal and window (each
  // query's band is contiguous and shifts by one per query, so their union is too); empty when
  // every row is fully masked.
  std::pair<int64_t, int64_t> keys(int64_t tk) const {
    return {std::max<int64_t>(0, i0 + lo), std::min(tk, i0 + nq + hi)};
  }
  // Nothing to hide: every key visible to every valid query and all nqp columns valid.
  bool full() const {
    return kind == MaskKind::kNone && nq == nqp && j0 + nk - 1 <= i0 + hi && j0 >= i0 + nq - 1 + lo;
  }
};

// One sequence (batch entry) b: its queries are rows q0 .. q0 + tq of the T dim of q (and of
// out, dO, lse), its keys rows k0 .. k0 + tk of k and v. Dense: every sequence starts at row 0
// and has the shape's tq, tk; varlen: rows of the packed tensors from cu_seqlens.
struct Seq {
  int64_t q0, tq, k0, tk;
};
FASTLM_INLINE Seq sequence(const AttentionShape& sh, int64_t b) {
  if (!is_varlen(sh)) return {0, sh.tq, 0, sh.tk};
  const int64_t q0 = sh.cu_seqlens_q[b], k0 = sh.cu_seqlens_k[b];
  return {q0, sh.cu_seqlens_q[b + 1] - q0, k0, sh.cu_seqlens_k[b + 1] - k0};
}

// Element strides (sequence, head, row) of a contiguous output with n values per (row, head):
// dense (B, heads, T, n), varlen (total rows, heads, n) (rows are then absolute: Seq::q0 + i).
struct RowLayout {
  int64_t b, h, t;
  int64_t at(int64_t seq, int64_t head, int64_t row) const { return seq * b + head * h + row * t; }
};
inline RowLayout rows_layout(const AttentionShape& sh, int64_t heads, int64_t t, int64_t n) {
  if (is_varlen(sh)) return {0, n, heads * n};
  return {heads * t * n, t * n, n};
}
// lse: dense (B, H, Tq), varlen (H, total_q).
inline RowLayout lse_layout(const AttentionShape& sh) {
  if (is_varlen(sh)) return {0, sh.cu_seqlens_q[sh.batch], 1};
  return {sh.heads * sh.tq, sh.tq, 1};
}

// Query tiles [tile_begin[b], tile_begin[b + 1]) belong to sequence b (ceil(tq_b / kBlockQ) each,
// none for an empty one): work items cover real rows only, never a padded max length.
inline std::vector<int64_t> query_tile_starts(const AttentionShape& sh) {
  std::vector<int64_t> starts(size_t(sh.batch) + 1, 0);
  for (int64_t b = 0; b < sh.batch; ++b) starts[b + 1] = starts[b] + (sequence(sh, b).tq + kBlockQ - 1) / kBlockQ;
  return starts;
}

// The TileMask of query tile [i0, i0 + nq) of (batch b, head h) of sequence s (i0 relative to
// the sequence); j0 and nk are set per key tile, relative too.
template <typename T>
inline TileMask tile_mask(const AttentionShape& sh, Strided4 mask, const Seq& s, int64_t b, int64_t h, int64_t i0,
                          int64_t nq) {
  const int64_t offset = diagonal_offset(sh, s.tq, s.tk);
  const int64_t left = std::min(sh.window_left, kFar), right = std::min(sh.window_right, kFar);
  int64_t hi = right >= 0 ? offset + right : kFar;
  if (sh.causal != Causal::kNone) hi = std::min(hi, offset);
  const int64_t elt = sh.mask_kind == MaskKind::kBool ? 1 : int64_t(sizeof(T));
  return {i0, nq, 0, 0, round_up(nq, kLanes), offset, left >= 0 ? offset - left : -kFar, hi,
          sh.alibi_slopes ? sh.alibi_slopes[b * sh.alibi_batch_stride + h] : 0.0f, sh.mask_kind,
          mask.data ? static_cast<const char*>(mask.data) + (b * mask.s[0] + h * mask.s[1]) * elt : nullptr,
          mask.s[2], mask.s[3]};
}

// Sets hidden scores of St (nk x nqp, padded queries included; row stride kBlockQ) to -inf and adds an
// additive mask; live[j] says whether any valid query still sees key j. Returns whether any
// key is dead (so its packed rows must be zeroed: 0 * NaN would otherwise leak into outputs).
template <typename T>
inline bool apply_mask(const TileMask& t, float* St, bool* live) {
  bool any_dead = false;
  for (int64_t j = 0; j < t.nk; ++j) {
    float* s = St + j * kBlockQ;
    const int64_t key = t.j0 + j;
    // only queries [first, last) have this key in their band; queries from nq on are padding
    const int64_t first = std::clamp<int64_t>(key - t.hi - t.i0, 0, t.nq);
    const int64_t last = std::clamp<int64_t>(key - t.lo - t.i0 + 1, first, t.nq);
    for (int64_t i = 0; i < first; ++i) s[i] = kNegInf;
    for (int64_t i = last; i < t.nqp; ++i) s[i] = kNegInf;
    bool alive = false;
    if (t.kind == MaskKind::kBool) {
      const uint8_t* m = static_cast<const uint8_t*>(t.mask) + key * t.msk;
      for (int64_t i = first; i < last; ++i) {
        const bool keep = m[(t.i0 + i) * t.msq] != 0;
        s[i] = keep ? s[i] : kNegInf;
        alive |= keep;
      }
    } else if (t.kind == MaskKind::kAdditive) {
      const T* m = static_cast<const T*>(t.mask) + key * t.msk;
      for (int64_t i = first; i < last; ++i) {
        s[i] += scalar_to_float(m[(t.i0 + i) * t.msq]);
        alive |= s[i] != kNegInf;
      }
    } else {
      alive = first < last;
    }
    live[j] = alive;
    any_dead |= !alive;
  }
  return any_dead;
}

// tanh to a few 1e-7 relative (Cephes tanhf): an odd polynomial below |x| = 0.625, where vtanh's
// 1 - 2 / (e^{2x} + 1) keeps only ~1e-7 absolute (a score far below the cap would lose digits:
// cap * 1e-7), vtanh above. NaN takes vtanh's path and stays NaN.
FASTLM_INLINE vf tanh_precise(vf x) {
  const vf z = x * x;
  vf p = splat(-5.70498872745e-3f);
  p = p * z + 2.06390887954e-2f;
  p = p * z - 5.37397155531e-2f;
  p = p * z + 1.33314422036e-1f;
  p = p * z - 3.33332819422e-1f;
  return select(vabs(x) < 0.625f, p * z * x + x, vtanh(x));
}

// Soft-capping of a score tile St (nk rows of nqp, row stride kBlockQ), in place, before any
// mask: s = cap * tanh(s / cap). The backward also wants d(capped)/d(raw) = 1 - tanh^2 in grad.
template <bool kGrad>
inline void cap_scores(float* St, int64_t nk, int64_t nqp, float cap, float* grad) {
  const float inv = 1.0f / cap;
  for (int64_t j = 0; j < nk; ++j)
    for (int64_t c = 0; c < nqp; c += kLanes) {
      const vf t = tanh_precise(load(St + j * kBlockQ + c) * inv);
      store(St + j * kBlockQ + c, t * cap);
      if constexpr (kGrad) store(grad + j * kBlockQ + c, 1.0f - t * t);
    }
}

// ALiBi on a score tile: s_ij -= slope * |i + offset - j|, from positions (distances stay exact
// in fp32 below 2^24).
inline void add_alibi(const TileMask& t, float* St) {
  vf ramp;
  for (int c = 0; c < kLanes; ++c) ramp[c] = float(c);
  for (int64_t j = 0; j < t.nk; ++j)
    for (int64_t c = 0; c < t.nqp; c += kLanes) {
      const vf dist = vabs(ramp + float(t.i0 + c + t.offset - t.j0 - j));
      store(St + j * kBlockQ + c, load(St + j * kBlockQ + c) - t.slope * dist);
    }
}

// The spec's order on a fresh score tile St = scale * K Qt: softcap (kGrad: its derivative into
// Gt), then ALiBi, then the mask pass where the tile needs one (returns apply_mask's any_dead).
template <typename T, bool kGrad = false>
inline bool finish_scores(const TileMask& t, float softcap, float* St, float* Gt, bool* live) {
  if (softcap > 0.0f) cap_scores<kGrad>(St, t.nk, t.nqp, softcap, Gt);
  if (t.slope != 0.0f) add_alibi(t, St);
  return !t.full() && apply_mask<T>(t, St, live);
}

// Dropout of one (sequence, query head): Triton's keep-mask (philox.h), keep(i, j) = rand(key,
// uint32(i * tk + j)) >= p with key from seed + b * H + h, i and j relative to the sequence, tk its
// key count; kept entries are scaled by 1 / (1 - p) (both in fp32, as the Triton kernels do).
struct Dropout {
  PhiloxKey key;
  uint32_t tk;
  float p, scale;
};
FASTLM_INLINE Dropout dropout_of(const AttentionShape& sh, int64_t b, int64_t h, int64_t tk) {
  return {philox_key(sh.dropout_seed, b * sh.heads + h), uint32_t(tk), sh.dropout_p, 1.0f / (1.0f - sh.dropout_p)};
}

// Philox offsets i * Tk + j0 of queries i .. i + kLanes (uint32, wrapping as Triton's
// (offs_m * TK + offs_n).to(uint32) does); add j - j0 for key j.
FASTLM_INLINE vu drop_offsets(const Dropout& d, int64_t i, int64_t j0) {
  vu ramp;
  for (int c = 0; c < kLanes; ++c) ramp[c] = uint32_t(c);
  return (ramp + uint32_t(i)) * d.tk + uint32_t(j0);
}
// keep / (1 - p), or 0, for the entries at these offsets.
FASTLM_INLINE vf drop_factor(const Dropout& d, vu offsets) {
  return select(philox_rand(offsets, d.key) >= d.p, splat(d.scale), splat(0.0f));
}

// St (P of a key tile, nk x nqp, row stride kBlockQ) times keep / (1 - p): what reaches P V.
inline void drop_probs(const Dropout& d, int64_t i0, int64_t j0, int64_t nk, int64_t nqp, float* St) {
  for (int64_t c = 0; c < nqp; c += kLanes) {
    const vu rows = drop_offsets(d, i0 + c, j0);
    for (int64_t j = 0; j < nk; ++j) {
      float* s = St + j * kBlockQ + c;
      store(s, load(s) * drop_factor(d, rows + uint32_t(j)));
    }
  }
}

inline void zero_dead_rows(float* buf, int64_t ld, const bool* live, int64_t nk) {
  for (int64_t j = 0; j < nk; ++j)
    if (!live[j]) std::memset(buf + j * ld, 0, size_t(ld) * sizeof(float));
}

// Lays named fp32 scratch buffers out back to back in one zeroed allocation, each starting
// on a 64-byte line (buf is over-allocated by one line to align the first).
inline void carve(std::vector<float>& buf, std::initializer_list<std::pair<float**, int64_t>> parts) {
  int64_t n = kLanes;
  for (const auto& part : parts) n += round_up(part.second, kLanes);
  buf.assign(size_t(n), 0.0f);
  float* at = buf.data() + (kLanes - (reinterpret_cast<uintptr_t>(buf.data()) / sizeof(float)) % kLanes) % kLanes;
  for (const auto& part : parts) {
    *part.first = at;
    at += round_up(part.second, kLanes);
  }
}

// Online-softmax update for one key tile: St (nk x kBlockQ) becomes P, m/l/alpha per query.
FASTLM_INLINE void softmax_tile(float* St, int64_t nk, int64_t nqp, float* m, float* l, float* alpha) {
  for (int64_t c = 0; c < nqp; c += kLanes) {
    vf mx = load(m + c);
    for (int64_t j = 0; j < nk; ++j) mx = vmax(mx, load(St + j * kBlockQ + c));
    const vf m_old = load(m + c);
    // alpha = exp(m_old - m_new), 0 while nothing was seen (m_old = -inf)
    const vf a = select(m_old == kNegInf, splat(0.0f), vexp(m_old - mx));
    const vf sub = select(mx == kNegInf, splat(0.0f), mx);
    vf sum = splat(0.0f);
    for (int64_t j = 0; j < nk; ++j) {
      const vf s = load(St + j * kBlockQ + c);
      const vf p = select(s == kNegInf, splat(0.0f), vexp(s - sub));
      store(St + j * kBlockQ + c, p);
      sum += p;
    }
    store(m + c, mx);
    store(alpha + c, a);
    store(l + c, load(l + c) * a + sum);
  }
}

// log(e^a + e^b), stable; b = -inf (no sink) returns a unchanged, NaN included.
FASTLM_INLINE float logaddexp(float a, float b) {
  if (b == kNegInf) return a;
  if (a == kNegInf) return b;
  return std::max(a, b) + std::log1p(std::exp(-std::fabs(a - b)));
}

// The end of a query row with running max m and sum l: writes its lse (the sink, -inf for none,
// joins the denominator) and returns the factor turning the accumulated P V into the output.
// A fully masked row (l = 0) gets lse = sink and factor 0.
FASTLM_INLINE float finish_row(float m, float l, float sink, float* lse) {
  const float lse_scores = l > 0.0f ? m + std::log(l) : (l == 0.0f ? kNegInf : l);
  *lse = logaddexp(lse_scores, sink);
  return l > 0.0f ? std::exp(lse_scores - *lse) / l : 0.0f;
}

// Runtime dtype to the element type: fp32, or bf16 as raw uint16 bits.
template <typename Fn>
FASTLM_INLINE void with_type(DType dtype, Fn&& fn) {
  if (dtype == DType::kFloat32) fn(float{});
  else fn(uint16_t{});
}

}  // namespace fastlm::cpu::attn
