// The Hopper (sm_90a) primitives as small device helpers, with a second implementation in the
// emulator (csrc/emu/include/fastlm_emu/ptx_sm90.h): no kernel file writes this asm itself.
//   mbarrier    mbar_init / fence_barrier_init / mbar_arrive / mbar_arrive_expect_tx / mbar_wait:
//               a 64-bit barrier in shared memory whose phase completes when the expected
//               arrivals AND the expected transaction bytes (TMA) have all come in
//   TMA         make_tma_desc_2d/3d/4d (host: a CUtensorMap via the driver's cuTensorMapEncodeTiled),
//               tma_load_2d/3d/4d (one thread issues a box copy global -> shared that completes
//               `box bytes` of tx on an mbarrier), tma_prefetch_desc, fence_proxy_async_shared
//   named barriers  bar.sync / bar.arrive with an id (1..15) and a thread count (producer /
//               consumer warpgroups sync without stopping the whole block)
//   setmaxnreg  move registers from producer to consumer warpgroups
//   clusters    cluster_ctarank / cluster_nctarank / cluster_ctaid / cluster_nctaid (the CTA's place
//               in its thread-block cluster: launch_cluster_kernel in launch.cuh), cluster_arrive
//               (.release) / cluster_arrive_relaxed / cluster_wait (.acquire) / cluster_sync
//               (barrier.cluster: every thread of every CTA of the cluster)
//   DSMEM       smem_u32 (a shared::cta address), mapa_shared (that address in CTA `rank`'s
//               window of the cluster), ld_shared_cluster<T> / st_shared_cluster<T> (T = float,
//               float2, float4: 32/64/128-bit ld/st.shared::cluster). A CTA's shared memory must
//               outlive every remote access to it: a cluster_sync before exit.
//   wgmma       smem_desc, wgmma_fence / wgmma_commit / wgmma_wait<N>, wgmma_ss / wgmma_rs,
//               wgmma_fence_operand (keeps the compiler from moving accumulator accesses):
//               D (64 x N fp32 in the warpgroup's registers) (+)= A (64 x 16) * B (16 x N)
// Why this is the fast path on sm_90: one TMA instruction moves a whole tile (no address math,
// no registers) and signals an mbarrier, so one producer warp feeds the tensor cores; one wgmma
// m64n256k16 is 64*256*16*2 = 524288 flops from one instruction issued by 4 warps (mma.sync
// m16n8k16: 4096 per warp instruction), reading B straight from shared memory.
//
// Compiled for sm_90a the helpers are the real instructions; for any other target (the sm_80
// pass of the same .cu) their bodies are __trap(): the kernel that calls them must only be
// launched on sm_90 (its launcher checks the compute capability).
//
// ---- Layouts (the PTX ISA, "Asynchronous Warpgroup Level Matrix Multiply-Accumulate";
//      cross-checked with CUTLASS cute/arch/mma_sm90_desc.hpp and cute/atom/mma_traits_sm90_gmma.hpp)
// Warpgroup: 128 threads, warps 4g..4g+3; w = warp % 4, lane = thread % 32, 16-bit inputs.
// D fragment (m64nNk16, fp32; N/2 floats per thread, i = 0..N/2-1):
//     row = 16*w + lane/4 + 8*((i/2) % 2),  col = 8*(i/4) + 2*(lane%4) + i%2
// A register fragment (wgmma_rs; 4 x .b32 = 8 halves, half j of the 4 registers in order):
//     row = 16*w + lane/4 + 8*((j/2) % 2),  col (k) = 2*(lane%4) + j%2 + 8*(j/4)
//   (each warp's 16 rows are exactly mma.m16n8k16's A fragment.)
// Shared-memory operands (descriptor: start address, LBO, SBO, swizzle; all in bytes, >> 4):
//   a "core matrix" is 8 rows x 16 bytes. T = 8 elements (16 bytes of 16-bit data).
//   K-major (imm-trans 0; A: 64 x 16 as (m, k); B: 16 x N as (n, k)), mn = m or n:
//     no swizzle : byte(mn, k) = (mn%8)*16 + (mn/8)*SBO + (k%8)*2 + (k/8)*LBO
//     32/64/128B : byte(mn, k) = (mn%8)*S + (mn/8)*SBO + k*2   (S = swizzle span 32/64/128,
//                  k*2 < S; LBO unused). For 64 bf16 per row and 128B swizzle (a TMA box of
//                  inner 64): SBO = 1024 (8 rows of 128 B); step K by 16 = start + 32 bytes.
//   MN-major (imm-trans 1):
//     no swizzle : byte(mn, k) = (mn%8)*2 + (mn/8)*SBO + (k%8)*16 + (k/8)*LBO
//     32/64/128B : byte(mn, k) = (mn % (S/2))*2 + (mn / (S/2))*LBO + (k%8)*S + (k/8)*SBO
//                  For 128B: 64 elements of mn per 128-byte row, one row per k; SBO = 1024
//                  (8 k-rows), LBO = the distance between 64-wide mn blocks (e.g. one TMA box
//                  of 64 x K rows: K*128); step K by 16 = start + 2*SBO.
//   Swizzle (applied by TMA when writing and by wgmma when reading, on absolute shared
//   addresses): 128B: bits [4:6] ^= bits [7:9]; 64B: bits [4:5] ^= bits [7:8]; 32B: bit 4 ^= bit 7.
//   So a swizzled tile must start at a multiple of the pattern's repeat (1024 / 512 / 256 bytes;
//   TMA itself needs 128-byte aligned destinations, 1024 for 128B), and adding 32 bytes to the
//   start of a 128B-swizzled K-major operand (K step inside the atom) reads the right chunks.
//   Descriptor base offset (bits 49-51) is always 0 here.
// What the emulator's self-tests cover (tests/test_emulator.py): K-major A and B and MN-major B
// with 128B swizzle, K stepped inside the atom, N = 24, 64, 128, 256, A from registers; TMA 2-D
// boxes with 128B swizzle and 3-D boxes without, zero fill. It decodes the other layouts (no
// swizzle, 32B, 64B, MN-major A) by the same formulas, which no test stages independently. All
// of this is the ISA as read here (and CUTLASS's canonical layouts); none of it has yet been
// compared with a GPU's results. It fails loudly on: a descriptor base offset
// other than 0, a swizzled TMA box whose inner extent is not the swizzle span, complete_tx
// before expect_tx (the ISA allows a transiently negative tx-count; the kernels here never
// need it). Only 16-bit inputs (f16, bf16) with fp32 accumulators exist in this API.
#pragma once
#include <cstdint>
#include <cstring>
#include <type_traits>

