// Activation values and derivatives on 16-float vectors for the CPU kernels (vec_math.h).
// The GPU twins live in csrc/cuda/activations.cuh.
#pragma once
#include "fastlm/common.h"
#include "vec_math.h"

namespace fastlm::cpu {

constexpr float kSqrt2OverPi = 0.79788456080286536f;
constexpr float kGeluTanhCoeff = 0.044715f;

template <Activation A>
FASTLM_INLINE vf act_forward(vf z) {
  if constexpr (A == Activation::kGelu) {
    vf cdf, pdf;
    vnormal_cdf_pdf(z, &cdf, &pdf);
    return z * cdf;
  } else if constexpr (A == Activation::kGeluTanh) {
    vf u = kSqrt2OverPi * (z + kGeluTanhCoeff * z * z * z);
    return 0.5f * z * (1.0f + vtanh(u));
  } else if constexpr (A == Activation::kRelu) {
    return select(z < 0.0f, splat(0.0f), z);  // keeps NaN, as torch.relu does
  } else {
    return z * vsigmoid(z);
  }
}

// d act(z) / dz
template <Activation A>
FASTLM_INLINE vf act_derivative(vf z) {
  if constexpr (A == Activation::kGelu) {
    vf cdf, pdf;
    vnormal_cdf_pdf(z, &cdf, &pdf);
    return cdf + z * pdf;
  } else if constexpr (A == Activation::kGeluTanh) {
    vf z2 = z * z;
    vf t = vtanh(kSqrt2OverPi * (z + kGeluTanhCoeff * z2 * z));
    vf du = kSqrt2OverPi * (1.0f + 3.0f * kGeluTanhCoeff * z2);
    return 0.5f * (1.0f + t) + 0.5f * z * (1.0f - t * t) * du;
  } else if constexpr (A == Activation::kRelu) {
    return select(z <= 0.0f, splat(0.0f), splat(1.0f));  // torch: 0 at z <= 0, NaN passes grad
  } else {
    vf s = vsigmoid(z);
    return s * (1.0f + z * (1.0f - s));
  }
}

}  // namespace fastlm::cpu
