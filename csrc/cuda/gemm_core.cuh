// The tensor-core GEMM core every CUDA GEMM caller shares (linear forward, its dX and dW):
//   out (M, N) = epilogue(A (M, K) @ B (N, K)^T), fp16/bf16 operands, fp32 accumulators.
// Each operand is either K-contiguous ("K-major": row r at ptr + r * ld, its K values adjacent)
// or M/N-contiguous ("MN-major": K row k at ptr + k * ld, its M or N values adjacent). The layout of
// each operand is a template flag, so linear's backward runs on the same kernel without copies:
//   forward  y  = x  @ w^T : A = x (M, K) K-major,        B = w (N, K) K-major
//   dX       dx = gz @ w   : A = gz (M, N) K-major,       B = w^T, w (N, K) read MN-major
//   dW       dw = gz^T @ x : A = gz^T, gz read MN-major,  B = x^T, x (M, K) read MN-major
//
// Why it is fast (sm_80 numbers; sm_90a runs the same code, ~1.4x the shared memory, for M <= 64 and
// wherever the Hopper tier in gemm_sm90.cuh can't run):
//  - CTA tile 128 x 128 x 64, 4 warps in a 2 x 2 grid of 64 x 64 warp tiles. Per k16 step a
//    warp loads 4 A and 4 B ldmatrix.x4 (8 LDSM) and issues 4 x 8 = 32 mma.sync.m16n8k16. Per
//    64-deep K tile a thread issues 128 HMMA, 32 LDSM, 16 cp.async (8 per operand, 16 bytes
//    each), 16 predicates and 16 64-bit pointer steps, one barrier: the SASS main loop is
//    294-308 instructions, 2.30-2.41 per HMMA on sm_80 and sm_90a (the old 2-stage 128 x 128 x 32
//    kernel with 64 x 32 warp tiles: 4.75 / 4.88), with 216-230 registers and no spills.
//  - 3-stage cp.async pipeline (16-byte, L2-only .cg; src-size 0 zero-fills the chunks past M,
//    N or K): two K tiles (64 KB) are in flight while a third feeds the tensor cores; one
//    __syncthreads per K tile. Shared memory 3 x (16 + 16) KB = 96 KB per CTA: one CTA (4
//    warps) per SM on sm_80 (164 KB), two on sm_90 (228 KB). 64 KB in flight per SM is ~4x an
//    A100 SM's share of L2 bandwidth times latency (5 TB/s / 108 SMs x ~300 ns = ~14 KB), and a
//    tile does 2 x 128 x 128 x 64 flops per 32 KB loaded: 64 flop/B from L2, with the grouped
//    raster below keeping DRAM traffic a fraction of that.
//  - XOR swizzle, no padding: a K-major tile row is 64 halves = eight 16-byte chunks, stored at
//    chunk ^ (row % 8); an MN-major K row is 128 halves = sixteen chunks, stored at chunk ^ (k % 8).
//    The eight 16-byte rows one ldmatrix phase reads (and cp.async writes) fall in eight
//    distinct bank groups: conflict-free without the 12.5% padding the old kernel paid.
//  - ldmatrix (K-major) / ldmatrix.trans (MN-major) build the mma fragments directly.
//  - Grouped raster order: CTAs run in column strips of kGroupM M-tiles, so the B tiles a wave
//    of CTAs reads stay in L2 while their A rows are reused kGroupM times.
//  - Epilogue staged through shared memory: the fp32 accumulators are written to the (now idle)
//    pipeline buffers in the same XOR layout (128 x 128 x 4 B = 64 KB), then each thread owns
//    8 adjacent columns of 16 rows: bias as one 16-byte load, residual as 16-byte loads, y and
//    the pre-activation as 16-byte stores. The activation is chosen at run time by one switch
//    per element (a uniform branch), not a template per activation: 2 dtypes x 3 layouts = 6
//    kernels in all.
//  - Small M (decode, M <= 64): split-K. blockIdx.y takes a K slice and stores its fp32 tile to a
//    workspace; splitk_epilogue_kernel sums the slices and runs the same epilogue (see
//    splitk_slices for the bandwidth arithmetic).
//  - Grouped GEMMs (grouped_linear, moe_grouped_linear.cu): the tile body (gemm_tile) is shared;
//    grouped_rows_kernel maps a CTA to (expert, m-tile) from device offsets, grouped_reduce_kernel
//    to (expert, tile) with the K loop over the expert's rows (dW). A gated tile loads 64 gate and
//    the 64 matching up rows of B (TileLoader's Halves; for an MN-major B, GPT-OSS's (E, in, out)
//    weight read in place, 64 gate and 64 up columns, a run-time flag) and forms act(gate) * up in
//    the epilogue.
// Requirements (the bindings check them): the contiguous dimension of each operand and N are
// multiples of 8, row strides are multiples of 8 elements and base pointers 16-byte aligned
// (cp.async and the epilogue's 16-byte accesses). Any M, N, K otherwise (ragged edges zero-fill).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "activations.cuh"
#include "fastlm/common.h"
#include "launch.cuh"
#include "ptx.cuh"

