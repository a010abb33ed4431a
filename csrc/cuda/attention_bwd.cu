// Flash attention backward for sm_80+, FlashAttention-2's design: fp16/bf16 in, fp32 accumulate,
// head dims up to 256. Up to D = 128 one CTA = 4 warps owns BN = 64 keys of one KV head (16 per
// warp) and walks the query tiles (BM = 64 queries for D <= 64, 32 above) of its query heads; the
// D = 256 class (129..256) is described at the end of this header. Per query tile, 5 GEMMs:
//   S^T  = K Q^T    and  dP^T = V dO^T  (ldmatrix + mma.sync; both stay in registers)
//   P^T  = exp2(S^T * scale * log2 e - lse * log2 e),  dS^T = P^T (dP^T - delta)   (registers)
//   dV  += P^T dO   and  dK  += dS^T Q  (P^T, dS^T repacked as A fragments; dK, dV in registers
//                                        for the CTA's whole life)
//   dQ   = dS K     (dS^T through shared memory, each warp 16 queries x a slice of D), added to
//                    an fp32 dQ sum in global memory in key-tile order: a per-(head, query tile)
//                    turn counter makes the key tiles take turns (wait_flag / signal_flag), so the
//                    sums are deterministic without atomics.
// Q, dO (and lse, delta) are double-buffered: tile m + 1 streams in by 16-byte cp.async while m
// is computed. A key tile walks only the query tiles with a query that may see it (query_tiles:
// the causal/window band), so under a sliding window each key tile visits a short run of query
// tiles. Masking follows the forward's tile classes: full tiles test nothing; partial ones (the
// band's edges, ragged Tq, user masks) hide scores and zero dS where hidden (so a NaN in a hidden
// V or K row cannot leak), and zero K entries of keys no query of the tile sees before dQ = dS K.
// The key tiles adding into one query tile's dQ are then a run starting past 0 under a window:
// delta_kernel starts each turn counter at its run's first key tile (first_key_tile).
// GQA: a CTA walks G / head_splits query heads; head_splits > 1 (few KV heads, e.g. MQA, where
// B * Hkv * key tiles would leave SMs idle) writes fp32 dK/dV partials summed in a fixed order by
// finish_kernel, which also scales the dQ sums into grad_q.
// Arithmetic, D = 128 (BM = 32), per warp per query tile: 5 GEMMs of 16 x 32 x 128 (2 x 32 HMMA
// for S^T, dP^T; 2 x 32 for dV, dK; 32 for this warp's 16 x 64 slice of dQ over 64 keys) = 160
// HMMA against ~100 ldmatrix, ~6 instructions per score for P and dS, 8 float2 read-add-writes of
// dQ and the tile loads. Per head, the maskless query tiles run in a loop of their own: compiled,
// it is 5.56 instructions per HMMA on sm_80 and 5.71 on sm_90a (scripts/sass_report.py, asserted
// in tests/test_sass_report.py); its global traffic is 16-byte cp.async for Q and dO, the dQ
// float2 sums and 4-byte lse/delta, and its one inner loop is the spin on the dQ turn. The masked
// copy (causal diagonal, ragged Tq, user masks) is 10.6. 198-254 registers, 2 CTAs (8 warps) per
// SM on sm_80/90 (one above D = 32 on sm_86/89's 100 KB per SM), no spills.
// CTAs take their (head, key tile) from a ticket (an atomicAdd at start), so a key tile waiting
// for its dQ turn only ever waits for CTAs already running: no reliance on dispatch order.
// Shared memory: K, V (64 rows) + 2 x (Q, dO) (BM rows) of D + 8 halves, plus dS^T (64 x BM + 8)
// and the CTA's sequence (32 bytes): 75 KB at D = 128, 57 KB at D = 96, so every head dim fits the
// 99 KB per block of sm_86/89.
// Soft-capping (softcap > 0) and ALiBi run in backward_score_mod_kernel, the same loop compiled
// with kScoreMod: it recomputes the capped scores (t = tanh(scale * s / softcap), score softcap *
// t; a branch uniform over the launch) and adds ALiBi's bias from a per-tile table in shared
// memory for P, and multiplies dS by 1 - t^2 (the cap's derivative, of the raw score only: ALiBi
// is additive). backward_kernel (neither) has none of it. No sinks here: the forward's lse already
// holds them, and P = exp(s - lse) is all the backward needs.
// Varlen: the same kernels, one launch; key tiles are counted over max_seqlen_k per (sequence, KV
// head), and a CTA whose key tile lies past its sequence's keys exits right after its ticket (no
// other tile ever waits for it: dQ turns only run through a sequence's real key tiles). The
// workspace (delta, dQ sums, turn counters, dK/dV partials) is laid out for (num_seqs, H,
// max_seqlen_q) rows, so its size needs no host read of cu_seqlens; delta_kernel and finish_kernel
// walk those rows and skip the ones past a sequence's end; the inputs and grads are read and
// written at the sequence's packed rows.
// Head dims 129..256 (one class, HD = 256; columns past D zero-filled as everywhere). dK + dV of
// 16 keys x 256 columns would be 256 fp32 registers per thread, so the CTA owns BN = 32 keys and
// its 4 warps sit as 2 key groups (16 keys) x 2 column halves: each warp keeps dK/dV for its 16
// keys and 128 columns (128 registers, as at D = 128). Both warps of a key group compute the same
// S^T and dP^T (16 keys x BM over all 256 columns) and each writes half of dS^T; the rest is the
// loop above with BN = 32 (the turn counters, tickets and query-tile walks count 32-key tiles).
// BM = 16 queries per tile keeps shared memory at K, V (32 rows) + 2 x (Q, dO) (16 rows) of 264
// halves + dS^T: 68 KB, under the 99 KB per block of sm_86/89 (BM = 32 would need 101 KB), so one
// tile serves every arch: 2 CTAs per SM on sm_80/90 (242 / 240 registers on sm_80 / sm_90a, no
// spills), 1 on sm_86/89. Per warp per query tile: 32 + 32 HMMA for S^T and dP^T, 16 + 16 for its
// dV and dK columns, 16 for its 16 x 64 slice of dQ over 32 keys = 112 HMMA against ~92
// ldmatrix, 8 scores of P/dS per lane and 16 float2 dQ read-add-writes: the maskless loop compiles
// to 7.0 instructions per HMMA on sm_80 and 7.29 on sm_90a (score-mod kernel 8.67 / 9.19: 112
// HMMA per tile against D = 128's 160 carry about the same per-tile overhead). The duplicated
// S^T/dP^T make that 448 HMMA per CTA and tile for 320 of unique work (1.4x), and BN = 32 reads Q, dO and the dQ sums twice
// as often per key as BN = 64: correctness and registers first here; an 8-warp CTA of 64 keys
// (FlashAttention-2's choice at D = 256, with P^T/dS^T shared through shared memory) would cut
// both on sm_80/90 but needs more than the 99 KB of sm_86/89.
#include "attention_common.cuh"
#include "ptx.cuh"

