// The Hopper (sm_90a) tier of the GEMM core: the same operands, layouts and fused epilogue as
// gemm_core.cuh (out = epilogue(A @ B^T), K-major or MN-major A and B, so linear's forward, dX and
// dW all run on it), fed by TMA and computed by wgmma. linear.cu's launchers pick it through
// use_sm90_tier (sm_90 device, a kernel built for sm_90a, M > 64, K > 0; the rest stays on the
// sm_80 tier, which also serves small M by split-K).
//
// Why it is fast (H100 / H200, 132 SMs, 228 KB shared memory per SM):
//  - Persistent, warp-specialised CTAs: grid = min(#SMs, #tiles) CTAs of 384 threads stride over
//    the 128 x 128 output tiles in the sm_80 tier's grouped raster order (tile_coords). Warpgroup 0
//    is the producer: one thread issues the TMA loads; warpgroups 1 and 2 are the consumers, each
//    computing 64 rows x 128 columns of the tile with wgmma m64n128k16 (SS: both operands read
//    from shared memory, fp32 accumulators in 64 registers per thread). setmaxnreg moves registers
//    from the producer (40 per thread) to the consumers (232): 128 x 40 + 256 x 232 = 64512 of
//    the SM's 65536.
//  - 128 x 128 x 64 tiles, 4-stage ring: a stage is A 128 x 64 + B 128 x 64 halves = 32 KB,
//    4 stages 128 KB, plus a 64 KB fp32 epilogue stage (each consumer's 64 x 128 floats), plus
//    1 KB for the 1024-byte alignment 128B swizzle needs: 193 KB, one CTA per SM. Three stages
//    (96 KB) are in flight while one feeds the tensor cores; Little's law wants ~3.35 TB/s x ~1 us
//    / 132 = ~25 KB per SM from DRAM. Why not 128 x 256 (85 flop per byte loaded against 64, so
//    25 % less L2 traffic): its 48 KB stages fit 4 times only without an fp32 epilogue stage, and
//    staging through the ring would stall the producer over every epilogue. At the H100's ~990
//    TF/s, 128 x 128 tiles pull ~15 TB/s from L2 at full rate, more than L2 gives: a 2-CTA
//    cluster multicasting B (TMA .multicast) is the next step to cuBLAS rates (not done).
//  - TMA with 128B swizzle writes each operand in wgmma's canonical layout, and zero-fills rows
//    and K columns past the operand, so ragged M, N and K need no masks in the main loop. K-major
//    operands: one 64 (K) x 128 (rows) box per stage, 128 bytes per row, SBO = 1024 (8 rows), a
//    k16 step adds 32 bytes to the descriptor's start. MN-major operands: two 64 (M or N) x 64 (K)
//    boxes per stage (the 128-byte swizzle span holds 64 halves), LBO = 8 KB between them,
//    SBO = 1024 (8 K rows), a k16 step adds 2 KB. One mbarrier per stage counts the 32 KB of
//    transactions (full); a second counts the 256 consumer threads' releases (empty).
//  - Per 64-deep K tile a consumer warpgroup issues 4 wgmma m64n128k16 (4 x 262144 flops) and
//    waits for the previous tile's group (wgmma.wait_group 1), so the tensor cores always hold a
//    queued group; the per-tile overhead is an mbarrier wait, descriptor arithmetic and one
//    release arrive: the sm_90a SASS main loop is 61 instructions per K tile, 15.25 per HGMMA,
//    each warp issuing them for a quarter of 1 MFLOP: ~4300 flops per warp instruction, against
//    ~1750 in the sm_80 tier (294-308 instructions for 128 mma.sync m16n8k16). The count is
//    asserted by tests/test_sass_report.py. ptxas: 168 registers at launch (the 384-thread
//    bound), no spills.
//  - Epilogue: the consumer writes its accumulators to its fp32 stage (the sm_80 tier's XOR
//    layout), syncs its own warpgroup on a named barrier and runs gemm_core.cuh's staged_epilogue
//    (bias, run-time activation, residual, saved pre-activation, 16-byte loads and stores),
//    while the producer already loads the next tile's first stages.
// Requirements: those of gemm_core.cuh (16-byte aligned bases, row strides multiples of 8
// elements, N and the contiguous dimensions multiples of 8), which are also TMA's; a tensor map
// the driver refuses sends the GEMM back to the sm_80 tier.
// Executed in CI by the SIMT emulator on its "9.0" profile (tests/test_gemm_sm90.py: every epilogue,
// dX, dW, ragged and strided operands, several tiles per CTA); what only a GPU shows: timing, and
// setmaxnreg (a checked no-op under emulation).
#pragma once
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>