namespace fastlm::cuda::gemm {

constexpr int kBM = 128, kBN = 128, kBK = 64, kStages = 3, kThreads = 128;
constexpr int kWarpM = 64, kWarpN = 64, kMT = kWarpM / 16, kNT = kWarpN / 8;  // 4 x 8 mma tiles per warp
constexpr int kGroupM = 8;
constexpr int kTileHalves = kBM * kBK;  // one operand's stage: 8192 halves = 16 KB (kBM == kBN)
constexpr int kSmemBytes = kStages * 2 * kTileHalves * 2;  // 96 KB
static_assert(kBM == kBN, "one tile size for both operands");
static_assert(kBM * kBN * 4 <= kSmemBytes, "the fp32 epilogue stage fits in the pipeline buffers");

// y = act(acc + bias) + residual, preact = acc + bias rounded to the dtype; each optional.
struct Epilogue {
  bool has_act;
  Activation act;
  const void* bias;                             // (n,) or null
  const void* residual; int64_t residual_ld;    // (m, n) or null
  void* y; int64_t y_ld;                        // (m, n)
  void* preact; int64_t preact_ld;              // (m, n) or null
};

struct GemmArgs {
  int64_t m, n, k;
  const void* a; int64_t lda;  // K-major: stride between M rows; MN-major: between K rows
  const void* b; int64_t ldb;
  Epilogue ep;
  // Split-K (small M): CTA row blockIdx.y reduces K range [y k_split, (y + 1) k_split) and, when
  // partial is non-null, stores its fp32 tile at partial + y m n instead of the epilogue; the
  // split-K epilogue kernel then sums the splits and applies the epilogue. k_split: a multiple
  // of kBK, k when there is one split.
  int64_t k_split;
  float* partial;
};

// 16 bytes moved as one access (LDG.128 / STG.128 / LDS.128): 8 halves or 4 floats.
struct alignas(16) Bytes16 {
  uint32_t word[4];
};
struct alignas(16) Float4 {
  float v[4];
};

__device__ __forceinline__ float act_runtime(Activation a, float z) {
  switch (a) {
    case Activation::kGelu: return act_forward<Activation::kGelu>(z);
    case Activation::kGeluTanh: return act_forward<Activation::kGeluTanh>(z);
    case Activation::kRelu: return act_forward<Activation::kRelu>(z);
    default: return act_forward<Activation::kSilu>(z);
  }
}

// One operand's K tiles, in order, into their swizzled stages: 1024 16-byte chunks per tile, 8
// per thread. Per chunk the main loop pays one predicate, one 64-bit pointer step and the
// cp.async; `rows` bounds the M or N index, [k_begin, k_end) is the K range (a split-K slice).
// Halves (B of a gated GEMM): tile rows 0-63 are operand rows r0.. (the gate half) and tile rows
// 64-127 rows rows + r0.. (the up half, `rows` rows further). K-major, a thread's chunks 0-3 are
// gate rows and 4-7 up rows: one extra pointer step per tile, before chunk 4, so it is the
// template flag Halves. MN-major, a thread's 8 columns are fixed (chunk t % 16: gate for 0-7, up
// for 8-15): the jump folds into its start pointer, nothing per tile, so it is the run-time
// `mn_halves` (one kernel serves plain and gated).
template <typename T, bool KMajor, bool Halves = false>
struct TileLoader {
  static_assert(KMajor || !Halves, "an MN-major B takes its halves at run time (mn_halves)");
  const T* src;      // this thread's chunk 0 of the next tile
  int64_t step;      // between this thread's chunks: 16 rows (K-major) or 8 K rows (MN-major)
  int64_t k_step;    // between tiles
  int64_t k_left;    // k_end minus this thread's first K index in the next tile
  uint32_t rows_ok;  // bit i: chunk i's row (K-major) / the thread's 8 columns (MN-major) in range
  int smem_off;      // this thread's chunk 0 in a stage (halves)
  int64_t half_jump; // Halves: from gate row r0 + 64 + row to up row rows + r0 + row
#ifdef FASTLM_EMU
  const T* valid;    // the emulator wants a real global address even for a 0-byte copy
#endif
  static constexpr int kChunkStride = KMajor ? 16 * kBK : 8 * kBM;  // halves between chunk i and i + 1

