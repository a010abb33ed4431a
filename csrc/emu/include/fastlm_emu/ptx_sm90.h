// Emulated sm_90a primitives behind csrc/cuda/ptx_sm90.cuh (which includes this after its common
// part: TmaDesc, TmaSwizzle, the descriptor bits, the swizzle and TMA's argument rules).
// Semantics (csrc/emu/sm90.cpp), all legal only when the emulated device is "9.0":
//  - mbarrier: per-barrier state {expected arrivals, pending arrivals, tx-count, phase}; a phase
//    completes when pending arrivals and tx-count are both 0. mbar_wait BLOCKS the thread (the
//    scheduler runs the others) until the phase of that parity has completed; if every live
//    thread is blocked the launch fails with a deadlock message naming the barrier and phase.
//    Errors: init twice, use before init, tx-count below 0, more arrivals than expected.
//  - TMA: the box is copied at issue (zero fill out of bounds, the swizzle applied to the shared
//    address bits), then complete_tx(box bytes) on the barrier. Destinations must be 128-byte
//    aligned (1024 for 128B swizzle).
//  - named barriers: bar.sync / bar.arrive by id (1..15) and thread count (a multiple of 32).
//  - wgmma: a warpgroup collective (the 128 threads 128g..128g+127 all call it with the same
//    arguments); A and B are read from shared memory by decoding the descriptors as the ISA
//    says (or A from the 128 threads' registers); fp32 accumulation. D is computed at the call
//    but, as on a GPU where it is undefined until then, the thread's accumulator registers read
//    NaN until the wgmma_wait that retires its group (a chained wgmma on the same registers uses
//    the value in flight; a thread's own write to them before the wait is lost at the wait).
//    wgmma_fence / commit / wait are warpgroup collectives with bookkeeping checks: a wgmma
//    needs a wgmma_fence since the thread's last wgmma_wait; a thread may not exit with groups
//    not waited for. Not checked here: modifying A's registers before the wait, and a missing
//    fence_proxy_async_shared between threads' own shared writes and a wgmma reading them.
//  - Clusters (a launch with a cluster shape; its CTAs run together): %cluster_ctarank and
//    friends; barrier.cluster.arrive / wait BLOCK until every thread of every CTA of the cluster
//    has arrived (a thread that exits without arriving leaves the others in a deadlock, reported
//    with what each CTA waits for); arriving twice without a wait, or waiting without an arrive,
//    fails. A shared::cta address (smem_u32) is the offset in the CTA's arena; mapa turns it into
//    a shared::cluster address, (rank + 1) << 24 | offset (an address with 0 there is the own CTA,
//    as in PTX). ld / st.shared::cluster (4, 8, 16 bytes, naturally aligned) are checked against
//    the TARGET CTA's allocations, initialization and accesses: out of bounds, a rank outside the
//    cluster, a CTA that has exited, and a CTA that exits with a remote access into it (still in
//    its shadow) not ordered before its exit by a cluster barrier it waited for, all fail. Before
//    the first cluster barrier a DSMEM access outside what the target has declared so far fails
//    as "may not have started". A completed cluster barrier orders every access
//    before it (on any CTA) with every access after it; nothing else orders a DSMEM access with
//    the target CTA's own accesses (its __syncthreads does not). Not modeled: the window between a
//    thread's arrive and its wait (its accesses there count as after the barrier, so a race there
//    goes unseen), .relaxed arrives (treated as .release), remote mbarrier arrives.
//  - Race checker: mbarrier arrive -> wait of that phase, named barriers and __syncwarp join
//    vector clocks; TMA writes belong to the issuing thread at issue; wgmma's shared reads belong
//    to a per-warpgroup "async proxy" reader, ordered before a thread's later accesses once its
//    wgmma_wait has retired that group (releasing a stage before the wait is a race). After each
//    mbarrier arrive and TMA issue the scheduler runs the other threads first, so a producer does
//    not run ahead of its consumers and a missing empty-barrier wait shows as a race.
#pragma once
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "fastlm_emu/cuda.h"
#include "fastlm_emu/half.h"

