// Decode attention against a (paged) KV cache on the CPU, forward only: FlashAttention's
// flash_attn_with_kvcache / vLLM's paged attention, on the building blocks of the flash forward
// (attention_tiles.h: the GEMM micro-kernel, softcap, the online softmax, the finalisation).
//
// Decode is memory-bound: each K/V element is used by only the few queries of its KV head, so the
// kernel is organised around reading the cache once.
// - GQA packing (FlashAttention's decode trick): the H / Hkv query heads of a KV head, times the
//   Tq queries, are the columns of one score tile (row r = head-in-group * Tq + query), so every
//   K/V tile is read once per KV head, not once per query head. Above kBlockQ = 64 such rows the
//   rows are cut into tiles of 64 (K/V then read once per row tile).
// - Paging: a key tile is packed to fp32 scratch straight from the cache pages, a run of slots of
//   one page at a time, through the block table (no contiguous copy of the cache); a contiguous
//   cache is the same code with page b of page_size = max_len for batch b (an identity table).
// - Only the keys some row sees are visited: [0, cache_seqlens[b]) cut by causal and the sliding
//   window (the rows' bands shift by one per query and all heads share the positions, so their
//   union is one range). Tiles inside every row's band skip the mask pass.
// - Split-KV: work items are (batch, kv head, row tile, key split). With few (batch, kv head)
//   pairs and long caches, one pair's key range is cut into splits run by different threads,
//   each leaving partial (m, l, unnormalised acc) per row in a workspace; a second pass merges
//   them (log-sum-exp: weights exp(m_s - max m)) and finalises (sink, lse, 1 / l). Without a
//   split the item finalises in place.
// - Scores: a decode tile has few rows (group * Tq, often 1..8), for which the flash forward's
//   broadcast GEMM (one 16-lane FMA per key and d, whatever the rows) made the kernel compute-
//   bound; up to 16 rows the scores are dot products along d instead (scores_dot). More rows take
//   the GEMM, and then (no split) the result is bit-identical to attention_forward_cpu on the
//   gathered cache (same tiles from the same first key, same per-column arithmetic); the dot form
//   differs from it by rounding only (summation order).
#include <omp.h>

#include <algorithm>
#include <climits>
#include <vector>

#include "attention_tiles.h"