  __device__ __forceinline__ TileLoader(const T* p, int64_t ld, int64_t rows, int64_t k_begin, int64_t k_end,
                                        int64_t r0, bool mn_halves = false) {
    const int t = threadIdx.x;
#ifdef FASTLM_EMU
    valid = p;
#endif
    if constexpr (KMajor) {  // chunk i: row t / 8 + 16 i, column chunk t % 8
      const int row = t / 8, c = t % 8;
      src = p + (r0 + row) * ld + k_begin + c * 8;
      step = 16 * ld;
      k_step = kBK;
      k_left = k_end - k_begin - c * 8;
      smem_off = row * kBK + ((c ^ (row & 7)) * 8);  // row + 16 i keeps row % 8
      rows_ok = 0;
      half_jump = Halves ? (rows - kBN / 2) * ld : 0;
#pragma unroll
      for (int i = 0; i < 8; ++i) rows_ok |= uint32_t(r0 + row + 16 * (Halves ? i % 4 : i) < rows) << i;
    } else {  // chunk i: K row t / 16 + 8 i, column chunk t % 16
      const int kr = t / 16, c = t % 16;
      // gated: columns c < 8 are gate columns r0 + 8 c, the rest up columns rows + r0 + 8 (c - 8)
      const int64_t col = mn_halves ? r0 + (c % 8) * 8 : r0 + c * 8;
      src = p + (k_begin + kr) * ld + col + (mn_halves && c >= 8 ? rows : 0);
      step = 8 * ld;
      k_step = kBK * ld;
      k_left = k_end - k_begin - kr;
      smem_off = kr * kBM + ((c ^ kr) * 8);  // kr + 8 i keeps the K row % 8 == kr
      rows_ok = col < rows ? 0xffu : 0u;  // rows % 8 == 0: the chunk is all in or all out
      half_jump = 0;
    }
  }

  // The next tile into `stage`; chunks past the edges are zero-filled (src-size 0, nothing read:
  // their addresses may lie past the operand, as Triton's masked cp.async loads do).
  __device__ __forceinline__ void load_next(T* stage) {
    // K-major: K % 8 == 0, so the thread's K chunk is all in or all out, for all 8 rows at once;
    // MN-major: K row kr + 8 i is in while 8 i < k_left (one compare per chunk, no mask).
    const uint32_t rows_in = KMajor && k_left <= 0 ? 0u : rows_ok;
    const int k_rows_left = k_left < kBK ? int(k_left) : kBK;
    const T* p = src;
#pragma unroll
    for (int i = 0; i < 8; ++i, p += step) {
      if (Halves && i == kBN / 32) p += half_jump;
      const bool in = KMajor ? (rows_in >> i) & 1 : rows_in != 0 && k_rows_left > 8 * i;
#ifdef FASTLM_EMU
      cp_async16(stage + smem_off + i * kChunkStride, in ? p : valid, in ? 16 : 0);
#else
      cp_async16(stage + smem_off + i * kChunkStride, p, in ? 16 : 0);
#endif
    }
    src += k_step;
    k_left -= kBK;
  }
};

// Fragment offsets in a stage (halves). A K-major fragment's offset changes with the k16 step
// kk by an XOR and with the 16-row block by a constant, so one base per kk; an MN-major one the
// other way round (one base per 16-row block, kk a constant). a_frag_offset(lane, row0, kk):
// the 16 x 16 A block at rows row0.., K 16 kk..; b_frag_offset(lane, col0, kk): two n8 x k16
// B blocks (columns col0..col0 + 15) in the order mma wants them from one ldmatrix.x4.
template <bool KMajor>
__device__ __forceinline__ int a_frag_offset(int lane, int row0, int kk) {
  if constexpr (KMajor) {  // lanes 0-15: rows at k, lanes 16-31: rows at k + 8
    const int row = row0 + lane % 16, chunk = 2 * kk + lane / 16;
    return row * kBK + ((chunk ^ (row & 7)) * 8);
  } else {  // .trans: matrix q = lane / 8 is (m + 8 (q % 2), k + 8 (q / 2)); its K rows are lane % 8
    const int q = lane / 8, r = lane % 8;
    const int krow = 16 * kk + r + (q / 2) * 8, chunk = row0 / 8 + q % 2;
    return krow * kBM + ((chunk ^ r) * 8);
  }
}
template <bool KMajor>
__device__ __forceinline__ int b_frag_offset(int lane, int col0, int kk) {
  if constexpr (KMajor) {  // matrices (n, k), (n, k + 8), (n + 8, k), (n + 8, k + 8)
    const int row = col0 + lane % 8 + (lane / 16) * 8, chunk = 2 * kk + (lane / 8) % 2;
    return row * kBK + ((chunk ^ (row & 7)) * 8);
  } else {
    const int q = lane / 8, r = lane % 8;
    const int krow = 16 * kk + r + (q % 2) * 8, chunk = col0 / 8 + q / 2;
    return krow * kBM + ((chunk ^ r) * 8);
  }
}
// The offset of fragment block x (16 rows) at k16 step kk from the bases above.
template <bool KMajor>
__device__ __forceinline__ int frag_offset(const int (&base)[4], int x, int kk) {
  return KMajor ? base[kk] + x * 16 * kBK : base[x] + kk * 16 * kBM;
}

template <bool KMajor>
__device__ __forceinline__ void ldmatrix_frag(uint32_t (&r)[4], const void* p) {
  if constexpr (KMajor) ldmatrix_x4(r, p);
  else ldmatrix_x4_trans(r, p);
}

// bias[n .. n + 8) as floats (zeros without a bias): one 16-byte load.
template <typename T>
__device__ __forceinline__ void load_bias8(const Epilogue& ep, int64_t n, float (&bias)[8]) {
#pragma unroll
  for (int e = 0; e < 8; ++e) bias[e] = 0.0f;
  if (ep.bias) {
    const Bytes16 raw = *reinterpret_cast<const Bytes16*>(static_cast<const T*>(ep.bias) + n);
    const T* b = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int e = 0; e < 8; ++e) bias[e] = to_float(b[e]);
  }
}