namespace fastlm::cuda::attn {
namespace {

// A tile shape: HD (the head-dim class), BM queries per tile, BN keys per CTA. The CTA's 4 warps
// sit as kKeyWarps groups of 16 keys times kColSplit slices of HD: each warp owns the dK/dV
// columns of its slice (HD / kColSplit of them, 8 fp32 registers per 8 columns) for its 16 keys.
template <int HD, int BM, int BN>
struct BwdTiles {
  static constexpr int kHD = HD, kBM = BM, kBN = BN;
  static constexpr int kKeyWarps = BN / 16, kColSplit = kWarps / kKeyWarps, kOwnCols = HD / kColSplit;
  static_assert(kKeyWarps * kColSplit == kWarps && kOwnCols % 16 == 0, "warps as key groups x column slices");
  static constexpr int ld = HD + kPad, lds = BM + kPad;  // halves per shared row
  static constexpr size_t kv = size_t(BN) * ld, qo = size_t(BM) * ld, ds = size_t(BN) * lds;  // elements
  static constexpr int bias = BM + BN;  // ALiBi table per buffer: one entry per key-query offset
  // then, 16-byte aligned, the CTA's sequence (seq_at: see backward_tiles)
  static constexpr size_t seq_at = ((2 * kv + 4 * qo + ds) * 2 + 4 * BM * 4 + kWarps * 4 + 4 + 2 * bias * 4 + 15) / 16 * 16;
  static constexpr size_t bytes = seq_at + sizeof(SeqSpan);
};

// Row stride of the fp32 dQ sums: even, so a lane's two columns are one aligned float2 (the pad
// column of an odd head dim only ever receives 0 + 0).
__host__ __device__ constexpr int64_t dq_ld(int64_t d) { return (d + 1) / 2 * 2; }

// Key tiles of bn keys per (sequence, KV head, split) over the launch's tk (at least 1, as
// tile_head), and the (head, key tile) of a CTA's ticket: key tile fastest.
__host__ __device__ constexpr int64_t key_tiles(int64_t tk, int64_t bn) { return tk > 0 ? (tk + bn - 1) / bn : 1; }
__device__ __forceinline__ TileHead key_tile_head(int64_t ticket, int64_t tk, int64_t bn) {
  return {ticket % key_tiles(tk, bn), ticket / key_tiles(tk, bn)};
}

template <typename T, int HD, int BM, int BN, bool kScoreMod>
__device__ __forceinline__ void backward_tiles(const Params& p) {
  using L = BwdTiles<HD, BM, BN>;
  constexpr int ld = L::ld, lds = L::lds, kMT = BM / 8, kDT = L::kOwnCols / 8;
  constexpr int kWR = BM / 16, kWC = kWarps / kWR, kCW = HD / kWC;  // dQ: warps as kWR x kWC slices
  FASTLM_DYNAMIC_SHARED(unsigned char, smem);
  T* Ks = reinterpret_cast<T*>(smem);
  T* Vs = Ks + L::kv;
  T* Qs = Vs + L::kv;         // [2][BM][ld]
  T* dOs = Qs + 2 * L::qo;    // [2][BM][ld]
  T* dSs = dOs + 2 * L::qo;   // [BN][lds]: dS^T
  float* lse_s = reinterpret_cast<float*>(dSs + L::ds);  // [2][BM], log2 units (+inf: row saw nothing)
  float* delta_s = lse_s + 2 * BM;                        // [2][BM]
  uint32_t* live_s = reinterpret_cast<uint32_t*>(delta_s + 2 * BM);  // [kWarps]: keys some query sees
  int* ticket_s = reinterpret_cast<int*>(live_s + kWarps);             // this CTA's place in the start order
  float* bias_s = reinterpret_cast<float*>(ticket_s + 1);              // [2][L::bias]: ALiBi, score-mod kernel
  SeqSpan* seq_s = reinterpret_cast<SeqSpan*>(smem + L::seq_at);      // this CTA's sequence

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, quad = lane % 4;
  // this warp's 16 keys (from key_row0 of the CTA's BN) and its slice of dK/dV columns (from col0)
  const int key_row0 = (L::kColSplit == 1 ? warp : warp % L::kKeyWarps) * 16;
  const int slice = L::kColSplit == 1 ? 0 : warp / L::kKeyWarps, col0 = slice * L::kOwnCols;
  const int64_t group = p.sh.heads / p.sh.kv_heads, hpc = group / p.head_splits;
  // The CTA's (head, key tile) comes from its ticket, not blockIdx: a key tile waits for the
  // lower key tiles of its head (the dQ turns), and lower tickets belong to CTAs already running.
  if (threadIdx.x == 0) *ticket_s = ticket(p.cta_ticket);
  __syncthreads();
  // The launch's shape sizes the grid and the workspace (varlen: max_seqlen_q/k, rows of the dQ
  // sums, delta and turn counters at (b, h, t < max_seqlen_q)); sh is this CTA's sequence.
  const TileHead th = key_tile_head(*ticket_s, p.sh.tk, BN);
  const int64_t j0 = th.tile * BN, split = th.head % p.head_splits, bhk = th.head / p.head_splits;
  const int64_t b = bhk / p.sh.kv_heads, hk = bhk % p.sh.kv_heads, h_first = hk * group + split * hpc;
  // The sequence's bounds live in shared memory, not registers: the D = 128 kernels have none to
  // spare (255). own() is the sequence's shape, the launch's constant-bank fields with the lengths
  // loaded from there; load_tile and step build it afresh after their barriers, so no length stays
  // in a register across the loop.
  if (threadIdx.x == 0) *seq_s = seq_span(p.sh, b);
  __syncthreads();
  const SeqSpan& seq = *seq_s;
  auto own = [&] { return seq_shape(p.sh, seq_s->tq, seq_s->tk); };
  const AttentionShape sh = own();
  if (j0 >= sh.tk) return;  // varlen: a key tile past this sequence's end (nobody waits for it)
  const int64_t dv = p.sh.value_dim, d = p.sh.head_dim;
  const int64_t ws_tq = p.sh.tq, m_tiles = (ws_tq + BM - 1) / BM;  // the workspace's rows and query tiles per head
  const QueryTiles seen_by = query_tiles(sh, j0, BN, BM);  // the query tiles this key tile visits
  const int64_t m_lo = seen_by.lo;
  // loop counters in 32 bits (query tiles per head < 2^31 / 64): registers are the limit here
  const int per_head = int(seen_by.hi - seen_by.lo), iters = int(hpc) * per_head;

  const T* kg = static_cast<const T*>(p.k.data) + b * p.k.s[0] + hk * p.k.s[1] + seq.k0 * p.k.s[2];
  const T* vg = static_cast<const T*>(p.v.data) + b * p.v.s[0] + hk * p.v.s[1] + seq.k0 * p.v.s[2];
  const TileLoader<T, HD, BM> q_loader(d), do_loader(dv);
  // query head h_first + hh, query tile m_lo + mrel
  auto load_tile = [&](int hh, int mrel, int buf) {
    const AttentionShape sh = own();
    const int64_t h = h_first + hh, m0 = (m_lo + mrel) * BM, bh = b * p.sh.heads + h;
    const int valid = int(min(int64_t(BM), sh.tq - m0));
    const int64_t row0 = seq.q0 + m0;  // the tile's first packed row (dense: m0)
    const T* qg = static_cast<const T*>(p.q.data) + b * p.q.s[0] + h * p.q.s[1] + row0 * p.q.s[2];
    const T* dog = static_cast<const T*>(p.dout.data) + b * p.dout.s[0] + h * p.dout.s[1] + row0 * p.dout.s[2];
    q_loader(Qs + buf * L::qo, qg, p.q.s[2], valid, d);
    do_loader(dOs + buf * L::qo, dog, p.dout.s[2], valid, dv);
    if (threadIdx.x < BM) {  // lse in log2 units, +inf where the row saw nothing (P = 0 there)
      const int r = threadIdx.x;
      const float l = r < valid ? p.lse[b * p.lse_s[0] + h * p.lse_s[1] + row0 + r] : neg_inf();  // lse rows: stride 1
      lse_s[buf * BM + r] = l == neg_inf() ? -neg_inf() : l * kLog2e;
      delta_s[buf * BM + r] = r < valid ? p.delta[bh * ws_tq + m0 + r] : 0.0f;
    }
    // ALiBi in log2 units as a table over the tile's key-query offsets: query m0 + c and key j0 + r
    // are i + offset - j = m0 + offset - j0 + c - r apart, entry c - r + BN - 1. Read per score
    // from shared memory, it holds no registers through the score loop, where the D = 128 kernels
    // have none to spare (255 on sm_90a). 0 without ALiBi.
    if (kScoreMod && threadIdx.x < L::bias - 1)
      bias_s[buf * L::bias + threadIdx.x] =
          alibi_slope2(sh, b, h) * fabsf(float(m0 + diagonal(sh) - j0 + int(threadIdx.x) - (BN - 1)));
  };

  float dk[kDT][4], dvacc[kDT][4];
#pragma unroll
  for (int n = 0; n < kDT; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[n][e] = dvacc[n][e] = 0.0f;

  // Visit order: per query head, the maskless query tiles (full_query_tiles) first, then the rest;
  // visit(k) is the query tile (counted from m_lo) of a head's k-th visit. Any order is safe for
  // the dQ turns: a key tile only ever waits for lower key tiles, which never wait for it.
  const QueryTiles maskless = full_query_tiles(sh, j0, BN, BM);
  const int full_lo = int(min(int64_t(per_head), max(int64_t(0), maskless.lo - m_lo)));
  const int n_full = int(max(int64_t(0), min(int64_t(per_head), maskless.hi - m_lo) - full_lo));
  auto visit = [&](int k) { return k < n_full ? full_lo + k : (k - n_full < full_lo ? k - n_full : k); };

  if (iters > 0) {
    const int valid = int(min(int64_t(BN), sh.tk - j0));
    TileLoader<T, HD, BN>{d}(Ks, kg + j0 * p.k.s[2], p.k.s[2], valid, d);
    TileLoader<T, HD, BN>{dv}(Vs, vg + j0 * p.v.s[2], p.v.s[2], valid, dv);
    load_tile(0, visit(0), 0);
    cp_async_commit();
  }
  // The q-th query tile visited; `masked` is a compile-time flag, as in the forward: per head, the
  // maskless query tiles run in a loop of their own with no visibility code.
  auto step = [&](int q, int hh, int k, auto masked) {
    constexpr bool full = !decltype(masked)::value;
    const int buf = int(q & 1);
    const int64_t h = h_first + hh, m = m_lo + visit(k), m0 = m * BM, bh = b * p.sh.heads + h;
    cp_async_wait<0>();
    __syncthreads();  // this tile landed; every warp is done with the other buffer and with dS^T
    const AttentionShape sh = own();
    if (q + 1 < iters) {  // the next visit: the next tile of this head, or the next head's first
      const bool same = k + 1 < per_head;
      load_tile(same ? hh : hh + 1, visit(same ? k + 1 : 0), buf ^ 1);
      cp_async_commit();
    }
    const T* Qb = Qs + buf * L::qo;
    const T* dOb = dOs + buf * L::qo;
    const float* lse_b = lse_s + buf * BM;
    const float* delta_b = delta_s + buf * BM;

    // S^T and dP^T: this warp's 16 keys x BM queries, over all of HD (the warps of one key group
    // under a column split each compute them: see the header)
    float st[kMT][4], dpt[kMT][4];
    mma_abt<T, HD, kMT>(st, Ks + key_row0 * ld, Qb, ld, lane);
    mma_abt<T, HD, kMT>(dpt, Vs + key_row0 * ld, dOb, ld, lane);

    // score-mod kernel: the ALiBi table entry of query column 2 quad and key row key_row0 + lane / 4
    const float* bias_b = bias_s + buf * L::bias + BN - 1 + 2 * quad - (key_row0 + lane / 4);
    bool seen[2] = {full, full};
    // partial tiles, per key row i: query columns [c_lo, c_hi) pass the bounds, causal and window
    // tests (32-bit from here on), and the mask row starts at mask_tile[i]
    int c_lo[2] = {0, 0}, c_hi[2] = {BM, BM};
    const char* mask_tile[2] = {nullptr, nullptr};
    if (!full) {
      const int64_t elt = p.sh.mask_kind == MaskKind::kBool ? 1 : int64_t(sizeof(T));
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int64_t j = j0 + key_row0 + lane / 4 + 8 * i;
        const Span seers = queries_seeing(sh, j, j);
        c_lo[i] = int(clamp_to(seers.lo - m0, BM));
        c_hi[i] = j < sh.tk ? int(clamp_to(seers.hi - m0, BM)) : 0;
        if (p.sh.mask_kind != MaskKind::kNone)
          mask_tile[i] = static_cast<const char*>(p.mask.data) +
                         (b * p.mask.s[0] + h * p.mask.s[1] + m0 * p.mask.s[2] + j * p.mask.s[3]) * elt;
      }
    }
#pragma unroll
    for (int n = 0; n < kMT; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int i = e / 2, c = n * 8 + quad * 2 + e % 2;  // key row i, query column c
        float x = st[n][e] * p.scale2;  // the score in log2 units
        [[maybe_unused]] float t = 0.0f;  // softcap: tanh of the capped raw score (0: no cap)
        if constexpr (kScoreMod) {
          if (p.cap_in != 0.0f) {
            t = fmaf(-2.0f, tanh_rcp(st[n][e] * p.cap_in), 1.0f);
            x = t * p.cap_out;
          }
          x += bias_b[n * 8 + e % 2 - 8 * i];  // ALiBi, after the cap
        }
        bool ok = true;
        if (!full) {
          ok = c >= c_lo[i] && c < c_hi[i];
          if (ok && p.sh.mask_kind == MaskKind::kBool) {
            ok = mask_tile[i][c * p.mask.s[2]] != 0;
          } else if (ok && p.sh.mask_kind == MaskKind::kAdditive) {
            x += to_float(reinterpret_cast<const T*>(mask_tile[i])[c * p.mask.s[2]]) * kLog2e;
            ok = x != neg_inf();
          }
          seen[i] = seen[i] || ok;
        }
        const float pr = ok ? exp2_approx(x - lse_b[c]) : 0.0f;
        st[n][e] = pr;
        if constexpr (kScoreMod)  // d capped / d raw = 1 - tanh^2 (1 without a cap; ALiBi is additive)
          dpt[n][e] = ok ? pr * (dpt[n][e] - delta_b[c]) * fmaf(-t, t, 1.0f) : 0.0f;
        else
          dpt[n][e] = ok ? pr * (dpt[n][e] - delta_b[c]) : 0.0f;  // dS^T; hidden: exactly 0, even if dP is NaN
      }

    // dV += P^T dO, dK += dS^T Q (this warp's columns of them)
    {
      uint32_t a[kMT / 2][4];
      as_a_fragments<T, kMT>(a, st);
      mma_ab_trans<T, kMT / 2, kDT>(dvacc, a, dOb + col0, ld, lane);
      as_a_fragments<T, kMT>(a, dpt);
      mma_ab_trans<T, kMT / 2, kDT>(dk, a, Qb + col0, ld, lane);
#pragma unroll
      for (int n = 0; n < kMT; ++n) {  // dS^T into shared memory for dQ; a key group's slices share the columns
        if (n % L::kColSplit != slice) continue;
        *reinterpret_cast<uint32_t*>(dSs + (key_row0 + lane / 4) * lds + n * 8 + quad * 2) = a[n / 2][n % 2 * 2];
        *reinterpret_cast<uint32_t*>(dSs + (key_row0 + lane / 4 + 8) * lds + n * 8 + quad * 2) =
            a[n / 2][n % 2 * 2 + 1];
      }
    }
    if (!full) {  // which of this warp's keys some query of the tile sees
      for (int i = 0; i < 2; ++i) {  // every lane shuffles (no short-circuit || around it)
        int any = seen[i];
        any |= __shfl_xor_sync(0xffffffffu, any, 1);
        any |= __shfl_xor_sync(0xffffffffu, any, 2);
        seen[i] = any != 0;
      }
      const uint32_t lo = __ballot_sync(0xffffffffu, seen[0]), hi = __ballot_sync(0xffffffffu, seen[1]);
      uint32_t bits = 0;
      for (int r = 0; r < 8; ++r) bits |= (lo >> (4 * r) & 1) << r | (hi >> (4 * r) & 1) << (r + 8);
      if (lane == 0 && slice == 0) live_s[key_row0 / 16] = bits;  // one writer per key group
    }
    __syncthreads();  // dS^T and live_s complete

    // this warp's dQ slice, queries rb * 16.. and columns cb * kCW.., as dQ = dS K over the BN
    // keys, in chunks of kQC columns (fewer live registers), each added to the dQ sum when it is
    // this key tile's turn (key tiles in order: deterministic). The turn is taken after the first
    // chunk's product and handed on after the last chunk's sums.
    const int rb = warp % kWR, cb = warp / kWR;
    constexpr int kQC = kCW % 32 == 0 ? 32 : kCW;
    // the key tiles adding into query tile m are a run from first_key_tile, where delta_kernel
    // starts its turn counter: key tile n's turn is n
    int* turn = p.dq_turn + bh * m_tiles + m;  // the workspace's (b, h, query tile)
#pragma unroll
    for (int c0 = 0; c0 < kCW; c0 += kQC) {
      float dq[kQC / 8][4];
#pragma unroll
      for (int n = 0; n < kQC / 8; ++n) dq[n][0] = dq[n][1] = dq[n][2] = dq[n][3] = 0.0f;
#pragma unroll
      for (int ks = 0; ks < BN / 16; ++ks) {
        uint32_t a[4];
        ldmatrix_x4_trans(a, dSs + (ks * 16 + lane / 16 * 8 + lane % 8) * lds + rb * 16 + (lane / 8) % 2 * 8);
        uint32_t keep_lo = 0xffffffffu, keep_hi = 0xffffffffu;  // K entries of keys nobody sees: 0
        if (!full) keep_lo = keep_halves(live_s[ks], quad * 2), keep_hi = keep_halves(live_s[ks], quad * 2 + 8);
#pragma unroll
        for (int n = 0; n < kQC / 8; n += 2) {
          uint32_t f[4];
          ldmatrix_x4_trans(f, Ks + (ks * 16 + (lane / 8) % 2 * 8 + lane % 8) * ld + cb * kCW + c0 + n * 8 + lane / 16 * 8);
          mma_m16n8k16<T>(dq[n], a, f[0] & keep_lo, f[1] & keep_hi);
          mma_m16n8k16<T>(dq[n + 1], a, f[2] & keep_lo, f[3] & keep_hi);
        }
      }
      if (c0 == 0) {
        if (threadIdx.x == 0) wait_flag(turn, int(th.tile));
        __syncthreads();
      }
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int64_t t = m0 + rb * 16 + lane / 4 + 8 * i;
        // Tq read here, after the turn's barrier (no register held since the tile's start); the
        // plain kernel's maskless tiles lie wholly inside Tq and skip the test (the score-mod
        // kernel keeps it: without it, ptxas' allocation at D = 128 spills 8 bytes on sm_90a)
        if ((kScoreMod || !full) && t >= seq_s->tq) continue;
        float* row = p.dq_acc + (bh * ws_tq + t) * dq_ld(d);
#pragma unroll
        for (int n = 0; n < kQC / 8; ++n) {
          const int c = cb * kCW + c0 + n * 8 + quad * 2;
          if (c < int(d)) {  // rows are an even number of floats apart: float2 aligned
            float2* at = reinterpret_cast<float2*>(row + c);
            float2 old = load_l2(at);
            old.x += dq[n][2 * i], old.y += dq[n][2 * i + 1];
            store_l2(at, old);
          }
        }
      }
    }
    __syncthreads();  // every thread's sums are issued; signal_flag fences them before the flag
    if (threadIdx.x == 0) signal_flag(turn, int(th.tile) + 1);
  };
  int q = 0;
  for (int hh = 0; hh < int(hpc); ++hh) {
    for (int k = 0; k < n_full; ++k) step(q++, hh, k, std::false_type{});
    for (int k = n_full; k < per_head; ++k) step(q++, hh, k, std::true_type{});
  }