#ifndef FASTLM_EMU
#include <cuda.h>  // CUtensorMap and its enums only: cuTensorMapEncodeTiled is found at run time
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#endif

#ifdef __CUDACC__
#define FASTLM_SM90_HD __host__ __device__
#else
#define FASTLM_SM90_HD
#endif

namespace fastlm::cuda::sm90 {

// A CUtensorMap on the GPU (128 bytes, 64-byte aligned); the emulator's own encoding there.
struct alignas(64) TmaDesc {
  unsigned char bytes[128];
};
enum class TmaSwizzle { kNone, k32B, k64B, k128B };

// The span of one swizzled row in bytes (0: none).
FASTLM_SM90_HD constexpr int swizzle_span(TmaSwizzle sw) {
  return sw == TmaSwizzle::k128B ? 128 : sw == TmaSwizzle::k64B ? 64 : sw == TmaSwizzle::k32B ? 32 : 0;
}

// The shared address bits a swizzle pattern XORs: bits [4, 4+b) ^= bits [7, 7+b).
FASTLM_SM90_HD constexpr uint32_t swizzle_address(uint32_t addr, TmaSwizzle sw) {
  const uint32_t bits = sw == TmaSwizzle::k128B ? 3 : sw == TmaSwizzle::k64B ? 2 : sw == TmaSwizzle::k32B ? 1 : 0;
  return addr ^ (((addr >> 7) & ((1u << bits) - 1)) << 4);
}

// Rounds a shared-memory pointer up to kAlign bytes (1024 for 128B-swizzled tiles): the dynamic
// buffer is only 128-byte aligned once a kernel also declares static shared memory (barriers).
template <int kAlign>
FASTLM_SM90_HD inline unsigned char* smem_align(void* p) {
  static_assert(kAlign > 0 && (kAlign & (kAlign - 1)) == 0, "smem_align: a power of two");
  return reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(p) + kAlign - 1) & ~uintptr_t(kAlign - 1));
}