// The epilogue on 8 adjacent accumulators of row m, columns n..n + 7: 16-byte residual load,
// 16-byte stores of the pre-activation and y.
template <typename T>
__device__ __forceinline__ void epilogue8(const Epilogue& ep, int64_t m, int64_t n, const float (&v)[8],
                                          const float (&bias)[8]) {
  Bytes16 pre_raw, out_raw, res_raw;
  T* pre = reinterpret_cast<T*>(&pre_raw);
  T* out = reinterpret_cast<T*>(&out_raw);
  const T* res = reinterpret_cast<const T*>(&res_raw);
  if (ep.residual)
    res_raw = *reinterpret_cast<const Bytes16*>(static_cast<const T*>(ep.residual) + m * ep.residual_ld + n);
#pragma unroll
  for (int e = 0; e < 8; ++e) {
    pre[e] = from_float<T>(v[e] + bias[e]);  // z + bias rounded once: what the backward differentiates act at
    // With an activation, act(pre) as eager computes it; without, z + bias unrounded.
    float o = ep.has_act ? act_runtime(ep.act, to_float(pre[e])) : v[e] + bias[e];
    if (ep.residual) o += to_float(res[e]);
    out[e] = from_float<T>(o);
  }
  if (ep.preact) *reinterpret_cast<Bytes16*>(static_cast<T*>(ep.preact) + m * ep.preact_ld + n) = pre_raw;
  *reinterpret_cast<Bytes16*>(static_cast<T*>(ep.y) + m * ep.y_ld + n) = out_raw;
}

// Output tile `pid`'s origin (m0, n0) in grouped raster order: kGroupM M-tiles per strip.
__device__ __forceinline__ void tile_coords(int64_t m, int64_t n, int64_t pid, int64_t* m0, int64_t* n0) {
  const int64_t tiles_m = (m + kBM - 1) / kBM, tiles_n = (n + kBN - 1) / kBN;
  const int64_t width = int64_t(kGroupM) * tiles_n, group = pid / width;
  const int64_t first_m = group * kGroupM, group_m = tiles_m - first_m < kGroupM ? tiles_m - first_m : kGroupM;
  *m0 = (first_m + (pid % width) % group_m) * kBM;
  *n0 = ((pid % width) / group_m) * kBN;
}

// The gated epilogue (a Halves tile; act = the gate's activation) on 8 adjacent outputs of row m,
// columns n..n + 7: gate = acc + bias[n..], up = acc + bias[width + n..], each rounded as pre
// (gate, up) stores it (what the backward reads); y = act(gate) * up.
template <typename T>
__device__ __forceinline__ void gated_epilogue8(const Epilogue& ep, int64_t m, int64_t n, int64_t width,
                                                const float (&gate)[8], const float (&up)[8]) {
  float bias_gate[8], bias_up[8];
  load_bias8<T>(ep, n, bias_gate);
  load_bias8<T>(ep, width + n, bias_up);
  Bytes16 gate_raw, up_raw, out_raw;
  T* g = reinterpret_cast<T*>(&gate_raw);
  T* u = reinterpret_cast<T*>(&up_raw);
  T* out = reinterpret_cast<T*>(&out_raw);
#pragma unroll
  for (int e = 0; e < 8; ++e) {
    g[e] = from_float<T>(gate[e] + bias_gate[e]);
    u[e] = from_float<T>(up[e] + bias_up[e]);
    out[e] = from_float<T>(act_runtime(ep.act, to_float(g[e])) * to_float(u[e]));
  }
  if (ep.preact) {
    T* pre = static_cast<T*>(ep.preact) + m * ep.preact_ld + n;
    *reinterpret_cast<Bytes16*>(pre) = gate_raw;
    *reinterpret_cast<Bytes16*>(pre + width) = up_raw;
  }
  *reinterpret_cast<Bytes16*>(static_cast<T*>(ep.y) + m * ep.y_ld + n) = out_raw;
}