namespace fastlm::emu::sm90 {
using cuda::sm90::TmaDesc;
using cuda::sm90::TmaSwizzle;

// The emulator's tensor map: what cuTensorMapEncodeTiled would encode, in plain fields.
struct TmaMap {
  uint32_t magic;
  int32_t rank, elem_bytes, swizzle;  // swizzle: a TmaSwizzle
  const unsigned char* base;
  int64_t dims[4], strides[4];  // strides in bytes; strides[0] = elem_bytes
  int32_t box[4];
};
constexpr uint32_t kTmaMagic = 0x544d4131;  // "TMA1"
static_assert(sizeof(TmaMap) <= sizeof(TmaDesc), "TmaMap must fit a TmaDesc");

void require_sm90(const char* what);  // fails unless the emulated device is 9.0
void mbar_init(uint64_t* bar, int arrivals);
void fence_barrier_init();
void mbar_arrive(uint64_t* bar, bool expect_tx, uint32_t tx_bytes);
void mbar_wait(uint64_t* bar, int phase_parity);
void tma_load(void* smem_dst, const TmaDesc* desc, int rank, const int* coords, uint64_t* bar);
void tma_prefetch(const TmaDesc* desc);
void fence_proxy_async();
void named_barrier(int id, int threads, bool wait);
void setmaxnreg(int regs);
uint32_t smem_offset(const void* p, const char* what);  // the shared "address" a descriptor holds
// One wgmma by the calling thread: d (N/2 floats), A from a descriptor (a_regs null) or from 4
// registers; dtype 1 = f16, 2 = bf16.
void wgmma(float* d, int n, int dtype, bool trans_a, bool trans_b, uint64_t desc_a, const uint32_t* a_regs,
           uint64_t desc_b, bool accumulate);
void wgmma_fence();
void wgmma_commit();
void wgmma_wait(int groups_left);
// clusters and distributed shared memory
uint32_t cluster_ctarank();
uint32_t cluster_nctarank();
uint3 cluster_ctaid();
uint3 cluster_nctaid();
void cluster_arrive(bool release);
void cluster_wait();
uint32_t smem_u32(const void* p);  // cvta.to.shared: the offset in the CTA's arena
uint32_t mapa(uint32_t smem_addr, uint32_t rank);
void dsmem_access(uint32_t cluster_addr, void* data, int bytes, bool write);
}  // namespace fastlm::emu::sm90

namespace fastlm::cuda::sm90 {

// ---------------------------------------------------------------- host: tensor maps
namespace detail {
inline bool make_tma_desc(TmaDesc* out, int rank, const void* base, int elem_bytes, const int64_t* dims,
                          const int64_t* strides, const int* box, TmaSwizzle sw, const char** why) {
  if (const char* bad = tma_desc_problem(rank, base, elem_bytes, dims, strides, box, sw)) {
    if (why) *why = bad;
    return false;
  }
  emu::sm90::TmaMap m{};
  m.magic = emu::sm90::kTmaMagic;
  m.rank = rank, m.elem_bytes = elem_bytes, m.swizzle = int(sw);
  m.base = static_cast<const unsigned char*>(base);
  m.strides[0] = elem_bytes;
  for (int i = 0; i < rank; ++i) m.dims[i] = dims[i], m.box[i] = box[i];
  for (int i = 1; i < rank; ++i) m.strides[i] = strides[i - 1];
  std::memset(out->bytes, 0, sizeof out->bytes);
  std::memcpy(out->bytes, &m, sizeof m);
  return true;
}
}  // namespace detail

// ---------------------------------------------------------------- device
__device__ __forceinline__ void mbar_init(uint64_t* bar, int arrivals) { emu::sm90::mbar_init(bar, arrivals); }
__device__ __forceinline__ void fence_barrier_init() { emu::sm90::fence_barrier_init(); }
__device__ __forceinline__ void mbar_arrive(uint64_t* bar) { emu::sm90::mbar_arrive(bar, false, 0); }
__device__ __forceinline__ void mbar_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
  emu::sm90::mbar_arrive(bar, true, bytes);
}
__device__ __forceinline__ void mbar_wait(uint64_t* bar, int phase_parity) { emu::sm90::mbar_wait(bar, phase_parity); }

__device__ __forceinline__ void tma_load_2d(void* smem_dst, const TmaDesc* desc, int inner, int outer, uint64_t* bar) {
  const int c[2] = {inner, outer};
  emu::sm90::tma_load(smem_dst, desc, 2, c, bar);
}
__device__ __forceinline__ void tma_load_3d(void* smem_dst, const TmaDesc* desc, int c0, int c1, int c2, uint64_t* bar) {
  const int c[3] = {c0, c1, c2};
  emu::sm90::tma_load(smem_dst, desc, 3, c, bar);
}
__device__ __forceinline__ void tma_load_4d(void* smem_dst, const TmaDesc* desc, int c0, int c1, int c2, int c3,
                                            uint64_t* bar) {
  const int c[4] = {c0, c1, c2, c3};
  emu::sm90::tma_load(smem_dst, desc, 4, c, bar);
}
__device__ __forceinline__ void tma_prefetch_desc(const TmaDesc* desc) { emu::sm90::tma_prefetch(desc); }
__device__ __forceinline__ void fence_proxy_async_shared() { emu::sm90::fence_proxy_async(); }