  // dK (scaled) and dV of this CTA's keys: straight into grad_k/grad_v, or fp32 partials
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int64_t j = j0 + key_row0 + lane / 4 + 8 * i;
    if (j >= seq.tk) continue;
#pragma unroll
    for (int n = 0; n < kDT; ++n)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int64_t c = col0 + n * 8 + quad * 2 + e;
        if (p.head_splits == 1) {
          const int64_t at = b * p.dkv_s[0] + hk * p.dkv_s[1] + (seq.k0 + j) * p.dkv_s[2];
          if (c < d) static_cast<T*>(p.grad_k)[at * d + c] = from_float<T>(dk[n][2 * i + e] * p.sh.scale);
          if (c < dv) static_cast<T*>(p.grad_v)[at * dv + c] = from_float<T>(dvacc[n][2 * i + e]);
        } else {  // partials at the launch's (b, hk, split, j < max_seqlen_k)
          float* part = p.dkv_part + ((bhk * p.head_splits + split) * p.sh.tk + j) * (d + dv);
          if (c < d) part[c] = dk[n][2 * i + e] * p.sh.scale;
          if (c < dv) part[d + c] = dvacc[n][2 * i + e];
        }
      }
  }
}

template <typename T, int HD, int BM, int BN>
__global__ void __launch_bounds__(kThreads, 2) backward_kernel(const Params p) {
  backward_tiles<T, HD, BM, BN, false>(p);
}