// The epilogue of a (kRows x kBN) fp32 tile staged in shared memory (row r, 4-float chunk c at
// r * kBN + (c ^ (r % 8)) * 4), by 128 threads: thread t owns columns 8 (t % 16) .. + 7 of rows
// t / 16 + 8 i, 16-byte global accesses. With `partial` (a split-K slice) it stores the fp32
// sums there for splitk_epilogue_kernel instead. Shared by the sm_80 tile and the Hopper tier.
template <typename T, int kRows>
__device__ __forceinline__ void staged_epilogue(const GemmArgs& p, const float* stage, int t, int64_t m0, int64_t n0,
                                                float* partial) {
  const int cc = t % 16, r0 = t / 16;
  const int64_t n = n0 + 8 * cc;
  if (n >= p.n) return;  // n % 8 == 0: the 8 columns are all in or all out
  float bias[8];
  load_bias8<T>(p.ep, n, bias);
#pragma unroll 4
  for (int i = 0; i < kRows / 8; ++i) {
    const int row = r0 + 8 * i;
    const int64_t m = m0 + row;
    if (m >= p.m) break;
    const Float4 lo = *reinterpret_cast<const Float4*>(stage + row * kBN + (((2 * cc) ^ (row & 7)) * 4));
    const Float4 hi = *reinterpret_cast<const Float4*>(stage + row * kBN + (((2 * cc + 1) ^ (row & 7)) * 4));
    if (partial) {  // a split-K slice: the fp32 sums, for splitk_epilogue_kernel
      reinterpret_cast<Float4*>(partial + m * p.n + n)[0] = lo;
      reinterpret_cast<Float4*>(partial + m * p.n + n)[1] = hi;
      continue;
    }
    const float v[8] = {lo.v[0], lo.v[1], lo.v[2], lo.v[3], hi.v[0], hi.v[1], hi.v[2], hi.v[3]};
    epilogue8<T>(p.ep, m, n, v, bias);
  }
}

// One CTA's output tile: rows m0.. of A (p.m rows), columns n0.. of B (p.n rows; gated, Halves
// for a K-major B or mn_halves for an MN-major one: the gate rows n0.. and the up rows p.n + n0..,
// 64 each), K range [k_begin, k_end); then the epilogue, or the fp32 tile into `partial` (a
// split-K slice). smem: kSmemBytes.
template <typename T, bool AKMajor, bool BKMajor, bool Halves>
__device__ __forceinline__ void gemm_tile(const GemmArgs& p, T* smem, int64_t m0, int64_t n0, int64_t k_begin,
                                          int64_t k_end, float* partial, bool mn_halves = false) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int wm = (warp / 2) * kWarpM, wn = (warp % 2) * kWarpN;

  TileLoader<T, AKMajor> load_a(static_cast<const T*>(p.a), p.lda, p.m, k_begin, k_end, m0);
  TileLoader<T, BKMajor, Halves> load_b(static_cast<const T*>(p.b), p.ldb, p.n, k_begin, k_end, n0, mn_halves);
  const auto stage_a = [&](int s) { return smem + s * 2 * kTileHalves; };
  const auto stage_b = [&](int s) { return smem + s * 2 * kTileHalves + kTileHalves; };
  int a_base[4], b_base[4];
#pragma unroll
  for (int x = 0; x < 4; ++x) {
    a_base[x] = AKMajor ? a_frag_offset<true>(lane, wm, x) : a_frag_offset<false>(lane, wm + 16 * x, 0);
    b_base[x] = BKMajor ? b_frag_offset<true>(lane, wn, x) : b_frag_offset<false>(lane, wn + 16 * x, 0);
  }

  float acc[kMT][kNT][4];
#pragma unroll
  for (int i = 0; i < kMT; ++i)