namespace fastlm::cpu::attn {
namespace {

// Fewest key tiles (of kBlockK) a split gets: 4 tiles = 256 keys of K and V per row tile against
// a merge that reads (Dv + 2) floats per row and split, so the merge stays a few % of the reads.
constexpr int64_t kMinSplitTiles = 4;

// Number of key splits. Items (batch, kv head, row tile) already give `base`-way parallelism;
// when base is below 2x the threads, each item's key range is split so that there are about
// 2 * threads items (the slack lets the dynamic schedule even out rows of different lengths), but
// never into splits of fewer than kMinSplitTiles tiles of the longest row's visited range (short
// caches: the merge and the per-item setup would cost more than the parallelism buys). One
// thread: no split (the merge would be pure overhead).
int64_t choose_splits(int64_t threads, int64_t base, int64_t max_tiles) {
  if (threads <= 1 || base <= 0 || max_tiles <= 0 || base >= 2 * threads) return 1;
  const int64_t want = (2 * threads + base - 1) / base;
  return std::max<int64_t>(1, std::min(want, max_tiles / kMinSplitTiles));
}

// Batch entry b: its key count, the diagonal (query i sits at position i + offset) and the keys
// [begin, end) that any of its queries sees (end <= begin: none).
struct BatchKeys {
  int64_t tk, offset, begin, end;
};

// The band of keys [lo, hi] (inclusive, clipped to [0, tk)) visible to a query at position p.
struct Band {
  int64_t lo, hi;
};
FASTLM_INLINE Band band(const AttentionShape& sh, int64_t p, int64_t tk) {
  const int64_t left = std::min(sh.window_left, kFar), right = std::min(sh.window_right, kFar);
  int64_t hi = right >= 0 ? p + right : kFar;
  if (sh.causal != Causal::kNone) hi = std::min(hi, p);
  return {std::max<int64_t>(0, left >= 0 ? p - left : 0), std::min(hi, tk - 1)};
}

struct Scratch {
  std::vector<float> buf;
  float *Qt, *Qr, *Kp, *Vp, *St, *O, *m, *l, *alpha, *slope;
  // per column (row of the item): visible keys [lo, hi] and the position (ALiBi's diagonal)
  alignas(64) int32_t lo[kBlockQ], hi[kBlockQ], pos[kBlockQ];
  Scratch(int64_t d, int64_t dvp) {
    const int64_t dp = round_up(d, kLanes);
    carve(buf, {{&Qt, d * kBlockQ}, {&Qr, kLanes * dp}, {&Kp, kBlockK * dp}, {&Vp, kBlockK * dvp}, {&St, kBlockK * kBlockQ},
                {&O, kBlockQ * dvp}, {&m, kBlockQ}, {&l, kBlockQ}, {&alpha, kBlockQ}, {&slope, kBlockQ}});
  }
};

// Lane i of the result = the sum of the lanes of a[i]: a butterfly of two-source shuffles that
// halves the vector count at each level (15 adds, 30 shuffles for 16 dot products).
FASTLM_INLINE vf reduce16(const vf* a) {
  vf b[8], c[4], e[2];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i)
    b[i] = __builtin_shufflevector(a[i], a[i + 8], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
           __builtin_shufflevector(a[i], a[i + 8], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i)
    c[i] = __builtin_shufflevector(b[i], b[i + 4], 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27) +
           __builtin_shufflevector(b[i], b[i + 4], 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31);
#pragma GCC unroll 2
  for (int i = 0; i < 2; ++i)
    e[i] = __builtin_shufflevector(c[i], c[i + 2], 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29) +
           __builtin_shufflevector(c[i], c[i + 2], 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31);
  return __builtin_shufflevector(e[0], e[1], 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30) +
         __builtin_shufflevector(e[0], e[1], 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31);
}

// Scores of a skinny tile (at most 16 query rows, decode's usual case) as dot products along d:
// St[j][c] = Kp[j] . Qr[c] for j < round_up(nk, 4), c < round_up(nq, 4), in register blocks of
// 4 keys x 4 rows (16 accumulators) reduced by reduce16. The broadcast GEMM would spend a whole
// 16-lane FMA per (key, d) however few the rows; this spends rows / 16 of one. Kp and Qr rows are
// Dp (a multiple of kLanes) floats, zero past D; Kp rows nk.. and Qr rows nq.. up to the next
// multiple of 4 may hold anything: the St rows >= nk and columns >= nq they make are never read.
inline void scores_dot(int64_t nk, int64_t nq, int64_t Dp, const float* Kp, const float* Qr, float* St) {
  for (int64_t j = 0; j < nk; j += 4)
    for (int64_t c = 0; c < nq; c += 4) {
      vf a[16];
#pragma GCC unroll 16
      for (int i = 0; i < 16; ++i) a[i] = splat(0.0f);
      for (int64_t d = 0; d < Dp; d += kLanes) {
        vf kk[4], qq[4];
#pragma GCC unroll 4
        for (int x = 0; x < 4; ++x) kk[x] = load(Kp + (j + x) * Dp + d);
#pragma GCC unroll 4
        for (int y = 0; y < 4; ++y) qq[y] = load(Qr + (c + y) * Dp + d);
#pragma GCC unroll 4
        for (int x = 0; x < 4; ++x)
#pragma GCC unroll 4
          for (int y = 0; y < 4; ++y) a[4 * x + y] += kk[x] * qq[y];
      }
      const vf f = reduce16(a);
      float lanes[kLanes];
      store(lanes, f);
#pragma GCC unroll 4
      for (int x = 0; x < 4; ++x) std::memcpy(St + (j + x) * kBlockQ + c, lanes + 4 * x, 4 * sizeof(float));
    }
}

// Packs keys [j0, j0 + nk) of (batch b, kv head hk) as fp32 rows of `cols` values (row stride ld,
// columns cols..ld zeroed), a run of consecutive slots of one page at a time.
template <typename T>
FASTLM_INLINE void gather_rows(const T* data, const int64_t* s, int64_t hk, const KvCacheLayout& c, int64_t b,
                               int64_t j0, int64_t nk, int64_t cols, float* dst, int64_t ld) {
  const int32_t* table = c.block_table ? c.block_table + b * c.block_table_stride : nullptr;
  for (int64_t j = j0, end = j0 + nk; j < end;) {
    const int64_t page = table ? table[j / c.page_size] : b, slot = j % c.page_size;
    const int64_t run = std::min(c.page_size - slot, end - j);
    pack_rows(data + page * s[0] + slot * s[1] + hk * s[2], s[1], s[3], run, cols, dst + (j - j0) * ld, ld);
    j += run;
  }
}

// Software prefetch of the rows gather_rows will read for keys [j0, j0 + nk): in the cache's
// (slot, kv head, d) layout one head's consecutive rows are Hkv * D elements apart (a 4 KiB page
// apart for 8 heads of 128 fp32), which the hardware prefetcher follows poorly; asking for the next
// tile while this one computes hides most of the latency (and the TLB walk).
template <typename T>
FASTLM_INLINE void prefetch_rows(const T* data, const int64_t* s, int64_t hk, const KvCacheLayout& c, int64_t b,
                                 int64_t j0, int64_t nk, int64_t cols) {
  if (s[3] != 1) return;  // strided rows: leave it to the hardware
  const int32_t* table = c.block_table ? c.block_table + b * c.block_table_stride : nullptr;
  const int64_t bytes = cols * int64_t(sizeof(T));
  for (int64_t j = j0, end = j0 + nk; j < end; ++j) {
    const int64_t page = table ? table[j / c.page_size] : b;
    const char* row = reinterpret_cast<const char*>(data + page * s[0] + (j % c.page_size) * s[1] + hk * s[2]);
    for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(row + o, 0, 3);
  }
}

// ALiBi (s -= slope * |pos - j|) and/or the band mask (keys outside [lo, hi] to -inf) on a score
// tile St (nk keys x nqp columns, row stride kBlockQ) whose first key is j0; per-column
// parameters, since the columns mix heads (slopes) and queries (positions).
FASTLM_INLINE void alibi_and_mask(const Scratch& w, float* St, int64_t nk, int64_t nqp, int64_t j0, bool alibi,
                                  bool mask) {
  for (int64_t j = 0; j < nk; ++j) {
    const vi key = vi{} + int32_t(j0 + j);
    for (int64_t c = 0; c < nqp; c += kLanes) {
      vf s = load(St + j * kBlockQ + c);
      if (alibi) {
        vi p;
        std::memcpy(&p, w.pos + c, sizeof p);
        s = s - load(w.slope + c) * vabs(__builtin_convertvector(p - key, vf));
      }
      if (mask) {
        vi lo, hi;
        std::memcpy(&lo, w.lo + c, sizeof lo);
        std::memcpy(&hi, w.hi + c, sizeof hi);
        s = select((key >= lo) & (key <= hi), s, splat(kNegInf));
      }
      store(St + j * kBlockQ + c, s);
    }
  }
}

template <typename T>
void decode(const AttentionShape& sh, const KvCacheLayout& cache, Strided4 q, Strided4 k, Strided4 v, T* out,
            float* lse) {
  const int64_t B = sh.batch, H = sh.heads, Hkv = sh.kv_heads, Tq = sh.tq, D = sh.head_dim, Dv = sh.value_dim;
  const int64_t Dvp = round_up(Dv, kLanes), Dp = round_up(D, kLanes), group = H / Hkv;
  const int64_t rows = group * Tq, row_tiles = (rows + kBlockQ - 1) / kBlockQ, rows_cap = std::min(rows, kBlockQ);

  std::vector<BatchKeys> bk(static_cast<size_t>(B));
  int64_t max_tiles = 0;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t tk = cache.cache_seqlens[b], offset = tk - Tq;
    const int64_t begin = band(sh, offset, tk).lo, end = band(sh, offset + Tq - 1, tk).hi + 1;
    bk[b] = {tk, offset, begin, end};
    if (end > begin) max_tiles = std::max(max_tiles, (end - begin + kBlockK - 1) / kBlockK);
  }
  const int64_t base = B * Hkv * row_tiles;
  int64_t splits = choose_splits(omp_get_max_threads(), base, max_tiles);
  const int64_t chunk = splits > 1 ? (max_tiles + splits - 1) / splits * kBlockK : kFar;  // keys per split
  if (splits > 1) splits = (max_tiles * kBlockK + chunk - 1) / chunk;
  const int64_t items = base * splits;
  // split partials: per item m[rows_cap], l[rows_cap], acc[rows_cap][Dvp]
  const int64_t part = rows_cap * (2 + Dvp);
  std::vector<float> partials(splits > 1 ? size_t(items * part) : 0);