template <typename T, int HD, int BM, int BN>
__global__ void __launch_bounds__(kThreads, 2) backward_score_mod_kernel(const Params p) {
  backward_tiles<T, HD, BM, BN, true>(p);
}

// delta = rowsum(dO * O) in fp32, one warp per row (O contiguous, dO strided). The first row of
// each query tile (of bm rows) also starts the tile's dQ turn counter at the first key tile that
// adds into it (a window's left edge makes that > 0; computed here, it costs the backward kernel
// no registers). Rows run over the workspace's (b, h, t < the launch's tq); varlen rows past their
// sequence's end have nothing to do.
template <typename T>
__global__ void delta_kernel(const Params p, int bm, int bn) {
  const int64_t r = int64_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32, dv = p.sh.value_dim;
  if (r >= p.sh.batch * p.sh.heads * p.sh.tq) return;
  const int64_t b = r / (p.sh.heads * p.sh.tq), h = r / p.sh.tq % p.sh.heads, t = r % p.sh.tq;
  const SeqSpan seq = seq_span(p.sh, b);
  if (t >= seq.tq) return;
  const int64_t row = b * p.out_s[0] + h * p.out_s[1] + (seq.q0 + t) * p.out_s[2];
  const T* o = static_cast<const T*>(p.out) + row * dv;
  const T* go = static_cast<const T*>(p.dout.data) + b * p.dout.s[0] + h * p.dout.s[1] + (seq.q0 + t) * p.dout.s[2];
  float acc = 0.0f;
  for (int64_t c = threadIdx.x % 32; c < dv; c += 32) acc += to_float(o[c]) * to_float(go[c]);
  for (int s = 16; s > 0; s /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, s);
  if (threadIdx.x % 32 == 0) p.delta[r] = acc;
  if (threadIdx.x % 32 == 0 && t % bm == 0)
    p.dq_turn[r / p.sh.tq * ((p.sh.tq + bm - 1) / bm) + t / bm] =
        int(first_key_tile(seq_shape(p.sh, seq.tq, seq.tk), t, bn));
}

