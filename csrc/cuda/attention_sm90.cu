// Flash attention forward for Hopper (sm_90a), FlashAttention-3's design: TMA loads, an mbarrier
// pipeline, warp specialisation and wgmma. The sm_80 kernel (attention.cu) serves everything this
// tier refuses; attention_sm90_why_not is the one host function that decides (see attention.h).
// One CTA = 128 query rows of one (batch, head), 384 threads = 3 warpgroups:
//   producer   warpgroup 0 gives its registers away (setmaxnreg 24); one thread of it issues every
//              load by TMA: Q once (128 rows), then per key tile of 128 keys K_j and V_j into a
//              2-stage ring, each stage guarded by a full barrier (TMA's transaction bytes) and an
//              empty one (the 256 consumer threads' arrivals). 128-byte swizzle: a tile is stored
//              as 64-column blocks of 128-byte rows, the layout wgmma reads without bank conflicts.
//   consumers  warpgroups 1 and 2 (setmaxnreg 240), 64 query rows each. Per key tile:
//                S = Q K_j^T   wgmma SS m64n128k16, both operands K-major from the swizzled tiles,
//                              HD/16 instructions (+32 bytes of start address per k16 step);
//                softmax       on the accumulator fragments in registers (a row is one quad of a
//                              warp: 2 shuffles for its max), base 2 with scale * log2(e) folded
//                              into one FFMA per score before MUFU.EX2; the row sum stays
//                              lane-partial until the epilogue;
//                O += P V_j    P rounded to f16/bf16 in registers (the accumulator's n8 pairs are
//                              wgmma's A fragment) and wgmma RS m64nHDk16 with V MN-major (the
//                              transpose flag): 8 instructions, O stays in 64 x HD fp32 registers.
//              Overlap, as FA3: each warpgroup issues S_j and the previous tile's O += P_{j-1} V_{j-1}
//              together, then runs the softmax of S_j while that PV product is in flight, and waits
//              for it only before rescaling O. Ping-pong: the two warpgroups take turns issuing
//              their GEMMs through two named barriers (warpgroup 2 opens the first turn for 1), so
//              one warpgroup's softmax (MUFU, FMNMX, shuffles) runs while the other's wgmmas hold
//              the tensor cores. Done because the softmax is ~2/3 of a warpgroup's issued
//              instructions (below) and FA3's ablation credits the overlap with a good part of its
//              speed, while it costs two bar instructions per tile. Both warpgroups walk the
//              CTA's same key tiles, so their turns pair up exactly (warpgroup 2 skips handing
//              over its last turn, which nobody would take).
//              A NaN in a key the CTA walks but a row may not see (the diagonal tile, Tk's tail is
//              zero fill) reaches that row as 0 x NaN, as in torch's math; the sm_80 kernel
//              clears such V rows per warp in registers, which wgmma's shared-memory V cannot.
//   masking    the CTA walks only the keys its rows may see (attention_common.cuh key_range: causal
//              top-left and bottom-right, the Tk end); tiles it sees whole run a maskless step with
//              no visibility code (the SASS main loop), the diagonal and Tk-edge tiles a masked one,
//              and tiles nobody sees are never loaded. Rows past Tq and keys past Tk are TMA's zero
//              fill (the 4-D tensor maps are (d, t, head, batch), so a box never reads the next
//              head's rows); keys past Tk are also masked, so a NaN there cannot reach O.
// Head dims 64..128 (multiples of 8; the tile is HD = 64 or 128 and TMA zero-fills columns past
// D), fp16/bf16, (B, H, T, D) inputs with any 16-byte multiple strides (contiguous, or the (B, T,
// H, D) projection output seen through a transpose: no copy) and a contiguous last dim, Tq > 16, GQA/MQA, no user mask, softcap, window, ALiBi, sinks,
// varlen or dropout (those stay on the sm_80 kernel, which also packs decode-like GQA calls).
// D = 256 would need 64-key tiles (192 KB of stages) and is not built: the sm_80 kernel serves it.
// Shared memory: Q 128 x HD + 2 stages x (K + V) 128 x HD halves = 160 KB at HD = 128 (80 KB at
// 64), + 72 bytes of barriers + 1 KB to align the swizzled tiles: one CTA per SM.
// Registers: compiled at 168 per thread (384 threads, one CTA per SM; ptxas: no spills), then
// setmaxnreg: consumers 240 (S 64 + O HD/2 + P 32 fp32/b32 per thread), producer 24: 2 x 128 x
// 240 + 128 x 24 = 64,512 of the SM's 65,536.
// Arithmetic (HD = 128, per consumer warpgroup and key tile): 16 HGMMA (8 SS m64n128k16 + 8 RS
// m64n128k16), 2 x 64 x 128 x 128 x 2 = 4.2 MFLOP; per thread 64 scores: 64 FFMA + 64 MUFU.EX2,
// 64 FMNMX, 64 FADD, 32 F2FP, 64 FMUL (O rescale) and 4 SHFL: ~350 instructions, 22 per HGMMA.
// The compiled main loop (the maskless tiles, sm_90a SASS counted by scripts/sass_report.py,
// asserted in tests/test_sass_report.py) is 527 instructions for 16 HGMMA, 32.9 per HGMMA (HD = 64:
// 471 for 12, 39.3): the softmax plus descriptor offsets, mbarrier waits/arrives and the two turn
// barriers. One HGMMA m64n128k16 is 16 HMMA.16816 of work per warp, so that is ~2.1 instructions
// per HMMA-equivalent against the sm_80 kernel's 5.9. ptxas keeps every wgmma of a tile in one
// pipeline (no serialization warning: the V wait sits before the first wgmma, the first tile is
// peeled, so no wait loop or branch lies between a tile's wgmmas). An HGMMA m64n128k16 occupies
// the SM's tensor cores 32 cycles (1024 dense fp16 FLOP/clk/SM), so a warpgroup's 16 take 512
// cycles while it issues ~530 instructions: the softmax hides behind the other warpgroup's GEMMs
// only if the two alternate, hence the ping-pong. Bytes in flight: up to 2 stages x 64 KB of K/V
// per SM (H100: 3.35 TB/s x ~1 us / 132 SMs = 25 KB needed), so loads are not the limit. Expected
// share of the dense fp16 peak (an estimate, never measured here): 50-60% at D = 128 for long
// non-causal sequences (FA3 reports ~70% with a persistent scheduler, intra-warpgroup pipelining
// of two tiles and an smem+TMA epilogue, all absent here: the epilogue stores O pairs straight
// from registers).
// CI executes it under the emulator's sm_90 profile against the float64 oracle
// (tests/test_attention_sm90.py). What only a GPU executes: the real TMA descriptors
// (cuTensorMapEncodeTiled), setmaxnreg's reallocation, fence_operands' pinning of wgmma registers
// and binary_is_sm90a's query and its cache (built_why_not); the emulator completes a wgmma at its
// call, so it cannot catch a register of S, O or P touched while its wgmma is in flight (read the
// waits).
#include "attention_common.cuh"
#include "attention_sm90.cuh"
#include "ptx_sm90.cuh"

