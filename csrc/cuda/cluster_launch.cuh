// Long rows on sm_90a thread-block clusters, shared by softmax.cu and norms.cu: S = 2..8 CTAs of
// kClusterBlock threads hold a row (or a row's operands) in their shared memory, at most
// kClusterSliceBytes a CTA, so the row is read from DRAM once, and per-CTA partial values cross
// the cluster through distributed shared memory (DSMEM), added in rank order (deterministic).
//
// Device side: ClusterSlice (rank q of a cluster holds body packs [q P, (q + 1) P) of the first
// operand's row split, row_io.cuh; rank 0 also the head scalars, the last rank the tail ones, one
// per thread at most), stage_packs / stage_slice (kStageLoads 16-byte loads in flight per thread,
// element loads for an operand out of the first one's 16-byte phase; thread t always handles the
// packs p0 + t + i kClusterBlock, so a thread reads back only what it staged itself), and
// cluster_gather (every rank's value after a cluster barrier); single packs are row_io.cuh's
// get_pack / put_pack.
//
// Host side: cluster_size_for (the sm_90a binary check, then the slices a row needs),
// cluster_fits (cudaOccupancyMaxActiveClusters at a full slice a CTA, asked once per device,
// kernel and cluster size: sm90::known_answer / remember_answer in ptx_sm90.cuh, the same cache
// as binary_is_sm90a's), launch_on_cluster (a refusal at launch, cudaErrorInvalidClusterSize or
// cudaErrorLaunchOutOfResources, is remembered as "no" and the caller's single-CTA kernel takes
// the rows), rows_on_cluster (one cluster a row), and clusters_held (a persistent grid, cached
// like cluster_fits). The emulator build asks every time: its
// query is arithmetic, and its tests change the emulated device between calls.
#pragma once
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "launch.cuh"
#include "ptx_sm90.cuh"
#include "row_io.cuh"

namespace fastlm::cuda {

constexpr int kClusterBlock = 512;
constexpr int64_t kClusterSliceBytes = 128 * 1024;
constexpr int kMaxCluster = 8;
constexpr int kStageLoads = 4;  // 16-byte loads in flight per thread while a slice is staged

// ---------------------------------------------------------------- device
// This CTA's part of its cluster's row (one cluster a row: blockIdx.x = size row + rank).
struct ClusterSlice {
  int rank;
  int64_t row;
  RowSplit s;
  int64_t p0, p1;   // body packs [p0, p1)
  bool has_edge;    // this thread holds a head (rank 0) or tail (last rank) element
  int64_t edge_col;
};

template <typename T>
__device__ __forceinline__ ClusterSlice cluster_slice(const T* first, int64_t stride, int64_t cols,
                                                      int64_t slice_packs, int size) {
  ClusterSlice c;
  c.rank = int(blockIdx.x % unsigned(size));
  c.row = blockIdx.x / unsigned(size);
  c.s = split_row(first + c.row * stride, cols);
  c.p0 = int64_t(c.rank) * slice_packs;
  c.p1 = min(c.s.packs, c.p0 + slice_packs);
  const int tid = threadIdx.x;
  c.has_edge = (c.rank == 0 && tid < c.s.head) || (c.rank == size - 1 && tid < c.s.tail);
  c.edge_col = c.rank == 0 ? tid : c.s.head + c.s.packs * kVec<T> + tid;
  return c;
}

// Packs [p0, p1) of a row's body (its elements from `body` on), kStageLoads loads in flight per
// thread, each handed to sink(p, pack) once they have all arrived: 16-byte loads when VEC (the
// row is in the first operand's phase), else element by element.
template <bool VEC, typename T, typename Sink>
__device__ __forceinline__ void stage_packs(const T* __restrict__ body, int64_t p0, int64_t p1, Sink&& sink) {
  using P = Pack<T, kVec<T>>;
  for (int64_t p = p0 + threadIdx.x; p < p1; p += int64_t(kStageLoads) * kClusterBlock) {
    P v[kStageLoads];
#pragma unroll
    for (int k = 0; k < kStageLoads; ++k) {
      const int64_t q = p + k * kClusterBlock;
      if (q < p1) v[k] = get_pack<VEC>(body, q);
    }
#pragma unroll
    for (int k = 0; k < kStageLoads; ++k)
      if (p + k * kClusterBlock < p1) sink(p + k * kClusterBlock, v[k]);
  }
}

template <typename T, typename Sink>
__device__ __forceinline__ void stage_packs(const T* body, bool vec, int64_t p0, int64_t p1, Sink&& sink) {
  if (vec) stage_packs<true>(body, p0, p1, sink);
  else stage_packs<false>(body, p0, p1, sink);
}

// The packs into `slice` (slice[p - p0]).
template <bool VEC, typename T>
__device__ __forceinline__ void stage_slice(const T* body, Pack<T, kVec<T>>* slice, int64_t p0, int64_t p1) {
  stage_packs<VEC>(body, p0, p1, [&](int64_t p, const Pack<T, kVec<T>>& v) { slice[p - p0] = v; });
}
template <typename T>
__device__ __forceinline__ void stage_slice(const T* body, bool vec, Pack<T, kVec<T>>* slice, int64_t p0, int64_t p1) {
  if (vec) stage_slice<true>(body, slice, p0, p1);
  else stage_slice<false>(body, slice, p0, p1);
}

// Every rank's mine[0] into all[0..size), fetched by threads 0..size-1 through DSMEM after a
// cluster barrier (which also orders every rank's previous fetches before it). `last`: no gather
// follows, so this CTA says it is done with the others' shared memory (a relaxed arrive) and the
// kernel ends with sm90::cluster_wait(), keeping its own mine[0] alive until the others' fetches;
// otherwise the next gather's barrier does that, and the kernel ends with sm90::cluster_sync().
// A value gathered again must alternate between two slots (a rank may still be fetching the
// previous one until the next barrier).
template <typename V>
__device__ __forceinline__ void cluster_gather(V* mine, V* all, int size, bool last) {
  sm90::cluster_sync();  // every rank's value is in place
  if (int(threadIdx.x) < size)
    all[threadIdx.x] = sm90::ld_shared_cluster<V>(sm90::mapa_shared(sm90::smem_u32(mine), threadIdx.x));
  if (last) sm90::cluster_arrive_relaxed();
  __syncthreads();
}

// ---------------------------------------------------------------- host
// The cluster size for rows of `bytes` held at once (every operand's body packs), at least
// min_size, for `clusters` clusters (0: no cluster path): an sm_90a binary (which implies a
// compute capability 9.0 device; the emulator, where binary_is_sm90a is always true, asks the
// emulated device), and the row in at most kMaxCluster slices of kClusterSliceBytes.
template <typename Kernel>
int cluster_size_for(Kernel kernel, int64_t bytes, int64_t clusters, int64_t min_size = 2) {
#ifdef FASTLM_EMU
  int dev = 0, major = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess || major < 9)
    return 0;
#endif
  if (!sm90::binary_is_sm90a(kernel)) return 0;
  const int64_t size = std::max(min_size, (bytes + kClusterSliceBytes - 1) / kClusterSliceBytes);
  return size <= kMaxCluster && clusters * size <= INT32_MAX ? int(size) : 0;
}