  const T* qd = static_cast<const T*>(q.data);
  const T* kd = static_cast<const T*>(k.data);
  const T* vd = static_cast<const T*>(v.data);
  const bool alibi = sh.alibi_slopes != nullptr;

#pragma omp parallel if (items > 1)
  {
    Scratch w(D, Dvp);
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < items; ++item) {
      const int64_t s = item % splits, rt = item / splits % row_tiles, hk = item / splits / row_tiles % Hkv;
      const int64_t b = item / splits / row_tiles / Hkv;
      const BatchKeys& bb = bk[b];
      const int64_t r0 = rt * kBlockQ, nq = std::min(kBlockQ, rows - r0), nqp = round_up(nq, kLanes);
      const bool skinny = nqp == kLanes;  // scores as dot products (scores_dot), Q row-major in Qr

      // the columns: row r0 + c is query i of head hk * group + hl
      int64_t max_lo = 0, min_hi = kFar;
      for (int64_t c = 0; c < nqp; ++c) {
        if (c >= nq) {  // padding: sees nothing, never read back
          w.lo[c] = 1, w.hi[c] = 0, w.pos[c] = 0, w.slope[c] = 0.0f;
          if (skinny) std::fill(w.Qr + c * Dp, w.Qr + (c + 1) * Dp, 0.0f);
          else for (int64_t d = 0; d < D; ++d) w.Qt[d * kBlockQ + c] = 0.0f;
          continue;
        }
        const int64_t hl = (r0 + c) / Tq, i = (r0 + c) % Tq, h = hk * group + hl, p = i + bb.offset;
        const Band bd = band(sh, p, bb.tk);
        // clipped into int32: lo in [0, tk], hi in [-1, tk - 1] (keys are int32 positions)
        w.lo[c] = int32_t(std::min(bd.lo, bb.tk));
        w.hi[c] = int32_t(std::max<int64_t>(bd.hi, -1));
        w.pos[c] = int32_t(std::clamp<int64_t>(p, INT32_MIN, INT32_MAX));
        w.slope[c] = alibi ? sh.alibi_slopes[b * sh.alibi_batch_stride + h] : 0.0f;
        max_lo = std::max<int64_t>(max_lo, w.lo[c]);
        min_hi = std::min<int64_t>(min_hi, w.hi[c]);
        const T* qp = qd + b * q.s[0] + i * q.s[1] + h * q.s[2];
        if (skinny) pack_rows(qp, 0, q.s[3], 1, D, w.Qr + c * Dp, Dp, sh.scale);
        else for (int64_t d = 0; d < D; ++d) w.Qt[d * kBlockQ + c] = scalar_to_float(qp[d * q.s[3]]) * sh.scale;
      }
      std::fill(w.O, w.O + rows_cap * Dvp, 0.0f);
      std::fill(w.m, w.m + kBlockQ, kNegInf);
      std::fill(w.l, w.l + kBlockQ, 0.0f);

      const int64_t key_begin = bb.begin + std::min(s * chunk, kFar), key_end = std::min(bb.end, key_begin + chunk);
      for (int64_t j0 = key_begin; j0 < key_end; j0 += kBlockK) {
        const int64_t nk = std::min(kBlockK, key_end - j0);
        if (skinny) {
          gather_rows(kd, k.s, hk, cache, b, j0, nk, D, w.Kp, Dp);
          if (j0 + nk < key_end) prefetch_rows(kd, k.s, hk, cache, b, j0 + nk, std::min(kBlockK, key_end - j0 - nk), D);
          scores_dot(nk, nq, Dp, w.Kp, w.Qr, w.St);
        } else {
          gather_rows(kd, k.s, hk, cache, b, j0, nk, D, w.Kp, D);
          if (j0 + nk < key_end) prefetch_rows(kd, k.s, hk, cache, b, j0 + nk, std::min(kBlockK, key_end - j0 - nk), D);
          gemm(nk, nqp, D, w.Kp, D, 1, w.Qt, kBlockQ, w.St, kBlockQ, nullptr, false);
        }
        if (sh.softcap > 0.0f) cap_scores<false>(w.St, nk, nqp, sh.softcap, nullptr);
        const bool full = j0 >= max_lo && j0 + nk - 1 <= min_hi;
        if (alibi || !full) alibi_and_mask(w, w.St, nk, nqp, j0, alibi, !full);
        softmax_tile(w.St, nk, nqp, w.m, w.l, w.alpha);
        gather_rows(vd, v.s, hk, cache, b, j0, nk, Dv, w.Vp, Dvp);
        if (j0 + nk < key_end) prefetch_rows(vd, v.s, hk, cache, b, j0 + nk, std::min(kBlockK, key_end - j0 - nk), Dv);
        gemm(nq, Dvp, nk, w.St, 1, kBlockQ, w.Vp, Dvp, w.O, Dvp, w.alpha, true);
      }

      if (splits == 1) {
        for (int64_t c = 0; c < nq; ++c) {
          const int64_t hl = (r0 + c) / Tq, i = (r0 + c) % Tq, h = hk * group + hl;
          const float sink = sh.sinks ? sh.sinks[h] : kNegInf;
          const float f = finish_row(w.m[c], w.l[c], sink, lse + (b * H + h) * Tq + i);
          write_row(out + ((b * Tq + i) * H + h) * Dv, w.O + c * Dvp, Dv, f);
        }
      } else {
        float* pp = partials.data() + item * part;
        std::copy(w.m, w.m + nq, pp);
        std::copy(w.l, w.l + nq, pp + rows_cap);
        std::copy(w.O, w.O + nq * Dvp, pp + 2 * rows_cap);
      }
    }

