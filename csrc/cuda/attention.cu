// Flash attention forward for sm_80+, FlashAttention-2's design: fp16/bf16 in, fp32 accumulate,
// S, P and O in registers. One CTA = 4 warps = 64 query rows; each warp owns 16 rows for the
// whole key loop, so the online softmax never leaves the warp.
// Per key tile of BN keys (BN = 64 for D <= 128, 32 for D = 256):
//   loads    K_j and V_j by 16-byte cp.async (.cg: L2 only) into one shared buffer each, in
//            FA2's order: V_j streams in while S = Q K_j^T runs, K_{j+1} while O += P V_j runs.
//   S=QK^T   ldmatrix.x4 fragments of Q and K into mma.sync.m16n8k16; S stays in registers.
//   softmax  in registers, base 2 with scale*log2(e) folded in (one MUFU.EX2 per score); a row
//            lives in one quad (4 lanes), so its max takes 2 shuffles; the row sum stays
//            lane-partial until the end. The S accumulators are repacked as P's A fragments
//            (an m16n8 C pair is an m16k16 A fragment): P never touches shared memory.
//   O+=PV    V fragments by ldmatrix.x4.trans; O stays in fp32 registers for the whole loop.
//   masking  the CTA walks only the keys its rows may see (attention_common.cuh: key_range, the
//            causal/window band clipped to Tk: key tiles wholly outside a sliding window are never
//            loaded). Its full tiles are one run that goes through a loop of its own with no
//            visibility code at all; only the window's left edge before it, and the Tk edge, the
//            causal diagonal or the window's right edge after it (and every tile under a user
//            mask) test each score, and there V entries of keys no row of the warp sees are
//            zeroed in registers (a NaN hidden behind the mask cannot reach O as 0 * NaN).
// Decode-like calls (Tq <= 16) under GQA pack the query heads of a KV group into the 64 rows
// (row_group), so K/V are read once per group; with few CTAs the keys in sight (a window's, not
// all of Tk) are split over gridDim.z and the fp32 partials merged in a fixed order (merge_kernel;
// no atomics). Attention sinks join each row's softmax denominator where the row is finalised
// (row_norm: the epilogue, or merge_kernel after a split); a row that saw nothing gives 0 and
// lse = sink.
// Arithmetic, D = 128, BN = 64, per warp per tile: 128 HMMA (64 for S, 64 for PV) against 72
// ldmatrix (8 Q + 32 K + 32 V); per score 1 FMNMX, 1 FFMA + 1 MUFU.EX2 (scale folded in), 1 FADD
// and half an F2FP (32 scores per lane: ~145); 64 FMUL for the O rescale; 16 cp.async per thread
// with ~5 integer instructions each. The compiled main loop (the maskless tiles; SASS counted by
// scripts/sass_report.py, asserted in tests/test_sass_report.py) is 5.95 instructions per HMMA on
// sm_80 and 5.90 on sm_90a (the window's loop bounds added ~0.1), loads only as 16-byte LDGSTS, and has no loop without HMMA (the wmma
// kernel this replaces: 11.5-17.2 per HMMA, 2-byte loads, 5 such loops).
// Loads in flight: a 16 KB K or V tile per CTA streams behind each GEMM half (8 x 16 B per
// thread); with 2 CTAs per SM that is 32 KB in flight per SM, about what A100's HBM needs at
// ~1.5 TB/s and ~1 us latency per SM-share (1.5e12 / 108 SMs x 1e-6 s = 14 KB).
// Occupancy: 200 (sm_80) / 213 (sm_90a) registers per thread at D = 128, up to 249 at D = 256
// (launch bound: 2 CTAs of 128 threads per SM), so 8 warps per SM on sm_80/90, as FA2 runs at
// D = 128. Shared memory: (64 + 2 BN) rows x (D + 8) halves (+ 32 bytes: the CTA's sequence) =
// 52 KB at D = 128 (67 KB at D = 256): every head dim fits the 99 KB per block of sm_86/89, but
// their 100 KB per SM hold one such CTA (4 warps) above D = 64. The sequence's lengths live in
// that shared slot, read where a masked tile, the ALiBi bias or the epilogue needs them: kept in
// registers through the loop they cost up to 24 registers (a CTA per SM at D = 64 on sm_80).
// The 8-half row padding puts the 8 rows of an ldmatrix phase in distinct bank groups.
// Soft-capping (softcap > 0) and ALiBi run in a kernel of their own, forward_score_mod_kernel, the
// same tile loop compiled with kScoreMod: right after S = Q K^T each score becomes softcap *
// log2(e) * tanh(scale * s / softcap) (FMUL, MUFU.EX2, FADD, MUFU.RCP, FFMA per score: tanh_rcp)
// or scale * log2(e) * s, then gets ALiBi's -slope * log2(e) * |i + offset - j| (FADD, FFMA; each
// option a branch uniform over the launch), then masks and softmax as above. forward_kernel
// (neither) has no score-mod code; windows and sinks cost it only loop bounds and the epilogue.
// Varlen (FlashAttention's flash_attn_varlen_func) runs in these same kernels, one launch for the
// packed batch: the grid is cdiv(pack * max_seqlen_q, 64) tiles x num_seqs x row groups, each CTA
// reads its sequence's cu_seqlens pair from device memory (seq_span), exits at once if its tile
// lies past the sequence's queries, offsets its Q/K/V rows by the sequence's first rows and does
// all index math (diagonal, band, tile walk) with the sequence's own Tq, Tk; out and lse rows go
// through Params' layouts (packed (total_q, H, Dv), (H, total_q)). The dense path pays one uniform
// branch and a few integer ops per CTA for it; its main loop is unchanged. No split-KV under varlen.
// Decode against a KV cache (flash_attn_with_kvcache / vLLM's paged attention) is decode_kernel:
// the same tile loop with kCache, where each key tile's rows are gathered through the block table
// (row j: page table[b][j / page_size], slot j % page_size; per row and tile one 4-byte table load
// and a 32-bit division, nothing per element; any page_size >= 1, a contiguous cache as page b),
// still one 16-byte cp.async per chunk (the binding keeps cache rows 16-byte aligned). Tk is
// cache_seqlens[b], read on the device; the key walk and the split (split_chunk of the sequence's
// own keys in sight) depend on that length alone, so a paged cache and a contiguous one give the
// same bits. The grid's split count is a bound from the capacity; CTAs whose chunk lies past the
// sequence's keys leave the neutral partial (max -inf, sum 0), which the merge adds as nothing.
// decode_kernel: 211 (sm_80) / 217 (sm_90a) registers at D = 128, no spills.
#include "attention_common.cuh"
#include "attention_sm90.cuh"
#include "ptx.cuh"