// The wgmma shared-memory matrix descriptor for a tile at shared address `addr`.
FASTLM_SM90_HD constexpr uint64_t smem_desc_bits(uint32_t addr, TmaSwizzle sw, uint32_t lbo_bytes, uint32_t sbo_bytes) {
  const uint64_t layout = sw == TmaSwizzle::k128B ? 1 : sw == TmaSwizzle::k64B ? 2 : sw == TmaSwizzle::k32B ? 3 : 0;
  return uint64_t((addr >> 4) & 0x3fff) | uint64_t((lbo_bytes >> 4) & 0x3fff) << 16 |
         uint64_t((sbo_bytes >> 4) & 0x3fff) << 32 | layout << 62;
}

// TMA's rules for a tiled tensor map (cuTensorMapEncodeTiled's documentation); the emulator
// checks the same. dims/box in elements, innermost first; strides in bytes for dims 1..rank-1.
// Returns nullptr when the arguments are legal, else what is wrong.
inline const char* tma_desc_problem(int rank, const void* base, int elem_bytes, const int64_t* dims,
                                    const int64_t* strides, const int* box, TmaSwizzle sw) {
  if (rank < 1 || rank > 4) return "rank must be 1..4 here";
  if (elem_bytes != 1 && elem_bytes != 2 && elem_bytes != 4 && elem_bytes != 8) return "elem_bytes must be 1, 2, 4 or 8";
  if (reinterpret_cast<uintptr_t>(base) % 16) return "the base address must be 16-byte aligned";
  for (int i = 0; i < rank; ++i) {
    if (dims[i] < 1 || dims[i] > (int64_t(1) << 32)) return "every dimension must be in [1, 2^32]";
    if (box[i] < 1 || box[i] > 256) return "every box dimension must be in [1, 256]";
  }
  for (int i = 1; i < rank; ++i)
    if (strides[i - 1] % 16 || strides[i - 1] <= 0 || strides[i - 1] >= (int64_t(1) << 40))
      return "every stride must be a positive multiple of 16 bytes below 2^40";
  if (box[0] * elem_bytes % 16) return "the inner box (box_inner * elem_bytes) must be a multiple of 16 bytes";
  if (swizzle_span(sw) && box[0] * elem_bytes > swizzle_span(sw))
    return "the inner box (box_inner * elem_bytes) must not exceed the swizzle span (32, 64 or 128 bytes)";
  return nullptr;
}

namespace detail {
// Encodes a tiled tensor map: on the GPU side through the driver's cuTensorMapEncodeTiled, in
// the emulator as its own fields (fastlm_emu/ptx_sm90.h). False with *why set when refused.
inline bool make_tma_desc(TmaDesc* out, int rank, const void* base, int elem_bytes, const int64_t* dims,
                          const int64_t* strides, const int* box, TmaSwizzle sw, const char** why);
}  // namespace detail

// A 2-D tensor map: `inner` contiguous elements per row, `outer` rows `outer_stride_bytes` apart;
// boxes of box_inner x box_outer land in shared memory row after row (swizzled if sw).
// Out-of-bounds elements of a box are filled with zeros.
inline bool make_tma_desc_2d(TmaDesc* out, const void* base, int elem_bytes, int64_t inner, int64_t outer,
                             int64_t outer_stride_bytes, int box_inner, int box_outer, TmaSwizzle sw,
                             const char** why) {
  const int64_t dims[2] = {inner, outer};
  const int box[2] = {box_inner, box_outer};
  return detail::make_tma_desc(out, 2, base, elem_bytes, dims, &outer_stride_bytes, box, sw, why);
}
// The same in 3-D: dims and box innermost first, strides (bytes) of dims 1 and 2.
inline bool make_tma_desc_3d(TmaDesc* out, const void* base, int elem_bytes, const int64_t (&dims)[3],
                             const int64_t (&strides_bytes)[2], const int (&box)[3], TmaSwizzle sw, const char** why) {
  return detail::make_tma_desc(out, 3, base, elem_bytes, dims, strides_bytes, box, sw, why);
}
// And in 4-D: strides need not be ordered (a (B, T, H, D) tensor viewed as (d, t, h, b) is fine).
inline bool make_tma_desc_4d(TmaDesc* out, const void* base, int elem_bytes, const int64_t (&dims)[4],
                             const int64_t (&strides_bytes)[3], const int (&box)[4], TmaSwizzle sw, const char** why) {
  return detail::make_tma_desc(out, 4, base, elem_bytes, dims, strides_bytes, box, sw, why);
}