#include "gemm_core.cuh"
#include "ptx_sm90.cuh"

namespace fastlm::cuda::gemm {

namespace hopper {
constexpr int kStages = 4, kConsumers = 2, kThreads = 128 * (1 + kConsumers);
constexpr int kWgRows = kBM / kConsumers;                   // 64: one wgmma m64 row block per consumer
constexpr int kOperandBytes = kBM * kBK * 2;                // 16 KB: one operand's 128 x 64 halves
constexpr int kStageBytes = 2 * kOperandBytes;              // A, then B
constexpr int kEpilogueBytes = kBM * kBN * 4;               // the consumers' fp32 stages, 32 KB each
constexpr int kBarrierBytes = 2 * kStages * 8;              // full[], then empty[]
constexpr int kSmemAlign = 1024;                            // 128B swizzle repeats every 1024 bytes
constexpr int kSmemBytes = kStages * kStageBytes + kEpilogueBytes + kBarrierBytes + kSmemAlign;
constexpr int kBox = 64;                                    // a box's inner extent: 64 halves = 128 B
constexpr int kMnBoxBytes = kBox * kBK * 2;                 // an MN-major box: 64 (M or N) x 64 K, 8 KB
constexpr int kProducerRegs = 40, kConsumerRegs = 232;
static_assert(kSmemBytes <= 227 * 1024, "one CTA per SM fits sm_90's opt-in shared memory");
static_assert(128 * kProducerRegs + 128 * kConsumers * kConsumerRegs <= 65536, "the SM's register file");

// The wgmma descriptor of one operand's tile at `stage0`, and how far its start moves per k16 step:
// K-major tiles are rows of 64 K halves (128 B, SBO = 1024 per 8 rows; LBO unused under 128B
// swizzle), MN-major tiles are 64-wide boxes of K rows (SBO = 1024 per 8 K rows, LBO = 8 KB to the
// next 64 M or N).
__host__ __device__ constexpr uint32_t k16_step_bytes(bool k_major) { return k_major ? 16 * 2 : 16 * kBox * 2; }

__device__ __forceinline__ uint64_t operand_desc(const void* stage0, bool k_major) {
  return sm90::smem_desc(stage0, sm90::TmaSwizzle::k128B, k_major ? 16 : kMnBoxBytes, 1024);
}

// One operand's tile (tile rows r0.., K columns k0..) into a stage: one box (K-major) or two.
template <bool KMajor>
__device__ __forceinline__ void load_operand(unsigned char* dst, const sm90::TmaDesc* desc, int64_t r0, int64_t k0,
                                             uint64_t* full) {
  if constexpr (KMajor) {
    sm90::tma_load_2d(dst, desc, int(k0), int(r0), full);
  } else {
    sm90::tma_load_2d(dst, desc, int(r0), int(k0), full);
    sm90::tma_load_2d(dst + kMnBoxBytes, desc, int(r0 + kBox), int(k0), full);
  }
}

// The tensor map of an operand of `rows` (M or N) x k, K-major (row r at base + r * ld) or
// MN-major (K row k at base + k * ld), read in boxes as load_operand does.
inline bool operand_tma_desc(sm90::TmaDesc* desc, const void* base, int64_t ld, int64_t rows, int64_t k, bool k_major,
                             const char** why) {
  return k_major ? sm90::make_tma_desc_2d(desc, base, 2, k, rows, ld * 2, kBK, kBM, sm90::TmaSwizzle::k128B, why)
                 : sm90::make_tma_desc_2d(desc, base, 2, rows, k, ld * 2, kBox, kBK, sm90::TmaSwizzle::k128B, why);
}
}  // namespace hopper

// The decision between the tiers, one host function (linear.cu's launchers ask it; tests reach
// it through the emulator's "9.0" profile): an sm_90 device whose kernel binary really is sm_90a
// SASS (a build without 9.0a, or one JIT-compiled from compute_80 PTX, runs the sm_80 tier), and
// a GEMM with K > 0 (the K == 0 epilogue-only case) and M > 64 (decode shapes: split-K on the
// sm_80 tier streams the weight at full bandwidth; one 128-row wgmma tile would be mostly idle).
inline bool use_sm90_tier(int major, int minor, bool binary_is_sm90a, int64_t m, int64_t n, int64_t k) {
  return major == 9 && minor == 0 && binary_is_sm90a && m > 64 && n > 0 && k > 0;
}

template <typename T, bool AKMajor, bool BKMajor>
__global__ void __launch_bounds__(hopper::kThreads, 1)
    hopper_gemm_kernel(const GemmArgs p, const __grid_constant__ sm90::TmaDesc tma_a,
                       const __grid_constant__ sm90::TmaDesc tma_b) {
  constexpr int kStages = hopper::kStages, kStageBytes = hopper::kStageBytes, kSmemAlign = hopper::kSmemAlign;
  constexpr int kOperandBytes = hopper::kOperandBytes, kEpilogueBytes = hopper::kEpilogueBytes;
  constexpr int kConsumers = hopper::kConsumers, kWgRows = hopper::kWgRows;
  FASTLM_DYNAMIC_SHARED(unsigned char, smem_raw);
  unsigned char* smem = sm90::smem_align<kSmemAlign>(smem_raw);
  float* epilogue_stage = reinterpret_cast<float*>(smem + kStages * kStageBytes);
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + kStages * kStageBytes + kEpilogueBytes);
  uint64_t* empty = full + kStages;
  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) {
      sm90::mbar_init(&full[s], 1);                       // the producer's arrive.expect_tx (+ 32 KB of tx)
      sm90::mbar_init(&empty[s], 128 * kConsumers);       // every consumer thread releases the stage
    }
    sm90::fence_barrier_init();
  }
  __syncthreads();

  const int64_t tiles = ((p.m + kBM - 1) / kBM) * ((p.n + kBN - 1) / kBN);
  const int k_tiles = int((p.k + kBK - 1) / kBK);
  const int wg = threadIdx.x / 128;
  if (wg == 0) {  // the producer: one thread keeps the ring full, across tiles
    sm90::setmaxnreg_dec<hopper::kProducerRegs>();
    if (threadIdx.x != 0) return;
    sm90::tma_prefetch_desc(&tma_a);
    sm90::tma_prefetch_desc(&tma_b);
    int s = 0, round = 0;  // the ring position of the next K tile: stage s, its round-th use
    for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
      int64_t m0, n0;
      tile_coords(p.m, p.n, tile, &m0, &n0);
      for (int kt = 0; kt < k_tiles; ++kt) {
        if (round > 0) sm90::mbar_wait(&empty[s], (round - 1) & 1);  // the consumers are done with it
        sm90::mbar_arrive_expect_tx(&full[s], kStageBytes);
        unsigned char* stage = smem + s * kStageBytes;
        hopper::load_operand<AKMajor>(stage, &tma_a, m0, int64_t(kt) * kBK, &full[s]);
        hopper::load_operand<BKMajor>(stage + kOperandBytes, &tma_b, n0, int64_t(kt) * kBK, &full[s]);
        if (++s == kStages) s = 0, ++round;
      }
    }
    return;
  }

  // A consumer: rows 64 (wg - 1).. of each tile.
  sm90::setmaxnreg_inc<hopper::kConsumerRegs>();
  const int t = threadIdx.x % 128, row_block = wg - 1;
  // Descriptors: the high words (SBO, swizzle) are fixed; the low words (start, LBO) step by
  // stage and k16 step, without carries (shared addresses are below 2^18).
  const uint64_t desc_a0 = hopper::operand_desc(smem + row_block * kWgRows * kBK * 2, AKMajor);  // == box row_block (MN-major)
  const uint64_t desc_b0 = hopper::operand_desc(smem + kOperandBytes, BKMajor);
  const uint64_t a_hi = desc_a0 & ~uint64_t(0xffffffff), b_hi = desc_b0 & ~uint64_t(0xffffffff);
  constexpr uint32_t kStageStep = kStageBytes >> 4;  // descriptor units (16 bytes)
  constexpr uint32_t a_step = hopper::k16_step_bytes(AKMajor) >> 4, b_step = hopper::k16_step_bytes(BKMajor) >> 4;
  float* stage_out = epilogue_stage + row_block * kWgRows * kBN;
  const int warp = t / 32, lane = t % 32;
  int s = 0, round = 0;  // as the producer's
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    int64_t m0, n0;
    tile_coords(p.m, p.n, tile, &m0, &n0);
    float acc[kBN / 2];