// Whether the current device can hold clusters of `size` CTAs of `kernel`, a full slice
// (kClusterSliceBytes) of shared memory each: cudaOccupancyMaxActiveClusters > 0 (0: the GPCs
// can't place such a cluster), after raising the kernel's dynamic shared memory limit to a
// slice, which every later launch fits under. Cached per (device, kernel, size).
template <typename Kernel>
bool cluster_fits(Kernel kernel, int size) {
#ifndef FASTLM_EMU
  const void* key = reinterpret_cast<const void*>(kernel);
  if (const int32_t known = sm90::known_answer(key, size)) return known == sm90::kYes;
#endif
  const bool yes = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        int(kClusterSliceBytes)) == cudaSuccess &&
                   max_active_clusters(kernel, kClusterBlock, dim3(unsigned(size)), size_t(kClusterSliceBytes)) > 0;
  if (!yes) (void)cudaGetLastError();  // not sticky: the single-CTA kernel takes the rows
#ifndef FASTLM_EMU
  sm90::remember_answer(key, size, yes ? sm90::kYes : sm90::kNo);
#endif
  return yes;
}

// How many clusters of `size` CTAs of `kernel`, `smem` bytes each (at most a slice, after
// cluster_fits), the current device holds at once: the grid of a persistent kernel. Cached per
// (device, kernel, size, smem) outside the emulator.
template <typename Kernel>
int clusters_held(Kernel kernel, int size, size_t smem) {
#ifndef FASTLM_EMU
  const void* key = reinterpret_cast<const void*>(kernel);
  const int param = int(smem) * 16 + size;  // smem <= kClusterSliceBytes; never 0..15 (cluster_fits' keys)
  if (const int32_t known = sm90::known_answer(key, param)) return known - 1;
#endif
  const int held = max_active_clusters(kernel, kClusterBlock, dim3(unsigned(size)), smem);
#ifndef FASTLM_EMU
  sm90::remember_answer(key, param, held + 1);
#endif
  return held;
}

// kernel<<<clusters x size CTAs of kClusterBlock, in clusters of size, smem>>>(args...) where
// cluster_fits (size 0: none). false: no cluster, or the device refused it
// (cudaErrorInvalidClusterSize, cudaErrorLaunchOutOfResources: remembered as "no"), and the
// caller's single-CTA kernel takes the rows. Any other launch error is left for the caller.
template <typename... P, typename... A>
bool launch_on_cluster(void (*kernel)(P...), int64_t clusters, int size, size_t smem, cudaStream_t stream,
                       A&&... args) {
  if (size == 0 || !cluster_fits(kernel, size)) return false;
  const cudaError_t e = launch_cluster_kernel(kernel, dim3(unsigned(clusters * size)), kClusterBlock,
                                              dim3(unsigned(size)), smem, stream, std::forward<A>(args)...);
  if (e != cudaErrorInvalidClusterSize && e != cudaErrorLaunchOutOfResources) return true;
  (void)cudaGetLastError();  // a refusal, not a fault
#ifndef FASTLM_EMU
  sm90::remember_answer(reinterpret_cast<const void*>(kernel), size, sm90::kNo);
#endif
  return false;
}

// One cluster a row, rows of `cols` elements of `operands` tensors held at once:
// kernel(args..., cols, slice_packs, size), slice_packs of each operand a CTA.
template <typename T, typename... P, typename... A>
bool rows_on_cluster(void (*kernel)(P...), int operands, int64_t rows, int64_t cols, cudaStream_t stream,
                     A&&... args) {
  const int64_t packs = cols / kVec<T>;  // every row's body packs, whatever its phase
  const int size = cluster_size_for(kernel, operands * packs * 16, rows);
  const int64_t slice_packs = size ? (packs + size - 1) / size : 0;
  return launch_on_cluster(kernel, rows, size, size_t(operands * slice_packs * 16), stream,
                           std::forward<A>(args)..., cols, slice_packs, size);
}

}  // namespace fastlm::cuda