#pragma unroll
    for (int j = 0; j < kNT; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[i][j][r] = 0.0f;

  const int64_t tiles = (k_end - k_begin + kBK - 1) / kBK;
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {  // prologue: tiles 0 and 1 in flight
    if (s < tiles) {
      load_a.load_next(stage_a(s));
      load_b.load_next(stage_b(s));
    }
    cp_async_commit();
  }
  int read = 0, write = kStages - 1;
  for (int64_t t = 0; t < tiles; ++t) {
    cp_async_wait<kStages - 2>();  // tile t has landed (this thread's copies) ...
    __syncthreads();               // ... everyone's, and everyone is done with tile t - 1's stage
    if (t + kStages - 1 < tiles) {  // refill the stage tile t - 1 used
      load_a.load_next(stage_a(write));
      load_b.load_next(stage_b(write));
    }
    cp_async_commit();
    const T* sa = stage_a(read);
    const T* sb = stage_b(read);
#pragma unroll
    for (int kk = 0; kk < kBK / 16; ++kk) {
      uint32_t af[kMT][4], bf[kNT][2];
#pragma unroll
      for (int i = 0; i < kMT; ++i) ldmatrix_frag<AKMajor>(af[i], sa + frag_offset<AKMajor>(a_base, i, kk));
#pragma unroll
      for (int j = 0; j < kNT; j += 2) {
        uint32_t r[4];
        ldmatrix_frag<BKMajor>(r, sb + frag_offset<BKMajor>(b_base, j / 2, kk));
        bf[j][0] = r[0];
        bf[j][1] = r[1];
        bf[j + 1][0] = r[2];
        bf[j + 1][1] = r[3];
      }
#pragma unroll
      for (int i = 0; i < kMT; ++i)
#pragma unroll
        for (int j = 0; j < kNT; ++j) mma_m16n8k16<T>(acc[i][j], af[i], bf[j][0], bf[j][1]);
    }
    read = read == kStages - 1 ? 0 : read + 1;
    write = write == kStages - 1 ? 0 : write + 1;
  }
  cp_async_wait<0>();  // the trailing (empty) groups
  __syncthreads();     // every warp is done reading the pipeline buffers

  // Stage the accumulators as fp32: row r, 4-float chunk c at r * kBN + (c ^ (r % 8)) * 4.
  // Accumulator (i, j, 2 h + e) is row wm + 16 i + lane / 4 + 8 h, column wn + 8 j + 2 (lane % 4) + e.
  float* stage = reinterpret_cast<float*>(smem);
#pragma unroll
  for (int i = 0; i < kMT; ++i)
#pragma unroll
    for (int j = 0; j < kNT; ++j)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int row = wm + 16 * i + lane / 4 + 8 * h, chunk = (wn + 8 * j) / 4 + (lane % 4) / 2;
        float* dst = stage + row * kBN + ((chunk ^ (row & 7)) * 4) + (lane % 2) * 2;
        *reinterpret_cast<float2*>(dst) = make_float2(acc[i][j][2 * h], acc[i][j][2 * h + 1]);
      }
  __syncthreads();

  if (Halves || mn_halves) {  // gated: each thread 8 outputs (gate columns 8 cc.., up 64 + 8 cc..) of rows r0 + 16 i
    const int cc = threadIdx.x % 8, r0 = threadIdx.x / 8;
    const int64_t n = n0 + 8 * cc;
    if (n >= p.n) return;
#pragma unroll 2
    for (int i = 0; i < kBM / 16; ++i) {
      const int row = r0 + 16 * i;
      const int64_t m = m0 + row;
      if (m >= p.m) break;
      float gate[8], up[8];
#pragma unroll
      for (int h = 0; h < 4; ++h) {  // 4-float chunks: gate 2 cc, 2 cc + 1; up 16 + 2 cc, 16 + 2 cc + 1
        const int chunk = (h / 2) * (kBN / 8) + 2 * cc + h % 2;
        const Float4 q = *reinterpret_cast<const Float4*>(stage + row * kBN + ((chunk ^ (row & 7)) * 4));
#pragma unroll
        for (int e = 0; e < 4; ++e) (h < 2 ? gate : up)[4 * (h % 2) + e] = q.v[e];
      }
      gated_epilogue8<T>(p.ep, m, n, p.n, gate, up);
    }
    return;
  }
  staged_epilogue<T, kBM>(p, stage, threadIdx.x, m0, n0, partial);
}

template <typename T, bool AKMajor, bool BKMajor>
__global__ void __launch_bounds__(kThreads) gemm_kernel(const GemmArgs p) {
  FASTLM_DYNAMIC_SHARED(unsigned char, smem_bytes);  // kStages x (A tile, B tile), then the fp32 epilogue stage
  int64_t m0, n0;
  tile_coords(p.m, p.n, blockIdx.x, &m0, &n0);
  const int64_t k_begin = int64_t(blockIdx.y) * p.k_split;
  const int64_t k_end = p.k - k_begin < p.k_split ? p.k : k_begin + p.k_split;
  float* partial = p.partial ? p.partial + int64_t(blockIdx.y) * p.m * p.n : nullptr;
  gemm_tile<T, AKMajor, BKMajor, false>(p, reinterpret_cast<T*>(smem_bytes), m0, n0, k_begin, k_end, partial);
}

// ---------------------------------------------------------------- grouped GEMMs (grouped_linear)
// One launch over E experts of unequal sizes: the grid depends on the shapes only, and each CTA
// finds its expert from the offsets on the device (no host sync on the routing).
struct GroupedArgs {
  const int32_t* offsets;  // (experts + 1,): expert e owns rows [offsets[e], offsets[e + 1]); clamped to [0, rows]
  int64_t experts, rows;   // rows: x's N
  int64_t tiles_n;         // output column tiles per CTA row
  int64_t b_expert_stride, bias_expert_stride, y_expert_stride;  // elements between experts' B, bias, y
  bool gated;              // row-grouped: B rows [0, n) gate, [n, 2 n) up; 64 outputs per CTA column
};