#ifndef FASTLM_EMU
// ---- the launchers' per-device answer cache: answers to a device query about a kernel (yes/no,
// or a small count), keyed by (kernel host pointer, an int: 0 for binary_is_sm90a, the cluster
// size for cluster_launch.cuh's cluster_fits, a (shared memory, size) code for its
// clusters_held). One row of slots per device; a slot is claimed once by compare-exchange on its
// `claimed` flag (the first free slot, so the free slots are a row's suffix), its key written,
// then its answer published with a release store (>= 1: kNo, kYes, or a count + 1; 0: not yet
// published). A later refusal overwrites the answer with kNo ("remember a refusal"); the key
// never changes. Namespace scope and zero-initialized (no function-local static and its guard),
// no lock; two threads asking at once may both ask and claim two slots with the same answer,
// and a full row or a device past the table only costs the uncached query. Not in the emulator
// build: there binary_is_sm90a is always true, its tests change the emulated device between
// calls, and TSan's instrumentation has no hooks for atomics.
namespace detail {
constexpr int kAnswerDevices = 64, kAnswerSlots = 64;
struct Answer {
  std::atomic<uint8_t> claimed;
  std::atomic<int32_t> answer;
  const void* kernel;  // written before `answer` is published, read only after it is seen
  int param;
};
inline Answer answers[kAnswerDevices][kAnswerSlots];

inline Answer* answer_row() {
  int dev = -1;
  return cudaGetDevice(&dev) == cudaSuccess && dev >= 0 && dev < kAnswerDevices ? answers[dev] : nullptr;
}
}  // namespace detail

constexpr int32_t kNo = 1, kYes = 2;  // a yes/no answer as stored; a count n is stored as n + 1

// The cached answer for (kernel, param) on the current device: 0 not known, else as remembered.
inline int32_t known_answer(const void* kernel, int param) {
  detail::Answer* row = detail::answer_row();
  for (int i = 0; row && i < detail::kAnswerSlots; ++i) {
    const int32_t a = row[i].answer.load(std::memory_order_acquire);
    if (a == 0) {
      if (!row[i].claimed.load(std::memory_order_acquire)) break;  // the rest of the row is free
      continue;                                                    // being written
    }
    if (row[i].kernel == kernel && row[i].param == param) return a;
  }
  return 0;
}

// Records `value` (>= 1) for (kernel, param) on the current device: in its published slot if it
// has one (a refusal after a yes), else in a newly claimed one.
inline void remember_answer(const void* kernel, int param, int32_t value) {
  detail::Answer* row = detail::answer_row();
  for (int i = 0; row && i < detail::kAnswerSlots; ++i) {
    if (row[i].answer.load(std::memory_order_acquire) != 0) {
      if (row[i].kernel == kernel && row[i].param == param) return row[i].answer.store(value, std::memory_order_release);
      continue;
    }
    uint8_t free = 0;
    if (row[i].claimed.compare_exchange_strong(free, 1, std::memory_order_acq_rel)) {
      row[i].kernel = kernel;
      row[i].param = param;
      return row[i].answer.store(value, std::memory_order_release);
    }
  }
}
#endif

// Whether the binary of `kernel` the runtime picks on the current device is sm_90a SASS (not the
// sm_80 cubin, nor compute_80 PTX JIT-compiled, where every helper below is a trap): the one
// check every sm_90a tier's launcher makes before choosing its kernel. The cudaFuncGetAttributes
// query (about a microsecond) runs once per (device, kernel) (the answer cache above, param 0).
// A yes implies a compute capability 9.0 device (sm_90a SASS loads on no other), so launchers
// need no separate query of the major version. The emulator runs the kernel's source on the
// profile it emulates, so there it is always true.
template <typename Kernel>
inline bool binary_is_sm90a(Kernel kernel) {
#ifdef FASTLM_EMU
  (void)kernel;
  return true;
#else
  const void* key = reinterpret_cast<const void*>(kernel);
  if (const int32_t known = known_answer(key, 0)) return known == kYes;
  cudaFuncAttributes a{};
  bool yes = false;
  if (cudaFuncGetAttributes(&a, kernel) == cudaSuccess) {
    yes = a.binaryVersion == 90 && a.ptxVersion >= 90;
  } else {
    (void)cudaGetLastError();  // not sticky: the caller's other tier reports its own status
  }
  remember_answer(key, 0, yes ? kYes : kNo);
  return yes;
#endif
}

}  // namespace fastlm::cuda::sm90
#undef FASTLM_SM90_HD