    if (splits > 1) {
      // log-sum-exp merge of the splits of each (batch, kv head, row tile), then the finalisation
#pragma omp for schedule(dynamic, 1)
      for (int64_t g = 0; g < base; ++g) {
        const int64_t rt = g % row_tiles, hk = g / row_tiles % Hkv, b = g / row_tiles / Hkv;
        const int64_t r0 = rt * kBlockQ, nq = std::min(kBlockQ, rows - r0);
        const float* first = partials.data() + g * splits * part;
        for (int64_t c = 0; c < nq; ++c) {
          float mx = kNegInf;
          for (int64_t s = 0; s < splits; ++s) mx = std::max(mx, first[s * part + c]);
          float l = 0.0f;
          float* acc = w.O;
          std::fill(acc, acc + Dvp, 0.0f);
          if (mx != kNegInf) {
            for (int64_t s = 0; s < splits; ++s) {
              const float* ps = first + s * part;
              if (ps[c] == kNegInf) continue;  // a split that saw no key of this row (acc 0)
              const float a = std::exp(ps[c] - mx);
              l += ps[rows_cap + c] * a;
              const float* o = ps + 2 * rows_cap + c * Dvp;
              for (int64_t d = 0; d < Dvp; d += kLanes) store(acc + d, load(acc + d) + load(o + d) * a);
            }
          }
          const int64_t hl = (r0 + c) / Tq, i = (r0 + c) % Tq, h = hk * group + hl;
          const float sink = sh.sinks ? sh.sinks[h] : kNegInf;
          const float f = finish_row(mx, l, sink, lse + (b * H + h) * Tq + i);
          write_row(out + ((b * Tq + i) * H + h) * Dv, acc, Dv, f);
        }
      }
    }
  }
}

}  // namespace
}  // namespace fastlm::cpu::attn

namespace fastlm {

void attention_decode_forward_cpu(const AttentionShape& shape, const KvCacheLayout& cache, Strided4 q,
                                  Strided4 k_cache, Strided4 v_cache, void* out, float* lse) {
  cpu::attn::with_type(shape.dtype, [&](auto tag) {
    using T = decltype(tag);
    cpu::attn::decode<T>(shape, cache, q, k_cache, v_cache, static_cast<T*>(out), lse);
  });
}

}  // namespace fastlm