__device__ __forceinline__ int64_t clamped_offset(const GroupedArgs& g, int64_t e, int64_t lo) {
  const int64_t o = g.offsets[e];
  return o < lo ? lo : o > g.rows ? g.rows : o;
}

// Row-grouped (forward, dX): CTA (slot, n-tile), slot = the slot-th m-tile of the experts' rows in
// order; sum over e of cdiv(rows_e, 128) <= cdiv(N, 128) + E, so cdiv(N, 128) + E slots hold them
// all, the dropped tail's tiles after them (they run no K loop and no bias: 0 out, as act(0) = 0
// for every activation). A is K-major rows of the expert, B = weight[e] either way round,
// bias = bias[e]. Gated (g.gated): Halves for a K-major B, the run-time mn_halves for an MN-major
// one (launch_grouped_rows picks), so an MN-major B has one kernel for plain and gated.
template <typename T, bool AKMajor, bool BKMajor, bool Halves>
__global__ void __launch_bounds__(kThreads) grouped_rows_kernel(GemmArgs p, const GroupedArgs g) {
  static_assert(AKMajor, "row-grouped A is K-major: the expert's rows");
  FASTLM_DYNAMIC_SHARED(unsigned char, smem_bytes);
  const int64_t slot = blockIdx.x / g.tiles_n, n0 = (blockIdx.x % g.tiles_n) * (g.gated ? kBN / 2 : kBN);
  // The expert whose m-tiles hold `slot`: a uniform scan of E offsets (L1-resident after the
  // first CTA of the SM; E = 8 for Mixtral).
  int64_t e = 0, lo = clamped_offset(g, 0, 0), first = 0;  // m-tiles before expert e, its first row
  for (; e < g.experts; ++e) {
    const int64_t hi = clamped_offset(g, e + 1, lo), tiles = (hi - lo + kBM - 1) / kBM;
    if (slot < first + tiles) break;
    first += tiles;
    lo = hi;
  }
  const bool tail = e == g.experts;
  const int64_t hi = tail ? g.rows : clamped_offset(g, e + 1, lo), m0 = (slot - first) * kBM;
  if (m0 >= hi - lo) return;  // a slot no expert needed
  p.m = hi - lo;
  p.a = static_cast<const T*>(p.a) + lo * p.lda;
  p.b = static_cast<const T*>(p.b) + (tail ? 0 : e) * g.b_expert_stride;
  p.ep.bias = p.ep.bias && !tail ? static_cast<const T*>(p.ep.bias) + e * g.bias_expert_stride : nullptr;
  p.ep.y = static_cast<T*>(p.ep.y) + lo * p.ep.y_ld;
  if (p.ep.preact) p.ep.preact = static_cast<T*>(p.ep.preact) + lo * p.ep.preact_ld;
  gemm_tile<T, AKMajor, BKMajor, Halves>(p, reinterpret_cast<T*>(smem_bytes), m0, n0, 0, tail ? 0 : p.k, nullptr,
                                         !BKMajor && g.gated);
}

// Reduction over each expert's rows (dW[e] = grad_p_e^T @ x_e): CTA (expert, m-tile, n-tile), the
// K loop runs over the expert's rows (both operands MN-major, read in place from row offsets[e]);
// an empty expert runs no K tile and writes 0.
template <typename T>
__global__ void __launch_bounds__(kThreads) grouped_reduce_kernel(GemmArgs p, const GroupedArgs g) {
  FASTLM_DYNAMIC_SHARED(unsigned char, smem_bytes);
  const int64_t per_expert = (p.m + kBM - 1) / kBM * g.tiles_n, e = blockIdx.x / per_expert;
  const int64_t t = blockIdx.x % per_expert, m0 = (t / g.tiles_n) * kBM, n0 = (t % g.tiles_n) * kBN;
  const int64_t lo = clamped_offset(g, e, 0), hi = clamped_offset(g, e + 1, lo);
  p.a = static_cast<const T*>(p.a) + lo * p.lda;
  p.b = static_cast<const T*>(p.b) + lo * p.ldb;
  p.ep.y = static_cast<T*>(p.ep.y) + e * g.y_expert_stride;
  gemm_tile<T, false, false, false>(p, reinterpret_cast<T*>(smem_bytes), m0, n0, 0, hi - lo, nullptr);
}