#pragma unroll
    for (int i = 0; i < kBN / 2; ++i) acc[i] = 0.0f;  // defined asm operands; the first wgmma ignores them
    int prev = 0;
    for (int kt = 0; kt < k_tiles; ++kt) {
      sm90::mbar_wait(&full[s], round & 1);
      const uint32_t a_lo = uint32_t(desc_a0) + s * kStageStep, b_lo = uint32_t(desc_b0) + s * kStageStep;
      sm90::wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < kBK / 16; ++kk)
        sm90::wgmma_ss<T, kBN, !AKMajor, !BKMajor>(acc, a_hi | (a_lo + kk * a_step), b_hi | (b_lo + kk * b_step),
                                                   kt > 0 || kk > 0);
      sm90::wgmma_commit();
      if (kt > 0) {  // the previous K tile's wgmmas are done: its stage goes back to the producer
        sm90::wgmma_wait<1>();
        sm90::mbar_arrive(&empty[prev]);
      }
      prev = s;
      if (++s == kStages) s = 0, ++round;
    }
    sm90::wgmma_wait<0>();
    sm90::mbar_arrive(&empty[prev]);

    // Stage the accumulators (the sm_80 tier's XOR layout): accumulator i is row 16 warp + lane / 4
    // + 8 ((i / 2) % 2), column 8 (i / 4) + 2 (lane % 4) + i % 2 of this consumer's 64 x 128.
    sm90::named_barrier_sync(1 + row_block, 128);  // this warpgroup is done reading the last tile's stage
