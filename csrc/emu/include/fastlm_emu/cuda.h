// What the kernels use of cuda_runtime.h, for the emulator: qualifiers, intrinsics, warp
// shuffles and votes, atomics, and the runtime API calls the launchers make.
#pragma once
#include <math.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#include "fastlm/common.h"  // cudaStream_t
#include "fastlm_emu/runtime.h"

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __restrict__ __restrict
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(...)
#define __grid_constant__  // a TmaDesc kernel parameter (sm_90): by value here as anywhere

// ---------------------------------------------------------------- runtime API
enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchOutOfResources = 701,
  cudaErrorMisalignedAddress = 716,
  cudaErrorLaunchFailure = 719,
  cudaErrorInvalidClusterSize = 912,
};
enum cudaDeviceAttr : int {
  cudaDevAttrMaxThreadsPerBlock = 1,
  cudaDevAttrMaxGridDimY = 6,
  cudaDevAttrMaxGridDimZ = 7,
  cudaDevAttrMaxSharedMemoryPerBlock = 8,
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrComputeCapabilityMajor = 75,
  cudaDevAttrComputeCapabilityMinor = 76,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
};
enum cudaFuncAttribute : int { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };

cudaError_t cudaGetLastError();
cudaError_t cudaPeekAtLastError();
const char* cudaGetErrorString(cudaError_t err);
cudaError_t cudaGetDevice(int* device);
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device);
// Device memory is host memory under emulation: the "async" memory calls run at once.
inline cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t = nullptr) {
  std::memset(p, value, bytes);
  return cudaSuccess;
}
inline cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, int = 0, cudaStream_t = nullptr) {
  std::memcpy(dst, src, bytes);
  return cudaSuccess;
}
cudaError_t cudaFuncSetAttribute_raw(const void* kernel, cudaFuncAttribute attr, int value);
template <typename F>
cudaError_t cudaFuncSetAttribute(F* kernel, cudaFuncAttribute attr, int value) {
  return cudaFuncSetAttribute_raw(reinterpret_cast<const void*>(kernel), attr, value);
}

// ---------------------------------------------------------------- intrinsics and math
inline float __int_as_float(int v) { float f; std::memcpy(&f, &v, 4); return f; }
inline int __float_as_int(float v) { int i; std::memcpy(&i, &v, 4); return i; }
inline unsigned __float_as_uint(float v) { unsigned i; std::memcpy(&i, &v, 4); return i; }
inline long long __double_as_longlong(double v) { long long i; std::memcpy(&i, &v, 8); return i; }
inline double __longlong_as_double(long long v) { double d; std::memcpy(&d, &v, 8); return d; }
inline float __uint_as_float(unsigned v) { float f; std::memcpy(&f, &v, 4); return f; }
// The fast intrinsics are approximations on a GPU; the emulator computes them exactly, so a
// test's tolerance must cover the GPU's error, which these never exceed.
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __saturatef(float x) { return x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : x); }
inline void sincospif(float x, float* s, float* c) {  // sin(pi x), cos(pi x)
  const double a = 3.14159265358979323846 * double(x);
  *s = float(std::sin(a));
  *c = float(std::cos(a));
}

// CUDA's min/max overloads for mixed integer code.
#define FASTLM_EMU_MINMAX(T)                              \
  inline T min(T a, T b) { return b < a ? b : a; }        \
  inline T max(T a, T b) { return a < b ? b : a; }
FASTLM_EMU_MINMAX(int)
FASTLM_EMU_MINMAX(unsigned)
FASTLM_EMU_MINMAX(long)
FASTLM_EMU_MINMAX(unsigned long)
FASTLM_EMU_MINMAX(long long)
FASTLM_EMU_MINMAX(unsigned long long)
inline float min(float a, float b) { return std::fmin(a, b); }
inline float max(float a, float b) { return std::fmax(a, b); }
#undef FASTLM_EMU_MINMAX

// ---------------------------------------------------------------- block and warp sync
inline void __syncthreads() { ::fastlm::emu::syncthreads(); }
// Blocks run one at a time and threads switch only at sync points: memory is always ordered.
inline void __threadfence() {}
void __syncwarp(unsigned mask = 0xffffffffu);
unsigned __ballot_sync(unsigned mask, int pred);
int __all_sync(unsigned mask, int pred);
int __any_sync(unsigned mask, int pred);
unsigned __activemask();

namespace fastlm::emu {
// kind: 0 idx (shfl), 1 up, 2 down, 3 xor. Values travel as 64 bits.
uint64_t shuffle(unsigned mask, uint64_t value, int arg, int width, int kind);
}  // namespace fastlm::emu

#define FASTLM_EMU_SHFL(name, kind)                                                        \
  template <typename T>                                                                    \
  T name(unsigned mask, T v, int arg, int width = 32) {                                    \
    static_assert(sizeof(T) <= 8, #name ": values up to 8 bytes");                         \
    uint64_t bits = 0;                                                                     \
    std::memcpy(&bits, &v, sizeof(T));                                                     \
    bits = ::fastlm::emu::shuffle(mask, bits, arg, width, kind);                           \
    T out;                                                                                 \
    std::memcpy(&out, &bits, sizeof(T));                                                   \
    return out;                                                                            \
  }
FASTLM_EMU_SHFL(__shfl_sync, 0)
FASTLM_EMU_SHFL(__shfl_up_sync, 1)
FASTLM_EMU_SHFL(__shfl_down_sync, 2)
FASTLM_EMU_SHFL(__shfl_xor_sync, 3)
#undef FASTLM_EMU_SHFL

// ---------------------------------------------------------------- atomics
// One host thread runs every CUDA thread, so atomics are plain read-modify-writes; they are not
// race-checked (atomics never race with each other), hence not instrumented.
#define FASTLM_EMU_ATOMIC template <typename T> __attribute__((no_sanitize_thread, noinline)) inline T
FASTLM_EMU_ATOMIC atomicAdd(T* p, T v) { T old = *p; *p = old + v; return old; }
FASTLM_EMU_ATOMIC atomicMax(T* p, T v) { T old = *p; *p = old < v ? v : old; return old; }
FASTLM_EMU_ATOMIC atomicMin(T* p, T v) { T old = *p; *p = v < old ? v : old; return old; }
FASTLM_EMU_ATOMIC atomicOr(T* p, T v) { T old = *p; *p = old | v; return old; }
FASTLM_EMU_ATOMIC atomicAnd(T* p, T v) { T old = *p; *p = old & v; return old; }
FASTLM_EMU_ATOMIC atomicExch(T* p, T v) { T old = *p; *p = v; return old; }
FASTLM_EMU_ATOMIC atomicCAS(T* p, T cmp, T v) { T old = *p; if (old == cmp) *p = v; return old; }