#ifdef FASTLM_EMU
#include "fastlm_emu/ptx_sm90.h"
#else

namespace fastlm::cuda::sm90 {

// ---------------------------------------------------------------- host: tensor maps
namespace detail {
using EncodeTiled = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                 const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                                 CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

// cuTensorMapEncodeTiled through the runtime's driver entry point (no link against libcuda).
inline EncodeTiled encode_tiled() {
  static EncodeTiled fn = [] {
    void* p = nullptr;
    cudaDriverEntryPointQueryResult q{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000, cudaEnableDefault, &q) != cudaSuccess ||
        q != cudaDriverEntryPointSuccess)
      p = nullptr;
    return reinterpret_cast<EncodeTiled>(p);
  }();
  return fn;
}

inline bool make_tma_desc(TmaDesc* out, int rank, const void* base, int elem_bytes, const int64_t* dims,
                          const int64_t* strides, const int* box, TmaSwizzle sw, const char** why) {
  static_assert(sizeof(TmaDesc) == sizeof(CUtensorMap), "TmaDesc must be a CUtensorMap");
  if (const char* bad = tma_desc_problem(rank, base, elem_bytes, dims, strides, box, sw)) {
    if (why) *why = bad;
    return false;
  }
  const EncodeTiled encode = encode_tiled();
  if (!encode) {
    if (why) *why = "the CUDA driver has no cuTensorMapEncodeTiled (driver older than CUDA 12)";
    return false;
  }
  const CUtensorMapDataType type = elem_bytes == 1   ? CU_TENSOR_MAP_DATA_TYPE_UINT8
                                   : elem_bytes == 2 ? CU_TENSOR_MAP_DATA_TYPE_UINT16
                                   : elem_bytes == 4 ? CU_TENSOR_MAP_DATA_TYPE_UINT32
                                                     : CU_TENSOR_MAP_DATA_TYPE_UINT64;
  const CUtensorMapSwizzle swizzle = sw == TmaSwizzle::k128B  ? CU_TENSOR_MAP_SWIZZLE_128B
                                     : sw == TmaSwizzle::k64B ? CU_TENSOR_MAP_SWIZZLE_64B
                                     : sw == TmaSwizzle::k32B ? CU_TENSOR_MAP_SWIZZLE_32B
                                                              : CU_TENSOR_MAP_SWIZZLE_NONE;
  cuuint64_t g_dims[4], g_strides[3];
  cuuint32_t g_box[4], g_elem_strides[4] = {1, 1, 1, 1};
  for (int i = 0; i < rank; ++i) g_dims[i] = cuuint64_t(dims[i]), g_box[i] = cuuint32_t(box[i]);
  for (int i = 0; i + 1 < rank; ++i) g_strides[i] = cuuint64_t(strides[i]);
  const CUresult r = encode(reinterpret_cast<CUtensorMap*>(out), type, cuuint32_t(rank), const_cast<void*>(base),
                            g_dims, g_strides, g_box, g_elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle,
                            CU_TENSOR_MAP_L2_PROMOTION_L2_128B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS) {
    if (why) *why = "cuTensorMapEncodeTiled refused the tensor map";
    return false;
  }
  return true;
}
}  // namespace detail

// ---------------------------------------------------------------- device
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define FASTLM_SM90(...) __VA_ARGS__
#else
#define FASTLM_SM90(...) __trap()  // not sm_90a: the kernel must never run here
#endif

__device__ __forceinline__ uint32_t smem_u32(const void* p) { return static_cast<uint32_t>(__cvta_generic_to_shared(p)); }