namespace fastlm::cuda::attn {
namespace {

constexpr float kLn2 = 0.6931471805599453f;

template <int HD, int BN>
struct FwdTiles {
  static constexpr int ld = HD + kPad;  // halves per shared row
  static constexpr size_t q_elems = size_t(kRows) * ld, kv_elems = size_t(BN) * ld;
  // then the CTA's sequence (SeqSpan), 16-byte aligned after the tiles
  static constexpr size_t seq_at = ((q_elems + 2 * kv_elems) * 2 + 15) / 16 * 16;
  static constexpr size_t bytes = seq_at + sizeof(SeqSpan);
};

// A row's normalisation from its running max m (natural-log units) and sum l of exp(s - m), with
// a sink logit in the denominator (-inf: none): lse = logaddexp(m + log l, sink), evaluated as
// max + log1p(exp(-|difference|)) so neither side overflows, and the output is acc * inv with
// inv = exp(m + log l - lse) / l. A row that saw nothing gives inv 0 and lse = sink; NaN stays NaN.
struct RowNorm {
  float inv, lse;
};
__device__ __forceinline__ RowNorm row_norm(float m, float l, float sink) {
  if (l == 0.0f) return {0.0f, sink};
  const float lse_scores = m + __logf(l);
  if (sink == neg_inf()) return {1.0f / l, lse_scores};
  const float lse = fmaxf(lse_scores, sink) + log1pf(__expf(-fabsf(lse_scores - sink)));
  return {__expf(lse_scores - lse) / l, lse};
}
__device__ __forceinline__ float sink_of(const AttentionShape& sh, int64_t h) {
  return sh.sinks == nullptr ? neg_inf() : sh.sinks[h];
}

// kCache: the decode kernel (attention_decode_forward_cuda): key rows through the KV cache's
// block table, Tk = cache_seqlens[b], splits cut per sequence. Otherwise dense, or varlen where
// sh.cu_seqlens_q is set (a uniform branch per CTA: seq_span).
template <typename T, int HD, int BN, bool kScoreMod, bool kCache = false>
__device__ __forceinline__ void forward_tiles(const Params& p) {
  using L = FwdTiles<HD, BN>;
  constexpr int ld = L::ld, kNT = BN / 8, kDT = HD / 8;  // n8 tiles of S and of O
  FASTLM_DYNAMIC_SHARED(unsigned char, smem);
  T* Qs = reinterpret_cast<T*>(smem);
  T* Ks = Qs + L::q_elems;
  T* Vs = Ks + L::kv_elems;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, quad = lane % 4;
  // The launch's shape sizes the grid (varlen: by max_seqlen_q); from here on sh is this CTA's own
  // problem: its sequence's Tq and Tk (varlen), or the cached keys of its batch row (decode).
  const TileHead th = tile_head(blockIdx.x, row_group(p.sh, 0).rows);
  RowGroup g = row_group(p.sh, th.head);
  SeqSpan seq{0, 0, p.sh.tq, p.sh.tk};
  if constexpr (kCache) seq.tk = p.cache.cache_seqlens[g.batch];
  else seq = seq_span(p.sh, g.batch);
  const AttentionShape sh = seq_shape(p.sh, seq.tq, seq.tk);
  g.rows = packed_heads(p.sh) * seq.tq;  // this sequence's rows
  const int64_t r0 = th.tile * kRows;
  if (r0 >= g.rows) return;  // varlen: a query tile past this sequence's end
  // The lengths (and first rows) stay in shared memory for the tile loop and the epilogue, which
  // rebuild the sequence's shape from there (own()) after a barrier: held in registers through
  // the loop, they cost the dense kernels up to 24 registers (a CTA per SM at D = 64 on sm_80).
  SeqSpan* seq_s = reinterpret_cast<SeqSpan*>(smem + L::seq_at);
  if (threadIdx.x == 0) *seq_s = seq;
  __syncthreads();
  auto own = [&] { return seq_shape(p.sh, seq_s->tq, seq_s->tk); };
  int64_t split_lo = 0, split_hi = sh.tk;
  if (gridDim.z > 1) {  // split-KV: this CTA's chunk of the keys in sight (decode: per sequence)
    const Span in_sight = split_keys(sh);
    const int64_t chunk = kCache ? split_chunk(imax(1, in_sight.hi - in_sight.lo), p.split_want) : p.chunk;
    split_lo = in_sight.lo + int64_t(blockIdx.z) * chunk, split_hi = split_lo + chunk;
  }
  const KeyRange kr = key_range(sh, g.rows, r0, kRows, split_lo, split_hi, BN);
  const T* qg = static_cast<const T*>(p.q.data) + g.batch * p.q.s[0] + seq.q0 * p.q.s[2];
  // K/V: dense and varlen rows are kg + j * stride (varlen from the sequence's first key); the
  // cache's rows are found through its pages, with strides (page, slot, kv head) in p.k.s
  const T* kg = static_cast<const T*>(p.k.data) +
                (kCache ? g.kv_head * p.k.s[2] : g.batch * p.k.s[0] + g.kv_head * p.k.s[1] + seq.k0 * p.k.s[2]);
  const T* vg = static_cast<const T*>(p.v.data) +
                (kCache ? g.kv_head * p.v.s[2] : g.batch * p.v.s[0] + g.kv_head * p.v.s[1] + seq.k0 * p.v.s[2]);

  // this lane's two rows: warp * 16 + lane / 4 (+ 8)
  int64_t t_row[2];
  bool row_ok[2];
  float slope2[2];  // ALiBi (score-mod kernel only)
  const char* mask_row[2] = {nullptr, nullptr};
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int64_t r = r0 + warp * 16 + lane / 4 + 8 * i;
    const QueryRow qr = query_row(sh, g, r);
    row_ok[i] = r < g.rows, t_row[i] = qr.t;
    slope2[i] = kScoreMod && row_ok[i] ? alibi_slope2(sh, g.batch, qr.head) : 0.0f;
    if (row_ok[i] && p.mask.data != nullptr) {
      const int64_t elt = sh.mask_kind == MaskKind::kBool ? 1 : int64_t(sizeof(T));
      mask_row[i] = static_cast<const char*>(p.mask.data) +
                    (g.batch * p.mask.s[0] + qr.head * p.mask.s[1] + qr.t * p.mask.s[2]) * elt;
    }
  }
  auto q_row = [&](int r) -> const T* {
    if (r0 + r >= g.rows) return nullptr;
    const QueryRow qr = query_row(sh, g, r0 + r);
    return qg + qr.head * p.q.s[1] + qr.t * p.q.s[2];
  };
  const TileLoader<T, HD, BN> k_loader(sh.head_dim), v_loader(sh.value_dim);
  auto load_kv = [&](const TileLoader<T, HD, BN>& load, T* dst, const T* base, const int64_t (&s)[4], int64_t j0,
                     int64_t d) {
    // rows past the keys any row of the CTA sees (kr.hi, <= Tk) zero-fill: they are masked anyway
    const int valid = int(min(int64_t(BN), kr.hi - j0));
    if constexpr (kCache) {
      // key j: page block_table[b][j / page_size], slot j % page_size (contiguous: page b, slot j);
      // an index and a 32-bit division per row and tile, nothing per element
      const int32_t* pages = p.cache.block_table + g.batch * p.cache.block_table_stride;
      const bool contiguous = p.cache.block_table == nullptr;
      const uint32_t page_size = uint32_t(p.cache.page_size);
      load.gather(dst, base, [&](int r) -> int64_t {
        const uint32_t j = uint32_t(j0 + r);
        if (contiguous) return g.batch * s[0] + int64_t(j) * s[1];
        const uint32_t page = j / page_size;
        return int64_t(pages[page]) * s[0] + int64_t(j - page * page_size) * s[1];
      }, valid, d);
    } else {
      load(dst, base + j0 * s[2], s[2], valid, d);
    }
  };