__device__ __forceinline__ void named_barrier_sync(int id, int threads) { emu::sm90::named_barrier(id, threads, true); }
__device__ __forceinline__ void named_barrier_arrive(int id, int threads) {
  emu::sm90::named_barrier(id, threads, false);
}

template <int N>
__device__ __forceinline__ void setmaxnreg_inc() {
  static_assert(N % 8 == 0 && N >= 24 && N <= 256, "setmaxnreg: a multiple of 8 in [24, 256]");
  emu::sm90::setmaxnreg(N);
}
template <int N>
__device__ __forceinline__ void setmaxnreg_dec() {
  static_assert(N % 8 == 0 && N >= 24 && N <= 256, "setmaxnreg: a multiple of 8 in [24, 256]");
  emu::sm90::setmaxnreg(N);
}

__device__ __forceinline__ uint64_t smem_desc(const void* smem, TmaSwizzle sw, uint32_t lbo_bytes, uint32_t sbo_bytes) {
  return smem_desc_bits(emu::sm90::smem_offset(smem, "smem_desc"), sw, lbo_bytes, sbo_bytes);
}

// ---- clusters and distributed shared memory
__device__ __forceinline__ uint32_t cluster_ctarank() { return emu::sm90::cluster_ctarank(); }
__device__ __forceinline__ uint32_t cluster_nctarank() { return emu::sm90::cluster_nctarank(); }
__device__ __forceinline__ uint3 cluster_ctaid() { return emu::sm90::cluster_ctaid(); }
__device__ __forceinline__ uint3 cluster_nctaid() { return emu::sm90::cluster_nctaid(); }
__device__ __forceinline__ void cluster_arrive() { emu::sm90::cluster_arrive(true); }
__device__ __forceinline__ void cluster_arrive_relaxed() { emu::sm90::cluster_arrive(false); }
__device__ __forceinline__ void cluster_wait() { emu::sm90::cluster_wait(); }
__device__ __forceinline__ void cluster_sync() {
  emu::sm90::cluster_arrive(true);
  emu::sm90::cluster_wait();
}
__device__ __forceinline__ uint32_t smem_u32(const void* p) { return emu::sm90::smem_u32(p); }
__device__ __forceinline__ uint32_t mapa_shared(uint32_t smem_addr, uint32_t rank) {
  return emu::sm90::mapa(smem_addr, rank);
}
template <typename T>
__device__ __forceinline__ T ld_shared_cluster(uint32_t cluster_addr) {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, float2> || std::is_same_v<T, float4>,
                "ld.shared::cluster: float, float2 or float4");
  T v;
  emu::sm90::dsmem_access(cluster_addr, &v, int(sizeof(T)), false);
  return v;
}
template <typename T>
__device__ __forceinline__ void st_shared_cluster(uint32_t cluster_addr, T v) {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, float2> || std::is_same_v<T, float4>,
                "st.shared::cluster: float, float2 or float4");
  emu::sm90::dsmem_access(cluster_addr, &v, int(sizeof(T)), true);
}

__device__ __forceinline__ void wgmma_fence() { emu::sm90::wgmma_fence(); }
__device__ __forceinline__ void wgmma_commit() { emu::sm90::wgmma_commit(); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  static_assert(N >= 0 && N <= 7, "wgmma.wait_group: N in 0..7");
  emu::sm90::wgmma_wait(N);
}

template <typename T, int N>
__device__ __forceinline__ void wgmma_fence_operand(T (&)[N]) {
  static_assert(sizeof(T) == 4, "wgmma_fence_operand: float accumulators or uint32_t registers");
}  // a compiler-ordering hint on a GPU; nothing to do here

template <typename T, int N, bool TransA, bool TransB>
__device__ __forceinline__ void wgmma_ss(float (&d)[N / 2], uint64_t desc_a, uint64_t desc_b, bool accumulate) {
  static_assert(N % 8 == 0 && N >= 8 && N <= 256, "wgmma m64nNk16: N in 8..256, a multiple of 8");
  static_assert(std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>, "wgmma: f16 or bf16 inputs");
  emu::sm90::wgmma(d, N, std::is_same_v<T, __half> ? 1 : 2, TransA, TransB, desc_a, nullptr, desc_b, accumulate);
}
template <typename T, int N, bool TransB>
__device__ __forceinline__ void wgmma_rs(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t desc_b, bool accumulate) {
  static_assert(N % 8 == 0 && N >= 8 && N <= 256, "wgmma m64nNk16: N in 8..256, a multiple of 8");
  static_assert(std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>, "wgmma: f16 or bf16 inputs");
  emu::sm90::wgmma(d, N, std::is_same_v<T, __half> ? 1 : 2, false, TransB, 0, a, desc_b, accumulate);
}

}  // namespace fastlm::cuda::sm90