__device__ __forceinline__ void mbar_init(uint64_t* bar, int arrivals) {
  FASTLM_SM90(asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(arrivals) : "memory"));
}
__device__ __forceinline__ void fence_barrier_init() {
  FASTLM_SM90(asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory"));
}
__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
  FASTLM_SM90(asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_u32(bar)) : "memory"));
}
__device__ __forceinline__ void mbar_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
  FASTLM_SM90(asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_u32(bar)),
                           "r"(bytes)
                           : "memory"));
}
// try_wait suspends the thread for a hardware-chosen time before answering, so this loop does
// not hammer the barrier.
__device__ __forceinline__ void mbar_wait(uint64_t* bar, int phase_parity) {
  FASTLM_SM90({
    uint32_t done;
    do {
      asm volatile(
          "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
          : "=r"(done)
          : "r"(smem_u32(bar)), "r"(phase_parity & 1)
          : "memory");
    } while (!done);
  });
}

__device__ __forceinline__ void tma_load_2d(void* smem_dst, const TmaDesc* desc, int inner, int outer, uint64_t* bar) {
  FASTLM_SM90(asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4}], [%2];\n" ::"r"(
          smem_u32(smem_dst)),
      "l"(reinterpret_cast<uint64_t>(desc)), "r"(smem_u32(bar)), "r"(inner), "r"(outer)
      : "memory"));
}
__device__ __forceinline__ void tma_load_3d(void* smem_dst, const TmaDesc* desc, int c0, int c1, int c2, uint64_t* bar) {
  FASTLM_SM90(asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4, %5}], [%2];\n" ::
          "r"(smem_u32(smem_dst)),
      "l"(reinterpret_cast<uint64_t>(desc)), "r"(smem_u32(bar)), "r"(c0), "r"(c1), "r"(c2)
      : "memory"));
}
__device__ __forceinline__ void tma_load_4d(void* smem_dst, const TmaDesc* desc, int c0, int c1, int c2, int c3,
                                            uint64_t* bar) {
  FASTLM_SM90(asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4, %5, %6}], [%2];\n" ::
          "r"(smem_u32(smem_dst)),
      "l"(reinterpret_cast<uint64_t>(desc)), "r"(smem_u32(bar)), "r"(c0), "r"(c1), "r"(c2), "r"(c3)
      : "memory"));
}
__device__ __forceinline__ void tma_prefetch_desc(const TmaDesc* desc) {
  FASTLM_SM90(asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(desc)) : "memory"));
}
__device__ __forceinline__ void fence_proxy_async_shared() {
  FASTLM_SM90(asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"));
}

__device__ __forceinline__ void named_barrier_sync(int id, int threads) {
  FASTLM_SM90(asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory"));
}
__device__ __forceinline__ void named_barrier_arrive(int id, int threads) {
  FASTLM_SM90(asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory"));
}

template <int N>
__device__ __forceinline__ void setmaxnreg_inc() {
  static_assert(N % 8 == 0 && N >= 24 && N <= 256, "setmaxnreg: a multiple of 8 in [24, 256]");
  FASTLM_SM90(asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N)));
}
template <int N>
__device__ __forceinline__ void setmaxnreg_dec() {
  static_assert(N % 8 == 0 && N >= 24 && N <= 256, "setmaxnreg: a multiple of 8 in [24, 256]");
  FASTLM_SM90(asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N)));
}

__device__ __forceinline__ uint64_t smem_desc(const void* smem, TmaSwizzle sw, uint32_t lbo_bytes, uint32_t sbo_bytes) {
  return smem_desc_bits(smem_u32(smem), sw, lbo_bytes, sbo_bytes);
}