  float acc_o[kDT][4];
#pragma unroll
  for (int n = 0; n < kDT; ++n) acc_o[n][0] = acc_o[n][1] = acc_o[n][2] = acc_o[n][3] = 0.0f;
  float m_run[2] = {neg_inf(), neg_inf()}, l_run[2] = {0.0f, 0.0f};  // max in log2 units

  if (kr.lo < kr.hi) {
    load_rows<T, HD, kRows>(Qs, sh.head_dim, q_row);
    load_kv(k_loader, Ks, kg, p.k.s, kr.lo, sh.head_dim);
    cp_async_commit();
  }
  // One key tile; `masked` is a compile-time flag: the maskless tiles get a loop of their own whose
  // body has no visibility code at all (the SASS main loop), the partial ones a second loop.
  auto step = [&](int64_t j0, auto masked) {
    cp_async_wait<0>();
    __syncthreads();  // K_j (and Q) landed; every warp is done with V_{j-1}
    load_kv(v_loader, Vs, vg, p.v.s, j0, sh.value_dim);
    cp_async_commit();

    // S = Q K_j^T: this warp's 16 rows x BN keys
    float s[kNT][4];
    mma_abt<T, HD, kNT>(s, Qs + warp * 16 * ld, Ks, ld, lane);
    if constexpr (kScoreMod) {  // on every tile: capped and/or biased scores, in log2 units from here
      if (p.cap_in != 0.0f) {
#pragma unroll
        for (int n = 0; n < kNT; ++n)
#pragma unroll
          for (int e = 0; e < 4; ++e) s[n][e] = fmaf(-2.0f * p.cap_out, tanh_rcp(s[n][e] * p.cap_in), p.cap_out);
      } else {
#pragma unroll
        for (int n = 0; n < kNT; ++n)
#pragma unroll
          for (int e = 0; e < 4; ++e) s[n][e] *= p.scale2;
      }
      if (p.sh.alibi_slopes != nullptr) {
        const AttentionShape sh = own();  // the lengths read where a tile needs them
        // ALiBi after the cap: slope2 * |t + offset - j| for key j = j0 + n * 8 + 2 quad + e % 2,
        // as |base - (n * 8 + e % 2)| in fp32 (exact for distances below 2^24)
        float base[2];
#pragma unroll
        for (int i = 0; i < 2; ++i) base[i] = float(t_row[i] + diagonal(sh) - j0 - 2 * quad);
#pragma unroll
        for (int n = 0; n < kNT; ++n)
#pragma unroll
          for (int e = 0; e < 4; ++e) s[n][e] = fmaf(slope2[e / 2], fabsf(base[e / 2] - float(n * 8 + e % 2)), s[n][e]);
      }
    }

    // On partial tiles: scale into log2 units and hide what a row may not see. Full tiles keep
    // raw scores (the scale is folded into the exponent's FFMA below; full tiles need scale > 0,
    // so the max of raw scores is the max of scaled ones).
    constexpr bool kMasked = decltype(masked)::value;
    uint32_t live = 0xffffffffu;  // bit 2n+c: key n*8 + quad*2 + c is seen by some row of the warp
    if constexpr (kMasked) {
      const AttentionShape sh = own();
      // per row, keys [j0 + first, j0 + lim) pass the bounds, causal and window tests (32-bit from here on)
      int first[2], lim[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const Span seen = keys_seen(sh, t_row[i], t_row[i]);
        first[i] = int(clamp_to(seen.lo - j0, BN));
        lim[i] = row_ok[i] ? int(clamp_to(seen.hi - j0, BN)) : 0;
      }
      const int64_t elt = sh.mask_kind == MaskKind::kBool ? 1 : int64_t(sizeof(T));
      const char* mask_tile[2] = {mask_row[0] + j0 * p.mask.s[3] * elt, mask_row[1] + j0 * p.mask.s[3] * elt};
      live = 0;
#pragma unroll
      for (int n = 0; n < kNT; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int i = e / 2, c = n * 8 + quad * 2 + e % 2;
          bool ok = c >= first[i] && c < lim[i];
          float x = kScoreMod ? s[n][e] : s[n][e] * p.scale2;
          if (ok && sh.mask_kind == MaskKind::kBool) {
            ok = mask_tile[i][c * p.mask.s[3]] != 0;
          } else if (ok && sh.mask_kind == MaskKind::kAdditive) {
            x += to_float(reinterpret_cast<const T*>(mask_tile[i])[c * p.mask.s[3]]) * kLog2e;
            ok = x != neg_inf();
          }
          s[n][e] = ok ? x : neg_inf();
          live |= uint32_t(ok) << (2 * n + e % 2);
        }
      live |= __shfl_xor_sync(0xffffffffu, live, 4);  // OR over the 8 row pairs of the warp
      live |= __shfl_xor_sync(0xffffffffu, live, 8);
      live |= __shfl_xor_sync(0xffffffffu, live, 16);
    }
    const float mul = kMasked || kScoreMod ? 1.0f : p.scale2;  // what still multiplies s on the way to log2 units

    // online softmax, rows lane / 4 (i = 0) and lane / 4 + 8 (i = 1)
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      float mx = neg_inf();  // the tile's max, in s's units
#pragma unroll
      for (int n = 0; n < kNT; ++n) mx = fmaxf(mx, fmaxf(s[n][2 * i], s[n][2 * i + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float m_new = fmaxf(m_run[i], mx * mul);
      const float sub = m_new == neg_inf() ? 0.0f : m_new;  // a row that sees nothing yet stays at 0
      const float alpha = exp2_approx(m_run[i] - sub);
      m_run[i] = m_new;
      float sum = 0.0f;
#pragma unroll
      for (int n = 0; n < kNT; ++n) {
        s[n][2 * i] = exp2_approx(fmaf(s[n][2 * i], mul, -sub));
        s[n][2 * i + 1] = exp2_approx(fmaf(s[n][2 * i + 1], mul, -sub));
        sum += s[n][2 * i] + s[n][2 * i + 1];
      }
      l_run[i] = l_run[i] * alpha + sum;
#pragma unroll
      for (int n = 0; n < kDT; ++n) acc_o[n][2 * i] *= alpha, acc_o[n][2 * i + 1] *= alpha;
    }

    cp_async_wait<0>();
    __syncthreads();  // V_j landed; every warp is done with K_j
    if (j0 + BN < kr.hi) {
      load_kv(k_loader, Ks, kg, p.k.s, j0 + BN, sh.head_dim);
      cp_async_commit();
    }

    // O += P V_j; V entries of keys no row of the warp sees are cleared in the fragments
    uint32_t a[BN / 16][4];
    as_a_fragments<T, kNT>(a, s);
    mma_ab_trans<T, BN / 16, kDT>(acc_o, a, Vs, ld, lane, [&](int ks, uint32_t& lo, uint32_t& hi) {
      lo = keep_halves(live, 4 * ks), hi = keep_halves(live, 4 * ks + 2);
    });
  };
  // masked tiles up to the full run (a left window edge), the full run, masked tiles to the end;
  // one call site per kind, so the binary holds one copy of each
  int64_t j0 = kr.lo;
#pragma unroll 1
  for (int part = 0; part < 3; ++part) {
    if (part == 1) {
      for (; j0 < kr.full_hi; j0 += BN) step(j0, std::false_type{});
    } else {
      for (const int64_t end = part == 0 ? kr.full_lo : kr.hi; j0 < end; j0 += BN) step(j0, std::true_type{});
    }
  }

  // the quad's partial sums into the row's; rows that saw nothing give 0 and lse -inf
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    l_run[i] += __shfl_xor_sync(0xffffffffu, l_run[i], 1);
    l_run[i] += __shfl_xor_sync(0xffffffffu, l_run[i], 2);
  }
  const int64_t dv = p.sh.value_dim;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const AttentionShape sh = own();
    const int64_t h = query_row(sh, g, r0 + warp * 16 + lane / 4 + 8 * i).head, bh = g.batch * sh.heads + h;
    const float m_nat = m_run[i] * kLn2;  // back to natural-log units
    if (row_ok[i] && gridDim.z > 1) {     // split-KV: unnormalized O, max, sum for merge_kernel
      float* po = p.part + ((bh * gridDim.z + blockIdx.z) * p.sh.tq + t_row[i]) * (dv + 2);
#pragma unroll
      for (int n = 0; n < kDT; ++n)
#pragma unroll
        for (int c = 0; c < 2; ++c)
          if (n * 8 + quad * 2 + c < dv) po[n * 8 + quad * 2 + c] = acc_o[n][2 * i + c];
      if (quad == 0) po[dv] = m_nat, po[dv + 1] = l_run[i];
    } else if (row_ok[i]) {
      const RowNorm rn = row_norm(m_nat, l_run[i], sink_of(sh, h));
      const int64_t t = seq_s->q0 + t_row[i];  // the row in out / lse (varlen: packed)
      T* o = static_cast<T*>(p.out) + (g.batch * p.out_s[0] + h * p.out_s[1] + t * p.out_s[2]) * dv;
#pragma unroll
      for (int n = 0; n < kDT; ++n)
#pragma unroll
        for (int c = 0; c < 2; ++c)
          if (n * 8 + quad * 2 + c < dv) o[n * 8 + quad * 2 + c] = from_float<T>(acc_o[n][2 * i + c] * rn.inv);
      if (quad == 0) p.lse[g.batch * p.lse_s[0] + h * p.lse_s[1] + t * p.lse_s[2]] = rn.lse;
    }
  }
}

template <typename T, int HD, int BN>
__global__ void __launch_bounds__(kThreads, 2) forward_kernel(const Params p) {
  forward_tiles<T, HD, BN, false>(p);
}

template <typename T, int HD, int BN>
__global__ void __launch_bounds__(kThreads, 2) forward_score_mod_kernel(const Params p) {
  forward_tiles<T, HD, BN, true>(p);
}

// The decode kernel: the forward's tile loop over a KV cache's pages. Always the score-mod
// variant (softcap and ALiBi by uniform branches): one kernel per head dim for every decode option,
// where an FMUL per score is noise against the cache's bytes.
template <typename T, int HD, int BN>
__global__ void __launch_bounds__(kThreads, 2) decode_kernel(const Params p) {
  forward_tiles<T, HD, BN, true, true>(p);
}

// Merges the split-KV partials of one query row (one CTA per row), splits in a fixed order; the
// sink joins the merged denominator here (the split CTAs leave it out). A split past a decode
// sequence's keys left the neutral partial (max -inf, sum 0), which adds exactly nothing.
template <typename T>
__global__ void merge_kernel(const Params p, int splits) {
  const AttentionShape& sh = p.sh;
  const int64_t tq = sh.tq, dv = sh.value_dim, r = blockIdx.x, bh = r / tq, qi = r % tq;
  const int64_t b = bh / sh.heads, h = bh % sh.heads;
  auto base = [&](int s) { return p.part + ((bh * splits + s) * tq + qi) * (dv + 2); };
  float m = neg_inf();
  for (int s = 0; s < splits; ++s) m = fmaxf(m, base(s)[dv]);
  float l = 0.0f;
  for (int s = 0; s < splits; ++s) {
    const float ms = base(s)[dv];
    l += ms == neg_inf() ? 0.0f : base(s)[dv + 1] * __expf(ms - m);
  }
  const RowNorm rn = row_norm(m, l, sink_of(sh, h));
  T* out = static_cast<T*>(p.out) + (b * p.out_s[0] + h * p.out_s[1] + qi * p.out_s[2]) * dv;
  for (int64_t c = threadIdx.x; c < dv; c += blockDim.x) {
    float acc = 0.0f;
    for (int s = 0; s < splits; ++s) {
      const float ms = base(s)[dv];
      acc += ms == neg_inf() ? 0.0f : base(s)[c] * __expf(ms - m);
    }
    out[c] = from_float<T>(acc * rn.inv);
  }
  if (threadIdx.x == 0) p.lse[b * p.lse_s[0] + h * p.lse_s[1] + qi * p.lse_s[2]] = rn.lse;
}

// CTAs before any split: (row groups) x (64-row tiles of a group).
int64_t base_ctas(const AttentionShape& sh) {
  const int64_t pack = packed_heads(sh);
  return sh.batch * (sh.heads / pack) * row_tiles(pack * sh.tq);
}

// How many CTAs may share a row group's keys: decode-like calls (Tq <= 16) spread the keys in
// sight (a window's, if any: split_keys) over enough CTAs to put about two on every SM, each
// split still streaming >= 4 tiles of 64 keys (split_count); everything else, and varlen, runs
// unsplit.
int64_t visible_keys(const AttentionShape& sh) {
  const Span keys = split_keys(sh);
  return keys.hi > keys.lo ? keys.hi - keys.lo : 0;
}
int64_t split_want(const AttentionShape& sh) {
  if (sh.tq > kPackMaxTq || sh.cu_seqlens_q != nullptr || visible_keys(sh) < 1024) return 1;
  int device = 0, sms = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess)
    return 1;
  const int64_t ctas = base_ctas(sh);
  return (2 * sms + ctas - 1) / ctas;
}
// Splits of the launch (gridDim.z): of a dense call, or under decode the most any sequence can
// need (sh.tk is the cache's capacity, a bound of every cache_seqlens[b]; split_count is
// non-decreasing in the keys in sight).
int64_t num_splits(const AttentionShape& sh) { return split_count(imax(1, visible_keys(sh)), split_want(sh)); }