#pragma unroll
    for (int i = 0; i < kBN / 2; i += 2) {
      const int row = 16 * warp + lane / 4 + 8 * ((i / 2) % 2), chunk = 2 * (i / 4) + (lane % 4) / 2;
      float* dst = stage_out + row * kBN + ((chunk ^ (row & 7)) * 4) + (lane % 2) * 2;
      *reinterpret_cast<float2*>(dst) = make_float2(acc[i], acc[i + 1]);
    }
    sm90::named_barrier_sync(1 + row_block, 128);
    staged_epilogue<T, kWgRows>(p, stage_out, t, m0 + row_block * kWgRows, n0, nullptr);
  }
}

// The device facts use_sm90_tier needs, asked once per device (the emulator: every call, its
// profile can change): compute capability and SM count; and whether the binary of `kernel` the
// runtime picks there is sm_90a SASS (not the sm_80 cubin, nor compute_80 PTX JIT-compiled), which
// sm90::binary_is_sm90a caches per device and kernel itself.
struct DeviceFacts {
  int major, minor, sms;
  bool binary_is_sm90a;
};
template <typename Kernel>
inline DeviceFacts device_facts(Kernel kernel) {
  DeviceFacts d{0, 0, 0, false};
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return d;
#ifndef FASTLM_EMU
  constexpr int kMaxDevices = 64;
  static std::atomic<uint32_t> cached[kMaxDevices];  // sms << 16 | major << 12 | minor << 8 | 1
  const uint32_t c = dev < kMaxDevices ? cached[dev].load(std::memory_order_relaxed) : 0;
  if (c) {
    d.major = int(c >> 12) & 15, d.minor = int(c >> 8) & 15, d.sms = int(c >> 16);
  } else
#endif
  {
    cudaDeviceGetAttribute(&d.major, cudaDevAttrComputeCapabilityMajor, dev);
    cudaDeviceGetAttribute(&d.minor, cudaDevAttrComputeCapabilityMinor, dev);
    cudaDeviceGetAttribute(&d.sms, cudaDevAttrMultiProcessorCount, dev);
#ifndef FASTLM_EMU
    if (dev < kMaxDevices)
      cached[dev].store(uint32_t(d.sms) << 16 | uint32_t(d.major & 15) << 12 | uint32_t(d.minor & 15) << 8 | 1u,
                        std::memory_order_relaxed);
#endif
  }
  d.binary_is_sm90a = d.major == 9 && sm90::binary_is_sm90a(kernel);
  return d;
}

