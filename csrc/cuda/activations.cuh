// Activation values and derivatives in fp32 for the CUDA kernels (the CPU twins are in
// csrc/cpu/activations.h), plus the 16-bit load/store conversions they need.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "fastlm/common.h"

namespace fastlm::cuda {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

constexpr float kInvSqrt2 = 0.70710678118654752f;
constexpr float kInvSqrt2Pi = 0.39894228040143268f;
constexpr float kSqrt2OverPi = 0.79788456080286536f;
constexpr float kGeluTanhCoeff = 0.044715f;

template <Activation A>
__device__ __forceinline__ float act_forward(float z) {
  if constexpr (A == Activation::kGelu) {
    return 0.5f * z * erfcf(-z * kInvSqrt2);  // erfc keeps precision in the negative tail
  } else if constexpr (A == Activation::kGeluTanh) {
    return 0.5f * z * (1.0f + tanhf(kSqrt2OverPi * (z + kGeluTanhCoeff * z * z * z)));
  } else if constexpr (A == Activation::kRelu) {
    return z < 0.0f ? 0.0f : z;  // keeps NaN, as torch.relu does
  } else {
    return __fdividef(z, 1.0f + __expf(-z));  // IEEE division would spill for little gain
  }
}

template <Activation A>
__device__ __forceinline__ float act_derivative(float z) {
  if constexpr (A == Activation::kGelu) {
    return 0.5f * erfcf(-z * kInvSqrt2) + z * kInvSqrt2Pi * __expf(-0.5f * z * z);
  } else if constexpr (A == Activation::kGeluTanh) {
    float z2 = z * z;
    float t = tanhf(kSqrt2OverPi * (z + kGeluTanhCoeff * z2 * z));
    float du = kSqrt2OverPi * (1.0f + 3.0f * kGeluTanhCoeff * z2);
    return 0.5f * (1.0f + t) + 0.5f * z * (1.0f - t * t) * du;
  } else if constexpr (A == Activation::kRelu) {
    return z <= 0.0f ? 0.0f : 1.0f;  // torch's threshold_backward: 0 at z <= 0, NaN passes
  } else {
    float s = __fdividef(1.0f, 1.0f + __expf(-z));
    return s * (1.0f + z * (1.0f - s));
  }
}

}  // namespace fastlm::cuda