#include <atomic>

#if defined(FASTLM_EMU) && !defined(__grid_constant__)
#define __grid_constant__
#endif

namespace fastlm::cuda::attn90 {
using namespace sm90;
using attn::KeyRange;
using attn::Span;

constexpr int kBM = 128, kBN = 128;  // query rows per CTA, keys per tile
constexpr int kStages = 2;
constexpr int kConsumers = 2, kConsumerThreads = 128 * kConsumers, kThreads = 128 + kConsumerThreads;
constexpr int kProducerRegs = 24, kConsumerRegs = 240;
constexpr int kBlockCols = 64;  // columns per 128-byte swizzle block (16-bit elements)
constexpr int kTurn0 = 1, kTurn1 = 2;  // named barrier ids of the consumers' GEMM turns (0 is __syncthreads)
constexpr float kLn2 = 0.6931471805599453f;

template <int HD>
struct Smem {
  static constexpr uint32_t kBlocks = HD / kBlockCols;
  static constexpr uint32_t q_bytes = kBM * HD * 2, kv_bytes = kBN * HD * 2;
  static constexpr uint32_t k_at = q_bytes, v_at = k_at + kStages * kv_bytes, bar_at = v_at + kStages * kv_bytes;
  static constexpr uint32_t kBars = 1 + 4 * kStages;  // q_full; k_full, v_full, k_empty, v_empty per stage
  static constexpr size_t bytes = bar_at + kBars * 8 + 1024;  // + the slack to align the base to 1024
};

struct Params90 {
  TmaDesc q, k, v;  // 4-D maps (d, t, head, batch), box (64, 128, 1, 1), 128-byte swizzle
  AttentionShape sh;
  void* out;
  float* lse;
  int64_t out_s[3], lse_s[3];  // rows of out / floats of lse per (batch, head, t), as attn::Params
  float scale2;                // scale * log2(e)
};

// Keeps the compiler from moving reads or writes of wgmma's registers across the asynchronous
// wgmma (CUTLASS's warpgroup_fence_operand); not in ptx_sm90.cuh's API, hence local. Nothing to
// do in the emulator, where a wgmma completes at its call.
template <int N>
__device__ __forceinline__ void fence_operands(float (&r)[N]) {
#ifndef FASTLM_EMU
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
#endif
}
template <int N>
__device__ __forceinline__ void fence_operands(uint32_t (&r)[N][4]) {
#ifndef FASTLM_EMU
#pragma unroll
  for (int i = 0; i < N; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) asm volatile("" : "+r"(r[i][j])::"memory");
#endif
}

template <typename T, int HD>
__device__ __forceinline__ void forward_tiles(const Params90& p) {
  using L = Smem<HD>;
  constexpr int kNT = kBN / 8, kKS = kBN / 16;  // n8 blocks of S, k16 steps of P V
  FASTLM_DYNAMIC_SHARED(unsigned char, smem_raw);
  // 128-byte swizzled tiles must start on 1024-byte boundaries (the pattern's repeat) of the
  // shared address space: the address as a descriptor's start field holds it (bits 4-17)
  const uint32_t raw_at = uint32_t(smem_desc(smem_raw, TmaSwizzle::kNone, 0, 0) & 0x3fff) << 4;
  unsigned char* smem = smem_raw + (1024 - raw_at % 1024) % 1024;
  T* Qs = reinterpret_cast<T*>(smem);
  auto Ks = [&](int st) { return reinterpret_cast<T*>(smem + L::k_at + st * L::kv_bytes); };
  auto Vs = [&](int st) { return reinterpret_cast<T*>(smem + L::v_at + st * L::kv_bytes); };
  uint64_t* bars = reinterpret_cast<uint64_t*>(smem + L::bar_at);
  uint64_t* q_full = bars;
  uint64_t *k_full = bars + 1, *v_full = k_full + kStages, *k_empty = v_full + kStages, *v_empty = k_empty + kStages;

  const AttentionShape& sh = p.sh;
  const int64_t m_tiles = (sh.tq + kBM - 1) / kBM, bh = blockIdx.x / m_tiles, m0 = blockIdx.x % m_tiles * kBM;
  const int64_t b = bh / sh.heads, h = bh % sh.heads, kv_h = h / (sh.heads / sh.kv_heads);
  const KeyRange kr = attn::key_range(sh, sh.tq, m0, kBM, 0, sh.tk, kBN);
  const int tiles = kr.hi > kr.lo ? int((kr.hi - kr.lo + kBN - 1) / kBN) : 0;

  if (threadIdx.x == 0) {
    mbar_init(q_full, 1);
    for (int st = 0; st < kStages; ++st) {
      mbar_init(&k_full[st], 1), mbar_init(&v_full[st], 1);
      mbar_init(&k_empty[st], kConsumerThreads), mbar_init(&v_empty[st], kConsumerThreads);
    }
    fence_barrier_init();
  }
  __syncthreads();

  const int wg = threadIdx.x / 128;
  if (wg == 0) {  // the producer: one thread issues every TMA load
    setmaxnreg_dec<kProducerRegs>();
    if (threadIdx.x != 0 || tiles == 0) return;
    tma_prefetch_desc(&p.k), tma_prefetch_desc(&p.v);
    mbar_arrive_expect_tx(q_full, L::q_bytes);
    for (int blk = 0; blk < int(L::kBlocks); ++blk)
      tma_load_4d(Qs + blk * kBM * kBlockCols, &p.q, blk * kBlockCols, int(m0), int(h), int(b), q_full);
    for (int i = 0; i < tiles; ++i) {
      const int st = i % kStages, use = i / kStages, j0 = int(kr.lo) + i * kBN;
      if (use > 0) mbar_wait(&k_empty[st], (use - 1) & 1);  // the consumers are done with K_{i-2}
      mbar_arrive_expect_tx(&k_full[st], L::kv_bytes);
      for (int blk = 0; blk < int(L::kBlocks); ++blk)
        tma_load_4d(Ks(st) + blk * kBN * kBlockCols, &p.k, blk * kBlockCols, j0, int(kv_h), int(b), &k_full[st]);
      if (use > 0) mbar_wait(&v_empty[st], (use - 1) & 1);
      mbar_arrive_expect_tx(&v_full[st], L::kv_bytes);
      for (int blk = 0; blk < int(L::kBlocks); ++blk)
        tma_load_4d(Vs(st) + blk * kBN * kBlockCols, &p.v, blk * kBlockCols, j0, int(kv_h), int(b), &v_full[st]);
    }
    return;
  }

  setmaxnreg_inc<kConsumerRegs>();
  const int c = wg - 1;  // consumer 0 or 1: query rows m0 + 64 c ..
  const int lane = threadIdx.x % 32, quad = lane % 4, warp = threadIdx.x / 32 % 4;
  const int my_turn = c == 0 ? kTurn0 : kTurn1, their_turn = c == 0 ? kTurn1 : kTurn0;
  int64_t t_row[2];  // this thread's rows of S and O: 16 warp + lane / 4 (+ 8) of the warpgroup's 64
#pragma unroll
  for (int i = 0; i < 2; ++i) t_row[i] = m0 + 64 * c + 16 * warp + lane / 4 + 8 * i;

  // wgmma operand descriptors (ptx_sm90.cuh has the layouts): Q and K K-major, 128-byte swizzle,
  // 8-row groups 1024 bytes apart (SBO), a k16 step +32 bytes inside a 64-column block; V MN-major,
  // 64-column blocks one 128-row tile apart (LBO), 8 keys 1024 bytes apart (SBO), a k16 step = 16
  // keys. Built once; a step adds its byte offset / 16 to the start address field (bits 0-13),
  // which cannot carry out: every shared address is below 2^18.
  const uint64_t q_base = smem_desc(Qs + 64 * c * kBlockCols, TmaSwizzle::k128B, 16, 1024);
  const uint64_t k_base = smem_desc(Ks(0), TmaSwizzle::k128B, 16, 1024);
  const uint64_t v_base = smem_desc(Vs(0), TmaSwizzle::k128B, kBN * kBlockCols * 2, 1024);
  auto q_desc = [&](int kk) { return q_base + ((kk / 4) * kBM * 128 + kk % 4 * 32) / 16; };
  auto k_desc = [&](int st, int kk) { return k_base + (st * L::kv_bytes + (kk / 4) * kBN * 128 + kk % 4 * 32) / 16; };
  auto v_desc = [&](int st, int ks) { return v_base + (st * L::kv_bytes + ks * 16 * 128) / 16; };

  float o[HD / 2];
#pragma unroll
  for (int n = 0; n < HD / 2; ++n) o[n] = 0.0f;
  float m_run[2] = {attn::neg_inf(), attn::neg_inf()}, l_run[2] = {0.0f, 0.0f};  // max in log2 units
  float s[kBN / 2];       // S of the tile, then P in fp32
  uint32_t pa[kKS][4];    // P of the previous tile as wgmma A fragments

  // One key tile; `masked` is a compile-time flag, so the maskless tiles get a loop of their own
  // whose body has no visibility code (the SASS main loop).
  auto step = [&](int i, auto masked, auto first) {
    constexpr bool kMasked = decltype(masked)::value, kFirst = decltype(first)::value;
    const int st = i % kStages;
    const int64_t j0 = kr.lo + int64_t(i) * kBN;
    const int prev = (i + kStages - 1) % kStages;
    mbar_wait(&k_full[st], (i / kStages) & 1);
    // V_{i-1} too before the first wgmma: a wait loop between the two GEMMs' wgmmas would be a
    // divergent path inside the wgmma pipeline, and ptxas then serializes every wgmma
    if constexpr (!kFirst) mbar_wait(&v_full[prev], ((i - 1) / kStages) & 1);
    named_barrier_sync(my_turn, kConsumerThreads);  // our turn on the tensor cores
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < HD / 16; ++kk) wgmma_ss<T, kBN, false, false>(s, q_desc(kk), k_desc(st, kk), kk > 0);
    wgmma_commit();
    if constexpr (!kFirst) {  // the previous tile's O += P V, in flight during this tile's softmax
#pragma unroll
      for (int ks = 0; ks < kKS; ++ks) wgmma_rs<T, HD, true>(o, pa[ks], v_desc(prev, ks), true);
      wgmma_commit();
    }
    // hand the turn over; consumer 1's last turn has no taker (consumer 0 is done issuing)
    if (c == 0 || i + 1 < tiles) named_barrier_arrive(their_turn, kConsumerThreads);
    if constexpr (kFirst) wgmma_wait<0>();
    else wgmma_wait<1>();
    fence_operands(s);
    mbar_arrive(&k_empty[st]);

    float mul = p.scale2;  // what still multiplies s on the way to log2 units
    if constexpr (kMasked) {
      // per row, keys [j0 + first, j0 + lim) pass the causal and Tk tests; rows past Tq see none
      int first[2], lim[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const Span seen = attn::keys_seen(sh, t_row[r], t_row[r]);
        first[r] = int(attn::clamp_to(seen.lo - j0, kBN));
        lim[r] = t_row[r] < sh.tq ? int(attn::clamp_to(seen.hi - j0, kBN)) : 0;
      }
#pragma unroll
      for (int n = 0; n < kNT; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int r = e / 2, col = n * 8 + quad * 2 + e % 2;
          s[4 * n + e] = col >= first[r] && col < lim[r] ? s[4 * n + e] * p.scale2 : attn::neg_inf();
        }
      mul = 1.0f;
    }
    float alpha[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = attn::neg_inf();
#pragma unroll
      for (int n = 0; n < kNT; ++n) mx = fmaxf(mx, fmaxf(s[4 * n + 2 * r], s[4 * n + 2 * r + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float m_new = fmaxf(m_run[r], mx * mul);
      const float sub = m_new == attn::neg_inf() ? 0.0f : m_new;  // a row that sees nothing yet stays at 0
      alpha[r] = exp2_approx(m_run[r] - sub);
      m_run[r] = m_new;
      float sum = 0.0f;
#pragma unroll
      for (int n = 0; n < kNT; ++n) {
        s[4 * n + 2 * r] = exp2_approx(fmaf(s[4 * n + 2 * r], mul, -sub));
        s[4 * n + 2 * r + 1] = exp2_approx(fmaf(s[4 * n + 2 * r + 1], mul, -sub));
        sum += s[4 * n + 2 * r] + s[4 * n + 2 * r + 1];
      }
      l_run[r] = l_run[r] * alpha[r] + sum;
    }
    if constexpr (!kFirst) {
      wgmma_wait<0>();  // O += P_{i-1} V_{i-1} is done: O and P's registers are ours again
      fence_operands(o), fence_operands(pa);
      mbar_arrive(&v_empty[prev]);
#pragma unroll
      for (int n = 0; n < HD / 8; ++n)
        o[4 * n] *= alpha[0], o[4 * n + 1] *= alpha[0], o[4 * n + 2] *= alpha[1], o[4 * n + 3] *= alpha[1];
    }
    // the accumulator's n8 pairs are the A fragment: keys 16 ks + 2 quad (+8), rows lane / 4 (+8)
#pragma unroll
    for (int ks = 0; ks < kKS; ++ks) {
      pa[ks][0] = pack2<T>(s[8 * ks + 0], s[8 * ks + 1]);
      pa[ks][1] = pack2<T>(s[8 * ks + 2], s[8 * ks + 3]);
      pa[ks][2] = pack2<T>(s[8 * ks + 4], s[8 * ks + 5]);
      pa[ks][3] = pack2<T>(s[8 * ks + 6], s[8 * ks + 7]);
    }
  };

  if (tiles > 0) {
    if (c == 1) named_barrier_arrive(kTurn0, kConsumerThreads);  // consumer 0 takes the first turn
    mbar_wait(q_full, 0);
    // the first tile (masked: it has no P V to overlap yet), then masked tiles up to the full run,
    // the full run, masked tiles to the end (one call site each)
    step(0, std::true_type{}, std::true_type{});
    int i = 1;
    const int full_lo = int((kr.full_lo - kr.lo) / kBN), full_hi = int((kr.full_hi - kr.lo) / kBN);
#pragma unroll 1
    for (int part = 0; part < 3; ++part) {
      if (part == 1) {
        for (; i < full_hi; ++i) step(i, std::false_type{}, std::false_type{});
      } else {
        for (const int end = part == 0 ? full_lo : tiles; i < end; ++i) step(i, std::true_type{}, std::false_type{});
      }
    }
    // the last tile's O += P V
    const int last = (tiles - 1) % kStages;
    mbar_wait(&v_full[last], ((tiles - 1) / kStages) & 1);
    wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < kKS; ++ks) wgmma_rs<T, HD, true>(o, pa[ks], v_desc(last, ks), true);
    wgmma_commit();
    wgmma_wait<0>();
    fence_operands(o);
    mbar_arrive(&v_empty[last]);
  }

  // the quad's partial sums into the row's; rows that saw nothing give 0 and lse -inf
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float l = l_run[r];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    if (t_row[r] >= sh.tq) continue;
    const float inv = l > 0.0f ? 1.0f / l : 0.0f;
    const float lse = l > 0.0f ? m_run[r] * kLn2 + __logf(l) : attn::neg_inf();
    const int64_t dv = sh.value_dim;
    T* orow = static_cast<T*>(p.out) + (b * p.out_s[0] + h * p.out_s[1] + t_row[r] * p.out_s[2]) * dv;
#pragma unroll
    for (int n = 0; n < HD / 8; ++n) {
      const int col = n * 8 + quad * 2;  // dv is a multiple of 8: both or neither of the pair exist
      if (col < dv)
        *reinterpret_cast<uint32_t*>(orow + col) =
            l > 0.0f ? pack2<T>(o[4 * n + 2 * r] * inv, o[4 * n + 2 * r + 1] * inv) : 0u;
    }
    if (quad == 0) p.lse[b * p.lse_s[0] + h * p.lse_s[1] + t_row[r] * p.lse_s[2]] = lse;
  }
}

template <typename T, int HD>
__global__ void __launch_bounds__(kThreads, 1) forward_kernel(const __grid_constant__ Params90 p) {
#if defined(FASTLM_EMU) || (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900)
  forward_tiles<T, HD>(p);
#else
  (void)p;  // the sm_80 pass: never launched there (attention_sm90_why_not)
#endif
}

// Launches of this tier (attention_sm90_launches). Kernel files are TSan-instrumented in the
// emulator build, whose runtime implements no __tsan_atomic* hook: the two accesses are not.
std::atomic<int64_t> g_launches{0};
#ifdef FASTLM_EMU
#define FASTLM_NO_TSAN __attribute__((no_sanitize("thread")))
#else
#define FASTLM_NO_TSAN
#endif
FASTLM_NO_TSAN void count_launch() { g_launches.fetch_add(1, std::memory_order_relaxed); }
FASTLM_NO_TSAN int64_t launch_count() { return g_launches.load(std::memory_order_relaxed); }

// The (d, t, head, batch) view of a (B, H, T, D) operand as a 4-D TMA map with the operand's own
// strides (TMA takes them in any order, so the (B, T, H, D) projection output seen as (B, H, T, D)
// through a transpose needs no copy), or why there is none: a contiguous last dim, a 16-byte
// aligned base and 16-byte multiple strides. Strided4 gives size-1 dims stride 0: any stride is
// right for those, so they get a legal one.
struct MapStrides {
  int64_t s[3];  // element strides of t, head, batch
  const char* why;
};
MapStrides map_strides(const Strided4& x, int64_t batch, int64_t heads, int64_t t, int64_t d) {
  const int64_t row = (d + 7) / 8 * 8;
  MapStrides m{{t > 1 ? x.s[2] : row, heads > 1 ? x.s[1] : row * t, batch > 1 ? x.s[0] : row * t * heads}, nullptr};
  bool ok = x.s[3] == 1 && reinterpret_cast<uintptr_t>(x.data) % 16 == 0;
  for (const int64_t s : m.s) ok = ok && s > 0 && s % 8 == 0;
  if (!ok) m.why = "TMA needs a contiguous last dim and a 16-byte aligned base and strides";
  return m;
}

const char* make_map(TmaDesc* desc, const Strided4& x, int64_t batch, int64_t heads, int64_t t, int64_t d) {
  const MapStrides m = map_strides(x, batch, heads, t, d);
  if (m.why) return m.why;
  const int64_t dims[4] = {d, t, heads, batch}, strides[3] = {m.s[0] * 2, m.s[1] * 2, m.s[2] * 2};
  const int box[4] = {kBlockCols, kBM, 1, 1};
  const char* why = nullptr;
  if (!make_tma_desc_4d(desc, x.data, 2, dims, strides, box, TmaSwizzle::k128B, &why))
    return why ? why : "the TMA descriptor was refused";
  return nullptr;
}

template <typename T, int HD>
int launch(const attn::Params& ap, cudaStream_t stream) {
  const AttentionShape& sh = ap.sh;
  Params90 p{};
  const char* why = make_map(&p.q, ap.q, sh.batch, sh.heads, sh.tq, sh.head_dim);
  if (!why) why = make_map(&p.k, ap.k, sh.batch, sh.kv_heads, sh.tk, sh.head_dim);
  if (!why) why = make_map(&p.v, ap.v, sh.batch, sh.kv_heads, sh.tk, sh.value_dim);
  if (why) return int(cudaErrorInvalidValue);  // attention_sm90_why_not checked the same rules
  p.sh = sh, p.out = ap.out, p.lse = ap.lse, p.scale2 = sh.scale * attn::kLog2e;
  for (int i = 0; i < 3; ++i) p.out_s[i] = ap.out_s[i], p.lse_s[i] = ap.lse_s[i];
  auto* kernel = forward_kernel<T, HD>;
  const size_t bytes = Smem<HD>::bytes;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes));
  if (err != cudaSuccess) return int(err);
  const int64_t ctas = sh.batch * sh.heads * ((sh.tq + kBM - 1) / kBM);
  if (ctas == 0) return 0;
  count_launch();
  launch_kernel(kernel, dim3(unsigned(ctas)), kThreads, bytes, stream, p);
  return int(cudaGetLastError());
}

