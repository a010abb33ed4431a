// Branch-free float math that gcc/clang auto-vectorize inside `#pragma omp simd` loops.
// libm's erff/expf/tanhf are scalar calls that stop vectorization; these are straight-line
// polynomials (Cephes-style exp, Numerical Recipes erfc) accurate to a few 1e-7, which is
// below fp32 rounding of the activations built on them.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#define FASTLM_INLINE inline __attribute__((always_inline))

namespace fastlm::cpu {

FASTLM_INLINE float bits_to_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
FASTLM_INLINE uint32_t float_to_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }

// bf16 <-> fp32. Round-to-nearest-even; NaN stays a quiet NaN.
FASTLM_INLINE float bf16_to_float(uint16_t h) { return bits_to_float(uint32_t(h) << 16); }
FASTLM_INLINE uint16_t float_to_bf16(float f) {
  uint32_t u = float_to_bits(f);
  uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return uint16_t(f != f ? 0x7FC0u : rounded);
}

// exp(x): x = n*ln2 + r with |r| <= ln2/2, 2^n built in the exponent bits.
FASTLM_INLINE float exp_approx(float x) {
  // Clamp keeps 2^n a normal float; NaN passes through both comparisons unchanged.
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  float n = std::floor(x * 1.44269504088896341f + 0.5f);
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t e = int32_t(n) + 127;
  return p * bits_to_float(uint32_t(e) << 23);
}

// erfc(|x|) with relative error < 1.2e-7 (Numerical Recipes, Chebyshev fit).
FASTLM_INLINE float erfc_abs(float x) {
  float z = std::fabs(x);
  float t = 1.0f / (1.0f + 0.5f * z);
  float p = 0.17087277f;
  p = p * t - 0.82215223f;
  p = p * t + 1.48851587f;
  p = p * t - 1.13520398f;
  p = p * t + 0.27886807f;
  p = p * t - 0.18628806f;
  p = p * t + 0.09678418f;
  p = p * t + 0.37409196f;
  p = p * t + 1.00002368f;
  p = p * t - 1.26551223f;
  return t * exp_approx(p - z * z);
}

// Standard normal CDF. The tail side uses erfc directly, so gelu(x) for x << 0 keeps its
// relative precision instead of cancelling 1 + erf.
FASTLM_INLINE float normal_cdf(float x) {
  float tail = 0.5f * erfc_abs(x * 0.70710678118654752f);
  return x < 0.0f ? tail : 1.0f - tail;
}

FASTLM_INLINE float tanh_approx(float x) {
  // 1 - 2/(e^{2x}+1): saturates to +-1 without overflow (exp clamps), abs error ~1e-7.
  return 1.0f - 2.0f / (exp_approx(2.0f * x) + 1.0f);
}

FASTLM_INLINE float sigmoid_approx(float x) { return 1.0f / (1.0f + exp_approx(-x)); }

}  // namespace fastlm::cpu
