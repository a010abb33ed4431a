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

// The same in thread-block clusters of `cluster` CTAs (sm_90 only; the grid a multiple of the
// cluster shape in every dimension, at most 8 CTAs): cudaLaunchKernelEx with
// cudaLaunchAttributeClusterDimension, which also leaves its status for cudaGetLastError().
template <typename... P, typename... A>
inline void launch_cluster_kernel(void (*kernel)(P...), dim3 grid, dim3 block, dim3 cluster, size_t smem,
                                  cudaStream_t stream, A&&... args) {
#ifdef FASTLM_EMU
  (void)stream;
  ::fastlm::emu::launch(kernel, grid, block, smem, std::tuple<std::decay_t<P>...>(std::forward<A>(args)...), cluster);
#else
  cudaLaunchAttribute attribute[1];
  attribute[0].id = cudaLaunchAttributeClusterDimension;
  attribute[0].val.clusterDim.x = cluster.x;
  attribute[0].val.clusterDim.y = cluster.y;
  attribute[0].val.clusterDim.z = cluster.z;
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  config.attrs = attribute;
  config.numAttrs = 1;
  (void)cudaLaunchKernelEx(&config, kernel, std::forward<A>(args)...);
#endif
}

}  // namespace fastlm::cuda