template <typename T, int HD, int BN>
int launch(const Params& p, cudaStream_t stream) {
  const size_t bytes = FwdTiles<HD, BN>::bytes;
  auto* kernel = p.cache.cache_seqlens != nullptr ? decode_kernel<T, HD, BN>
                 : score_mod(p.sh)                ? forward_score_mod_kernel<T, HD, BN>
                                                  : forward_kernel<T, HD, BN>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes));
  if (err != cudaSuccess) return int(err);
  // dense: the chunks that cover the keys in sight; decode: the most any sequence may cut
  const int64_t chunks = p.chunk > 0 ? (visible_keys(p.sh) + p.chunk - 1) / p.chunk : num_splits(p.sh);
  const unsigned splits = unsigned(p.part != nullptr ? chunks : 1);
  const int64_t ctas = base_ctas(p.sh);
  if (ctas == 0) return 0;  // varlen with max_seqlen_q = 0: no query anywhere
  launch_kernel(kernel, dim3(unsigned(ctas), 1, splits), kThreads, bytes, stream, p);
  if (splits > 1)
    launch_kernel(merge_kernel<T>, unsigned(p.sh.batch * p.sh.heads * p.sh.tq), 128, 0, stream, p, int(splits));
  return int(cudaGetLastError());
}

// The one table of forward tile shapes: calls f(HD, BN) as integral constants for head dim hd.
template <typename F>
auto with_tiles(int64_t hd, F&& f) {
  using std::integral_constant;
  if (hd <= 32) return f(integral_constant<int, 32>{}, integral_constant<int, 64>{});
  if (hd <= 64) return f(integral_constant<int, 64>{}, integral_constant<int, 64>{});
  if (hd <= 80) return f(integral_constant<int, 80>{}, integral_constant<int, 64>{});
  if (hd <= 96) return f(integral_constant<int, 96>{}, integral_constant<int, 64>{});
  if (hd <= 128) return f(integral_constant<int, 128>{}, integral_constant<int, 64>{});
  return f(integral_constant<int, 256>{}, integral_constant<int, 32>{});
}

