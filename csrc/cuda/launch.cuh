// The seam between the kernel files and the SIMT emulator (csrc/emu): kernels are launched with
// launch_kernel, declare shared memory with FASTLM_SHARED / FASTLM_DYNAMIC_SHARED, and reach
// inline PTX only through ptx.cuh. Compiled by nvcc these are exactly <<<...>>> and __shared__;
// compiled as host C++ with -DFASTLM_EMU they become the emulator's launch and shared arena,
// which checks every shared access (bounds, initialization, races).
#pragma once
#include <cuda_runtime.h>

#include <tuple>
#include <type_traits>

#ifdef FASTLM_EMU
// `type name dims`, e.g. FASTLM_SHARED(float, partial, [2][64]): a reference to the block's array.
#define FASTLM_SHARED(type, name, dims)                                                              \
  type(&name) dims = *reinterpret_cast<type(*) dims>(                                                \
      ::fastlm::emu::shared_alloc(sizeof(type dims), alignof(type dims), #name))
#define FASTLM_DYNAMIC_SHARED(type, name) type* name = reinterpret_cast<type*>(::fastlm::emu::dynamic_shared())
#else
#define FASTLM_SHARED(type, name, dims) __shared__ __align__(16) type name dims
// 128-byte aligned: wmma and ldmatrix pointers need 32 and 16.
#define FASTLM_DYNAMIC_SHARED(type, name) extern __shared__ __align__(128) type name[]
#endif

namespace fastlm::cuda {

// kernel<<<grid, block, smem, stream>>>(args...); the status is left for cudaGetLastError().
template <typename... P, typename... A>
inline void launch_kernel(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream, A&&... args) {
#ifdef FASTLM_EMU
  (void)stream;
  ::fastlm::emu::launch(kernel, grid, block, smem, std::tuple<std::decay_t<P>...>(std::forward<A>(args)...));
#else
  kernel<<<grid, block, smem, stream>>>(std::forward<A>(args)...);
#endif
}

#ifndef FASTLM_EMU
// The launch configuration of clusters of `cluster` CTAs (cudaLaunchAttributeClusterDimension in
// `attribute`, which must outlive the config).
inline cudaLaunchConfig_t cluster_config(dim3 grid, dim3 block, dim3 cluster, size_t smem, cudaStream_t stream,
                                         cudaLaunchAttribute& attribute) {
  attribute.id = cudaLaunchAttributeClusterDimension;
  attribute.val.clusterDim.x = cluster.x;
  attribute.val.clusterDim.y = cluster.y;
  attribute.val.clusterDim.z = cluster.z;
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  config.attrs = &attribute;
  config.numAttrs = 1;
  return config;
}
#endif

// The same in thread-block clusters of `cluster` CTAs (sm_90 only; the grid a multiple of the
// cluster shape in every dimension, at most 8 CTAs): cudaLaunchKernelEx with
// cudaLaunchAttributeClusterDimension. Returns its status (a cluster the device can't place:
// cudaErrorInvalidClusterSize or cudaErrorLaunchOutOfResources), which the runtime also leaves for
// cudaGetLastError().
template <typename... P, typename... A>
inline cudaError_t launch_cluster_kernel(void (*kernel)(P...), dim3 grid, dim3 block, dim3 cluster, size_t smem,
                                         cudaStream_t stream, A&&... args) {
#ifdef FASTLM_EMU
  (void)stream;
  return cudaError_t(::fastlm::emu::launch(kernel, grid, block, smem,
                                           std::tuple<std::decay_t<P>...>(std::forward<A>(args)...), cluster));
#else
  cudaLaunchAttribute attribute;
  const cudaLaunchConfig_t config = cluster_config(grid, block, cluster, smem, stream, attribute);
  return cudaLaunchKernelEx(&config, kernel, std::forward<A>(args)...);
#endif
}

// How many clusters of `cluster` CTAs of `kernel` (`block` threads, `smem` bytes of dynamic shared
// memory each, within the kernel's cudaFuncAttributeMaxDynamicSharedMemorySize) the current device
// can hold at once: cudaOccupancyMaxActiveClusters (the emulator's twin under FASTLM_EMU). 0 when
// none fits or the query fails; the query's error is cleared (the caller takes another path).
template <typename... P>
inline int max_active_clusters(void (*kernel)(P...), dim3 block, dim3 cluster, size_t smem) {
  int count = 0;
#ifdef FASTLM_EMU
  const int status =
      ::fastlm::emu::max_active_clusters(&count, reinterpret_cast<const void*>(kernel), block, cluster, smem);
#else
  cudaLaunchAttribute attribute;
  const cudaLaunchConfig_t config = cluster_config(cluster, block, cluster, smem, nullptr, attribute);
  const cudaError_t status = cudaOccupancyMaxActiveClusters(&count, kernel, &config);
#endif
  if (status != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return count;
}

}  // namespace fastlm::cuda