// B K-major (weight (E, n, k) rows): grouped_rows_kernel<.., Halves = g.gated>; MN-major (the
// weight's k rows hold its n outputs adjacent): one kernel, gated or not at run time.
template <typename T, bool BKMajor>
int launch_grouped_rows(const GemmArgs& p, GroupedArgs g, cudaStream_t stream) {
  const auto kernel = !BKMajor || !g.gated ? grouped_rows_kernel<T, true, BKMajor, false>
                                           : grouped_rows_kernel<T, true, BKMajor, BKMajor>;
  const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes);
  if (err != cudaSuccess) return int(err);
  const int64_t width = g.gated ? kBN / 2 : kBN;
  g.tiles_n = (p.n + width - 1) / width;
  const int64_t ctas = ((g.rows + kBM - 1) / kBM + g.experts) * g.tiles_n;
  if (ctas > 0) launch_kernel(kernel, dim3(unsigned(ctas)), kThreads, kSmemBytes, stream, p, g);
  return int(cudaGetLastError());
}

template <typename T>
int launch_grouped_reduce(const GemmArgs& p, GroupedArgs g, cudaStream_t stream) {
  const auto kernel = grouped_reduce_kernel<T>;
  const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes);
  if (err != cudaSuccess) return int(err);
  g.tiles_n = (p.n + kBN - 1) / kBN;
  const int64_t ctas = g.experts * ((p.m + kBM - 1) / kBM) * g.tiles_n;
  if (ctas > 0) launch_kernel(kernel, dim3(unsigned(ctas)), kThreads, kSmemBytes, stream, p, g);
  return int(cudaGetLastError());
}

// Split-K's second pass: one thread per 8 columns of a row sums the splits' fp32 partials and
// applies the epilogue (16-byte loads of the partials, 16-byte stores).
template <typename T>
__global__ void __launch_bounds__(256) splitk_epilogue_kernel(const GemmArgs p, int splits) {
  const int64_t chunk = int64_t(blockIdx.x) * blockDim.x + threadIdx.x, chunks_per_row = p.n / 8;
  if (chunk >= p.m * chunks_per_row) return;
  const int64_t m = chunk / chunks_per_row, n = (chunk % chunks_per_row) * 8;
  float v[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int s = 0; s < splits; ++s) {
    const Float4* src = reinterpret_cast<const Float4*>(p.partial + (s * p.m + m) * p.n + n);
#pragma unroll
    for (int e = 0; e < 8; ++e) v[e] += src[e / 4].v[e % 4];
  }
  float bias[8];
  load_bias8<T>(p.ep, n, bias);
  epilogue8<T>(p.ep, m, n, v, bias);
}

// Split-K for small M (decode): how many K slices keep ~2 CTAs per SM busy when the output
// has few tiles, each slice at least 4 K tiles deep. M = 1, N = K = 4096 on one 128-row tile:
// 32 CTAs stream 32 MB of weight, ~1 MB each, which one CTA per SM cannot pull at the SM's
// share of 3 TB/s (~23 GB/s per SM at 132 SMs: ~45 us); 8 slices make 256 CTAs (all SMs busy,
// 128 KB of fp32 partials) for ~11 us at 3 TB/s (32 MB / 3 TB/s), the bandwidth floor.
inline int splitk_slices(int64_t m, int64_t n, int64_t k) {
  if (m > 64 || k <= 0) return 1;
  const int64_t tiles_n = (n + kBN - 1) / kBN, target = 264 / tiles_n, deep = (k + 4 * kBK - 1) / (4 * kBK);
  const int64_t s = target < deep ? target : deep;
  return s < 1 ? 1 : int(s > 64 ? 64 : s);
}
// The slice depth for `splits` slices (a multiple of kBK), and the slice count that leaves none empty.
inline int64_t splitk_depth(int64_t k, int splits) {
  return ((k + splits - 1) / splits + kBK - 1) / kBK * kBK;
}

// A pointer and row stride the 16-byte chunks of the loaders and the epilogue can use.
inline bool aligned(const void* p, int64_t stride) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0 && stride % 8 == 0;
}

// Launches the kernel for the operand layouts; the binding has checked the requirements above.
// partial (splits x m x n floats) is needed when splits > 1.
template <typename T, bool AKMajor, bool BKMajor>
int launch_gemm(GemmArgs p, cudaStream_t stream, int splits = 1, float* partial = nullptr) {
  const auto kernel = gemm_kernel<T, AKMajor, BKMajor>;
  const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes);
  if (err != cudaSuccess) return int(err);
  p.k_split = splits > 1 ? splitk_depth(p.k, splits) : p.k;
  if (splits > 1) splits = int((p.k + p.k_split - 1) / p.k_split);
  p.partial = splits > 1 ? partial : nullptr;
  const int64_t ctas = ((p.m + kBM - 1) / kBM) * ((p.n + kBN - 1) / kBN);
  launch_kernel(kernel, dim3(unsigned(ctas), unsigned(splits)), kThreads, kSmemBytes, stream, p);
  if (splits > 1) {
    const int64_t chunks = p.m * (p.n / 8);
    launch_kernel(splitk_epilogue_kernel<T>, dim3(unsigned((chunks + 255) / 256)), 256, 0, stream, p, splits);
  }
  return int(cudaGetLastError());
}

}  // namespace fastlm::cuda::gemm