// grad_q = scale * dQ sum; with head splits, grad_k/grad_v = the partials summed in split order.
// Both walk the workspace's rows (b, h, t < the launch's tq or tk) and write the outputs' rows
// through the layouts (varlen: packed, rows past a sequence's end skipped).
template <typename T>
__global__ void finish_kernel(const Params p) {
  const AttentionShape& sh = p.sh;
  const int64_t d = sh.head_dim, dv = sh.value_dim, nq = sh.batch * sh.heads * sh.tq * d;
  const int64_t nkv = p.head_splits > 1 ? sh.batch * sh.kv_heads * sh.tk * (d + dv) : 0;
  const bool varlen = sh.cu_seqlens_q != nullptr;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < nq + nkv; i += int64_t(gridDim.x) * blockDim.x) {
    if (i < nq) {
      int64_t at = i;  // dense: grad_q is laid out as the workspace
      if (varlen) {
        const int64_t r = i / d, bh = r / sh.tq, t = r % sh.tq, b = bh / sh.heads;
        const SeqSpan seq = seq_span(sh, b);
        if (t >= seq.tq) continue;
        at = (b * p.out_s[0] + bh % sh.heads * p.out_s[1] + (seq.q0 + t) * p.out_s[2]) * d + i % d;
      }
      static_cast<T*>(p.grad_q)[at] = from_float<T>(p.dq_acc[i / d * dq_ld(d) + i % d] * sh.scale);
      continue;
    }
    const int64_t r = (i - nq) / (d + dv), c = (i - nq) % (d + dv), bhk = r / sh.tk, j = r % sh.tk;
    const int64_t b = bhk / sh.kv_heads, hk = bhk % sh.kv_heads;
    const SeqSpan seq = seq_span(sh, b);
    if (j >= seq.tk) continue;
    float acc = 0.0f;
    for (int64_t s = 0; s < p.head_splits; ++s) acc += p.dkv_part[((bhk * p.head_splits + s) * sh.tk + j) * (d + dv) + c];
    const int64_t at = b * p.dkv_s[0] + hk * p.dkv_s[1] + (seq.k0 + j) * p.dkv_s[2];
    if (c < d) static_cast<T*>(p.grad_k)[at * d + c] = from_float<T>(acc);
    else static_cast<T*>(p.grad_v)[at * dv + c - d] = from_float<T>(acc);
  }
}