template <typename T>
int dispatch_head_dim(const Params& p, cudaStream_t stream) {
  return with_tiles(max_head_dim(p.sh), [&](auto hd, auto bn) { return launch<T, hd.value, bn.value>(p, stream); });
}

}  // namespace
}  // namespace fastlm::cuda::attn

namespace fastlm {

int64_t attention_forward_cuda_smem(int64_t head_dim, int64_t value_dim) {
  const int64_t hd = head_dim > value_dim ? head_dim : value_dim;
  return cuda::attn::with_tiles(hd, [](auto d, auto bn) { return int64_t(cuda::attn::FwdTiles<d.value, bn.value>::bytes); });
}

std::vector<int64_t> attention_forward_index_plan(const AttentionShape& shape) {
  using namespace cuda::attn;
  const int64_t bn = with_tiles(max_head_dim(shape), [](auto, auto b) { return int64_t(b.value); });
  std::vector<int64_t> plan{bn};
  const int64_t ctas = base_ctas(shape), rows = row_group(shape, 0).rows;
  for (int64_t cta = 0; cta < ctas; ++cta) {
    const TileHead th = tile_head(cta, rows);
    const RowGroup g = row_group(shape, th.head);
    const KeyRange kr = key_range(shape, g.rows, th.tile * kRows, kRows, 0, shape.tk, bn);
    plan.insert(plan.end(), {g.batch, g.kv_head, kr.lo, kr.hi, kr.full_lo, kr.full_hi});
    for (int64_t r = th.tile * kRows; r < th.tile * kRows + kRows; ++r) {
      const QueryRow q = query_row(shape, g, r);
      plan.insert(plan.end(), {r < g.rows ? q.head : -1, r < g.rows ? q.t : -1});
    }
  }
  return plan;
}

int64_t attention_forward_cuda_workspace(const AttentionShape& shape) {
  const int64_t splits = cuda::attn::num_splits(shape);
  return splits > 1 ? shape.batch * shape.heads * splits * shape.tq * (shape.value_dim + 2) : 0;
}

namespace cuda::attn {
namespace {
int dispatch(Params& p, float* workspace, cudaStream_t stream) {
  set_score_params(p);
  const int64_t splits = num_splits(p.sh);
  if (splits > 1 && workspace != nullptr) {
    // dense: one chunk for every row group; decode: each sequence cuts its own keys (chunk 0)
    p.part = workspace, p.split_want = split_want(p.sh);
    p.chunk = p.cache.cache_seqlens == nullptr ? split_chunk(visible_keys(p.sh), p.split_want) : 0;
  }
  if (p.sh.dtype == DType::kFloat16) return dispatch_head_dim<__half>(p, stream);
  return dispatch_head_dim<__nv_bfloat16>(p, stream);
}
}  // namespace
}  // namespace cuda::attn

int attention_forward_cuda(const AttentionShape& shape, Strided4 q, Strided4 k, Strided4 v, Strided4 mask, void* out,
                           float* lse, float* workspace, cudaStream_t stream) {
  cuda::attn::Params p{shape, q, k, v, mask, out, lse};
  cuda::attn::set_layouts(p, is_varlen(shape) ? cuda::attn::Layout::kVarlen : cuda::attn::Layout::kDense);
  int device = 0, major = 0, minor = 0;
  if (cudaGetDevice(&device) == cudaSuccess &&
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) == cudaSuccess &&
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) == cudaSuccess &&
      attention_sm90_why_not(shape, major, minor, q, k, v, mask) == nullptr)
    return cuda::attn::forward_sm90(p, stream);
  return cuda::attn::dispatch(p, workspace, stream);
}

int64_t attention_decode_forward_cuda_workspace(const AttentionShape& shape) {
  return attention_forward_cuda_workspace(shape);
}

int attention_decode_forward_cuda(const AttentionShape& shape, const KvCacheLayout& cache, Strided4 q,
                                  Strided4 k_cache, Strided4 v_cache, void* out, float* lse, float* workspace,
                                  cudaStream_t stream) {
  // q's strides (b, t, h, d) in the kernel's (b, h, t, d) order
  const Strided4 qk{q.data, {q.s[0], q.s[2], q.s[1], q.s[3]}};
  cuda::attn::Params p{shape, qk, k_cache, v_cache, Strided4{nullptr, {0, 0, 0, 0}}, out, lse};
  p.cache = cache;
  cuda::attn::set_layouts(p, cuda::attn::Layout::kDecode);
  return cuda::attn::dispatch(p, workspace, stream);
}

}  // namespace fastlm
