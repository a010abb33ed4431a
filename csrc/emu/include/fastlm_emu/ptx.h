// Emulated PTX behind csrc/cuda/ptx.cuh's helpers: cp.async (16-byte, zero fill), ldmatrix
// (x1/x2/x4, .trans) and mma.sync.m16n8k16 (f16/bf16 in, fp32 accumulate), with the fragment
// layouts of fragments.h and the alignment rules of the ISA (a violation stops the launch, as
// a misaligned-address fault would on a GPU).
#pragma once
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "fastlm_emu/cuda.h"
#include "fastlm_emu/half.h"

namespace fastlm::emu {
// Loads `count` 8x8 matrices: lanes 8j..8j+7 give the row addresses of matrix j; out[j] of
// each lane receives its two elements of matrix j.
void ldmatrix(uint32_t* out, int count, const void* row_address, bool trans);
// D = A * B + C on a 16x8x16 tile; dtype 1 = f16, 2 = bf16.
void mma_m16n8k16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, int dtype);
}  // namespace fastlm::emu

namespace fastlm::cuda {

__device__ __forceinline__ void cp_async16(void* dst, const void* src, int src_bytes) {
  emu::cp_async_queue(dst, src, 16, src_bytes);
}
__device__ __forceinline__ void cp_async_commit() { emu::cp_async_commit(); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { emu::cp_async_wait(N); }

__device__ __forceinline__ void ldmatrix_x1(uint32_t (&r)[1], const void* p) { emu::ldmatrix(r, 1, p, false); }
__device__ __forceinline__ void ldmatrix_x2(uint32_t (&r)[2], const void* p) { emu::ldmatrix(r, 2, p, false); }
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) { emu::ldmatrix(r, 4, p, false); }
__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t (&r)[2], const void* p) { emu::ldmatrix(r, 2, p, true); }
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) { emu::ldmatrix(r, 4, p, true); }

template <typename T>
__device__ __forceinline__ void mma_m16n8k16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  static_assert(std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>, "mma_m16n8k16: f16 or bf16");
  emu::mma_m16n8k16(c, a, b0, b1, std::is_same_v<T, __half> ? 1 : 2);
}

__device__ __forceinline__ float exp2_approx(float x) { return std::exp2(x); }

template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  static_assert(std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>, "pack2: f16 or bf16");
  uint16_t a, b;
  if constexpr (std::is_same_v<T, __half>) {
    a = __float2half_rn(lo).bits, b = __float2half_rn(hi).bits;
  } else {
    a = __float2bfloat16_rn(lo).bits, b = __float2bfloat16_rn(hi).bits;
  }
  return uint32_t(a) | uint32_t(b) << 16;  // the lower address's element in the low half
}

// 8-byte accesses need 8-byte alignment on a GPU (misaligned: a fault); x86 wouldn't mind.
__device__ __forceinline__ float2 load_l2(const float2* p) {
  if (reinterpret_cast<uintptr_t>(p) % 8) emu::fail("ld.global.cg.v2.f32: misaligned address %p", static_cast<const void*>(p));
  return *p;
}
__device__ __forceinline__ void store_l2(float2* p, float2 v) {
  if (reinterpret_cast<uintptr_t>(p) % 8) emu::fail("st.global.cg.v2.f32: misaligned address %p", static_cast<void*>(p));
  *p = v;
}

// Blocks run one after another here, in grid order: a flag a CTA waits for must already hold
// its value, or on a GPU the wait would depend on a later CTA and could spin forever.
__device__ __forceinline__ int ticket(int* counter) { return (*counter)++; }

__device__ __forceinline__ void wait_flag(const int* flag, int value) {
  if (*flag != value)
    emu::fail("wait_flag: flag %p holds %d, waiting for %d, which only a later CTA could write (a GPU would "
              "spin, maybe forever)", static_cast<const void*>(flag), *flag, value);
}
__device__ __forceinline__ void signal_flag(int* flag, int value) { *flag = value; }

}  // namespace fastlm::cuda