// Whether this binary can run the kernel (sm90::binary_is_sm90a, asked once per device).
const char* built_why_not() {
  return sm90::binary_is_sm90a(forward_kernel<__half, 128>) ? nullptr
                                                            : "the extension was built without sm_90a code (FASTLM_CUDA_ARCHS)";
}

}  // namespace fastlm::cuda::attn90

namespace fastlm {

const char* attention_sm90_why_not(const AttentionShape& sh, int major, int minor, const Strided4& q,
                                   const Strided4& k, const Strided4& v, const Strided4& mask) {
  using namespace cuda::attn90;
  if (major != 9 || minor != 0) return "the Hopper tier needs an sm_90 GPU (compute capability 9.0)";
  if (sh.dtype != DType::kFloat16 && sh.dtype != DType::kBFloat16) return "the Hopper tier takes fp16/bf16 only";
  if (sh.mask_kind != MaskKind::kNone || mask.data != nullptr) return "a user mask (the sm_80 kernel's)";
  if (sh.softcap > 0.0f) return "softcap (the sm_80 kernel's)";
  if (sh.window_left >= 0 || sh.window_right >= 0) return "a sliding window (the sm_80 kernel's)";
  if (sh.alibi_slopes != nullptr) return "ALiBi (the sm_80 kernel's)";
  if (sh.sinks != nullptr) return "sinks (the sm_80 kernel's)";
  if (is_varlen(sh)) return "varlen (the sm_80 kernel's)";
  if (sh.dropout_p > 0.0f) return "dropout (not on the cuda kernels)";
  if (sh.value_dim != sh.head_dim) return "value_dim != head_dim (the sm_80 kernel's)";
  if (sh.head_dim < 64 || sh.head_dim > 128 || sh.head_dim % 8 != 0)
    return "the Hopper tier takes head dims 64..128 in steps of 8";
  if (sh.tq <= cuda::attn::kPackMaxTq) return "decode-like calls (Tq <= 16) keep the sm_80 kernel's head packing and split-KV";
  if (sh.batch <= 0 || sh.heads <= 0 || sh.kv_heads <= 0 || sh.heads % sh.kv_heads != 0 || sh.tk <= 0)
    return "an empty or malformed shape";
  if (sh.tq >= (int64_t(1) << 31) || sh.tk >= (int64_t(1) << 31) || sh.batch * sh.heads >= (int64_t(1) << 31))
    return "sizes past TMA's 32-bit coordinates";
  if (const char* why = map_strides(q, sh.batch, sh.heads, sh.tq, sh.head_dim).why) return why;
  if (const char* why = map_strides(k, sh.batch, sh.kv_heads, sh.tk, sh.head_dim).why) return why;
  if (const char* why = map_strides(v, sh.batch, sh.kv_heads, sh.tk, sh.value_dim).why) return why;
  return built_why_not();
}

int64_t attention_sm90_launches() { return cuda::attn90::launch_count(); }

namespace cuda::attn {
int forward_sm90(const Params& p, cudaStream_t stream) {
  using namespace attn90;
  const bool f16 = p.sh.dtype == DType::kFloat16;
  if (p.sh.head_dim <= 64) return f16 ? launch<__half, 64>(p, stream) : launch<__nv_bfloat16, 64>(p, stream);
  return f16 ? launch<__half, 128>(p, stream) : launch<__nv_bfloat16, 128>(p, stream);
}
}  // namespace cuda::attn

}  // namespace fastlm