// The one table of backward tile shapes: f(BwdTiles<HD, BM, BN>{}) for head dim hd (<= 256).
template <typename F>
auto with_bwd_tiles(int64_t hd, F&& f) {
  if (hd <= 32) return f(BwdTiles<32, 64, 64>{});
  if (hd <= 64) return f(BwdTiles<64, 64, 64>{});
  // 65..96 (80 included) on 96-wide tiles: BM = 64 spills there, and BM = 32 needs the dQ slice
  // (D / 2) to be a multiple of 16
  if (hd <= 96) return f(BwdTiles<96, 32, 64>{});
  if (hd <= 128) return f(BwdTiles<128, 32, 64>{});
  // 129..256: 32 keys per CTA, two warps per 16 keys each owning half of dK/dV's columns, 16
  // queries per tile: 68 KB of shared memory (see the header)
  return f(BwdTiles<256, 16, 32>{});
}

// Query heads of a GQA group split over this many CTAs per key tile: enough CTAs for about two
// per SM (MQA at B = 1 has only Tk / BN key tiles otherwise), always a divisor of the group.
int64_t head_splits(const AttentionShape& sh) {
  const int64_t bn = with_bwd_tiles(max_head_dim(sh), [](auto t) { return int64_t(t.kBN); });
  const int64_t group = sh.heads / sh.kv_heads, ctas = sh.batch * sh.kv_heads * key_tiles(sh.tk, bn);
  int device = 0, sms = 0;
  if (group == 1 || cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess)
    return 1;
  int64_t s = 1;
  while (s < group && ctas * s < 2 * sms) {
    do ++s; while (group % s != 0);
  }
  return s;
}

