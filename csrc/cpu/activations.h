// Activation values and derivatives in fp32 for the CPU kernels, built on vec_math.h so the
// loops that call them stay vectorized. The GPU twins live in csrc/cuda/activations.cuh.
#pragma once
#include "fastlm/common.h"
#include "vec_math.h"

namespace fastlm::cpu {

constexpr float kInvSqrt2Pi = 0.39894228040143268f;  // 1/sqrt(2*pi)
constexpr float kSqrt2OverPi = 0.79788456080286536f;
constexpr float kGeluTanhCoeff = 0.044715f;

template <Activation A>
FASTLM_INLINE float act_forward(float z) {
  if constexpr (A == Activation::kGelu) {
    return z * normal_cdf(z);
  } else if constexpr (A == Activation::kGeluTanh) {
    float u = kSqrt2OverPi * (z + kGeluTanhCoeff * z * z * z);
    return 0.5f * z * (1.0f + tanh_approx(u));
  } else if constexpr (A == Activation::kRelu) {
    return z < 0.0f ? 0.0f : z;  // keeps NaN, as torch.relu does
  } else {
    return z * sigmoid_approx(z);
  }
}

// d act(z) / dz
template <Activation A>
FASTLM_INLINE float act_derivative(float z) {
  if constexpr (A == Activation::kGelu) {
    return normal_cdf(z) + z * kInvSqrt2Pi * exp_approx(-0.5f * z * z);
  } else if constexpr (A == Activation::kGeluTanh) {
    float z2 = z * z;
    float u = kSqrt2OverPi * (z + kGeluTanhCoeff * z2 * z);
    float t = tanh_approx(u);
    float du = kSqrt2OverPi * (1.0f + 3.0f * kGeluTanhCoeff * z2);
    return 0.5f * (1.0f + t) + 0.5f * z * (1.0f - t * t) * du;
  } else if constexpr (A == Activation::kRelu) {
    return z <= 0.0f ? 0.0f : 1.0f;  // torch threshold_backward: 0 at z <= 0, NaN passes
  } else {
    float s = sigmoid_approx(z);
    return s * (1.0f + z * (1.0f - s));
  }
}

}  // namespace fastlm::cpu