// ---- clusters and distributed shared memory (PTX ISA: "Special Registers", barrier.cluster, mapa,
// ld/st with the .shared::cluster state space). The barriers are .aligned: every thread of a warp
// executes the same one.
__device__ __forceinline__ uint32_t cluster_ctarank() {
  uint32_t r = 0;
  FASTLM_SM90(asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(r)));
  return r;
}
__device__ __forceinline__ uint32_t cluster_nctarank() {
  uint32_t n = 1;
  FASTLM_SM90(asm volatile("mov.u32 %0, %%cluster_nctarank;\n" : "=r"(n)));
  return n;
}
__device__ __forceinline__ uint3 cluster_ctaid() {
  uint3 id{0, 0, 0};
  FASTLM_SM90(asm volatile("mov.u32 %0, %%cluster_ctaid.x;\nmov.u32 %1, %%cluster_ctaid.y;\nmov.u32 %2, %%cluster_ctaid.z;\n"
                           : "=r"(id.x), "=r"(id.y), "=r"(id.z)));
  return id;
}
__device__ __forceinline__ uint3 cluster_nctaid() {
  uint3 n{1, 1, 1};
  FASTLM_SM90(asm volatile(
      "mov.u32 %0, %%cluster_nctaid.x;\nmov.u32 %1, %%cluster_nctaid.y;\nmov.u32 %2, %%cluster_nctaid.z;\n"
      : "=r"(n.x), "=r"(n.y), "=r"(n.z)));
  return n;
}
__device__ __forceinline__ void cluster_arrive() {
  FASTLM_SM90(asm volatile("barrier.cluster.arrive.release.aligned;\n" ::: "memory"));
}
__device__ __forceinline__ void cluster_arrive_relaxed() {
  FASTLM_SM90(asm volatile("barrier.cluster.arrive.relaxed.aligned;\n" ::: "memory"));
}
__device__ __forceinline__ void cluster_wait() {
  FASTLM_SM90(asm volatile("barrier.cluster.wait.acquire.aligned;\n" ::: "memory"));
}
__device__ __forceinline__ void cluster_sync() {
  cluster_arrive();
  cluster_wait();
}
__device__ __forceinline__ uint32_t mapa_shared(uint32_t smem_addr, uint32_t rank) {
  uint32_t out = 0;
  FASTLM_SM90(asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(out) : "r"(smem_addr), "r"(rank)));
  return out;
}
template <typename T>
__device__ __forceinline__ T ld_shared_cluster(uint32_t cluster_addr) {
  T v{};
  if constexpr (std::is_same_v<T, float>) {
    FASTLM_SM90(asm volatile("ld.shared::cluster.f32 %0, [%1];\n" : "=f"(v) : "r"(cluster_addr) : "memory"));
  } else if constexpr (std::is_same_v<T, float2>) {
    FASTLM_SM90(
        asm volatile("ld.shared::cluster.v2.f32 {%0, %1}, [%2];\n" : "=f"(v.x), "=f"(v.y) : "r"(cluster_addr) : "memory"));
  } else {
    static_assert(std::is_same_v<T, float4>, "ld.shared::cluster: float, float2 or float4");
    FASTLM_SM90(asm volatile("ld.shared::cluster.v4.f32 {%0, %1, %2, %3}, [%4];\n"
                             : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w)
                             : "r"(cluster_addr)
                             : "memory"));
  }
  return v;
}
template <typename T>
__device__ __forceinline__ void st_shared_cluster(uint32_t cluster_addr, T v) {
  if constexpr (std::is_same_v<T, float>) {
    FASTLM_SM90(asm volatile("st.shared::cluster.f32 [%0], %1;\n" ::"r"(cluster_addr), "f"(v) : "memory"));
  } else if constexpr (std::is_same_v<T, float2>) {
    FASTLM_SM90(asm volatile("st.shared::cluster.v2.f32 [%0], {%1, %2};\n" ::"r"(cluster_addr), "f"(v.x), "f"(v.y)
                             : "memory"));
  } else {
    static_assert(std::is_same_v<T, float4>, "st.shared::cluster: float, float2 or float4");
    FASTLM_SM90(asm volatile("st.shared::cluster.v4.f32 [%0], {%1, %2, %3, %4};\n" ::"r"(cluster_addr), "f"(v.x),
                             "f"(v.y), "f"(v.z), "f"(v.w)
                             : "memory"));
  }
}

__device__ __forceinline__ void wgmma_fence() { FASTLM_SM90(asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory")); }
__device__ __forceinline__ void wgmma_commit() {
  FASTLM_SM90(asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"));
}
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  FASTLM_SM90(asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory"));
}
// Pins accumulators (or A registers) in place around a wgmma batch: the compiler may not move
// their reads or writes across it (CUTLASS's warpgroup_fence_operand). Without it ptxas may
// copy them between the wgmma and its wait, and then serializes the wgmmas (warning C7512).
template <typename T, int N>
__device__ __forceinline__ void wgmma_fence_operand(T (&regs)[N]) {
  static_assert(sizeof(T) == 4, "wgmma_fence_operand: float accumulators or uint32_t registers");
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+r"(reinterpret_cast<uint32_t&>(regs[i]))::"memory");
}

}  // namespace fastlm::cuda::sm90

#include "ptx_sm90_wgmma.inc"  // wgmma_ss / wgmma_rs for every N = 8..256 step 8 (generated)

#undef FASTLM_SM90
#endif  // FASTLM_EMU