int64_t dq_tiles(const AttentionShape& sh) {
  return with_bwd_tiles(max_head_dim(sh), [&](auto t) { return (sh.tq + t.kBM - 1) / t.kBM; });
}

// The fp32 workspace, in floats, each region 16-byte aligned (the dQ sums are read and
// written as float2, so an odd B * H * Tq of delta before them must not shift them).
struct BwdWorkspace {
  int64_t delta, dq, turns, ticket, part, end;
};
BwdWorkspace bwd_workspace(const AttentionShape& sh, int64_t splits) {
  auto up4 = [](int64_t n) { return (n + 3) / 4 * 4; };
  BwdWorkspace w{};
  w.dq = up4(sh.batch * sh.heads * sh.tq);                                // after delta
  w.turns = w.dq + up4(sh.batch * sh.heads * sh.tq * dq_ld(sh.head_dim));  // ints from here
  w.ticket = w.turns + up4(sh.batch * sh.heads * dq_tiles(sh));
  w.part = w.ticket + 4;
  w.end = w.part + (splits > 1 ? sh.batch * sh.kv_heads * splits * sh.tk * (sh.head_dim + sh.value_dim) : 0);
  return w;
}

template <typename T, int HD, int BM, int BN>
int launch(const Params& p, cudaStream_t stream) {
  const size_t bytes = BwdTiles<HD, BM, BN>::bytes;
  auto* kernel = score_mod(p.sh) ? backward_score_mod_kernel<T, HD, BM, BN> : backward_kernel<T, HD, BM, BN>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes));
  if (err != cudaSuccess) return int(err);
  const AttentionShape& sh = p.sh;
  const int64_t rows = sh.batch * sh.heads * sh.tq;  // delta: one warp per query row
  launch_kernel(delta_kernel<T>, unsigned((rows + 7) / 8), 256, 0, stream, p, BM, BN);
  const unsigned grid = unsigned(key_tiles(sh.tk, BN) * sh.batch * sh.kv_heads * p.head_splits);
  launch_kernel(kernel, grid, kThreads, bytes, stream, p);
  const int64_t finish = sh.batch * sh.heads * sh.tq * sh.head_dim +
                         (p.head_splits > 1 ? sh.batch * sh.kv_heads * sh.tk * (sh.head_dim + sh.value_dim) : 0);
  launch_kernel(finish_kernel<T>, unsigned(min(int64_t(1024), (finish + 255) / 256)), 256, 0, stream, p);
  return int(cudaGetLastError());
}

}  // namespace
}  // namespace fastlm::cuda::attn