// Runs the GEMM on the Hopper tier when use_sm90_tier says so and TMA takes the operands:
// returns true and the launch status in *err; false (nothing launched) for the sm_80 tier.
template <typename T, bool AKMajor, bool BKMajor>
bool launch_gemm_sm90(const GemmArgs& p, cudaStream_t stream, int* err) {
  const auto kernel = hopper_gemm_kernel<T, AKMajor, BKMajor>;
  const DeviceFacts d = device_facts(kernel);
  if (!use_sm90_tier(d.major, d.minor, d.binary_is_sm90a, p.m, p.n, p.k)) return false;
  sm90::TmaDesc tma_a, tma_b;
  const char* why = nullptr;
  if (!hopper::operand_tma_desc(&tma_a, p.a, p.lda, p.m, p.k, AKMajor, &why) ||
      !hopper::operand_tma_desc(&tma_b, p.b, p.ldb, p.n, p.k, BKMajor, &why))
    return false;  // TMA refuses these operands: the sm_80 tier takes them
  *err = int(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, hopper::kSmemBytes));
  if (*err) return true;
  const int64_t tiles = ((p.m + kBM - 1) / kBM) * ((p.n + kBN - 1) / kBN);
  int64_t ctas = tiles < d.sms ? tiles : d.sms;
#ifdef FASTLM_EMU
  // The emulated 132 SMs outnumber a test's tiles: tests cap the grid to run several tiles per CTA.
  if (const char* cap = std::getenv("FASTLM_EMU_GEMM_CTAS")) ctas = std::min<int64_t>(ctas, std::max(1, std::atoi(cap)));
#endif
  launch_kernel(kernel, dim3(unsigned(ctas)), hopper::kThreads, hopper::kSmemBytes, stream, p, tma_a, tma_b);
  *err = int(cudaGetLastError());
  return true;
}

// The GEMM on the Hopper tier where use_sm90_tier and TMA take it, else on the sm_80 tier (which
// also runs split-K: splits > 1 only comes with M <= 64).
template <typename T, bool AKMajor, bool BKMajor>
int launch_gemm_tiered(const GemmArgs& p, cudaStream_t stream, int splits = 1, float* partial = nullptr) {
  int err = 0;
  if (splits <= 1 && launch_gemm_sm90<T, AKMajor, BKMajor>(p, stream, &err)) return err;
  return launch_gemm<T, AKMajor, BKMajor>(p, stream, splits, partial);
}

}  // namespace fastlm::cuda::gemm