namespace fastlm {

int64_t attention_backward_cuda_smem(int64_t head_dim, int64_t value_dim) {
  const int64_t hd = head_dim > value_dim ? head_dim : value_dim;
  return cuda::attn::with_bwd_tiles(hd, [](auto t) { return int64_t(t.bytes); });
}

std::vector<int64_t> attention_backward_index_plan(const AttentionShape& shape) {
  const auto [bm, bn] = cuda::attn::with_bwd_tiles(cuda::attn::max_head_dim(shape), [](auto t) {
    return std::pair<int64_t, int64_t>{t.kBM, t.kBN};
  });
  std::vector<int64_t> plan{bm, bn};
  for (int64_t j0 = 0; j0 < shape.tk; j0 += bn) {
    const cuda::attn::QueryTiles seen = cuda::attn::query_tiles(shape, j0, bn, bm);
    const cuda::attn::QueryTiles full = cuda::attn::full_query_tiles(shape, j0, bn, bm);
    plan.insert(plan.end(), {seen.lo, seen.hi, full.lo, full.hi});
  }
  return plan;
}

AttentionBackwardWorkspace attention_backward_cuda_workspace(const AttentionShape& shape) {
  const int64_t splits = cuda::attn::head_splits(shape);
  return {cuda::attn::bwd_workspace(shape, splits).end, splits};
}

int attention_backward_cuda(const AttentionShape& shape, Strided4 grad_out, Strided4 q, Strided4 k, Strided4 v,
                            Strided4 mask, const void* out, const float* lse, float* workspace, void* grad_q,
                            void* grad_k, void* grad_v, cudaStream_t stream) {
  const AttentionBackwardWorkspace ws = attention_backward_cuda_workspace(shape);
  cuda::attn::Params p{shape, q, k, v, mask, const_cast<void*>(out), const_cast<float*>(lse), grad_out};  // dout
  const cuda::attn::BwdWorkspace at = cuda::attn::bwd_workspace(shape, ws.head_splits);
  p.delta = workspace + at.delta;
  p.dq_acc = workspace + at.dq;
  p.dq_turn = reinterpret_cast<int*>(workspace + at.turns);
  p.cta_ticket = reinterpret_cast<int*>(workspace + at.ticket);
  p.dkv_part = workspace + at.part;
  p.head_splits = ws.head_splits;
  p.grad_q = grad_q, p.grad_k = grad_k, p.grad_v = grad_v;
  cuda::attn::set_layouts(p, is_varlen(shape) ? cuda::attn::Layout::kVarlen : cuda::attn::Layout::kDense);
  cuda::attn::set_score_params(p);
  // the dQ sums, turn counters and ticket start at 0 (delta_kernel then moves each turn counter to
  // its first key tile); delta and the partials are written whole
  const cudaError_t err = cudaMemsetAsync(workspace + at.dq, 0, size_t(at.part - at.dq) * sizeof(float), stream);
  if (err != cudaSuccess) return int(err);
  const int64_t hd = cuda::attn::max_head_dim(shape);
  return cuda::attn::with_bwd_tiles(hd, [&](auto t) {
    using L = decltype(t);
    if (shape.dtype == DType::kFloat16) return cuda::attn::launch<__half, L::kHD, L::kBM, L::kBN>(p, stream);
    return cuda::attn::launch<__nv_bfloat16, L::kHD, L::kBM, L::kBN>(p, stream);
  });
}

}  // namespace fastlm
