// __half and __nv_bfloat16 for the emulator: 16-bit storage types with the same bit layout and
// round-to-nearest-even conversions as cuda_fp16.h / cuda_bf16.h (NaN stays NaN, overflow
// rounds to inf, subnormals kept).
#pragma once
#include <cstdint>
#include <cstring>

struct __half {
  uint16_t bits;
};
struct __nv_bfloat16 {
  uint16_t bits;
};

namespace fastlm::emu {
inline uint32_t f32_bits(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  return x;
}
inline float f32_from_bits(uint32_t x) {
  float f;
  std::memcpy(&f, &x, 4);
  return f;
}
}  // namespace fastlm::emu

inline float __half2float(__half h) {
  const uint32_t sign = uint32_t(h.bits & 0x8000) << 16, exp = (h.bits >> 10) & 0x1f, man = h.bits & 0x3ff;
  uint32_t out;
  if (exp == 0x1f) {
    out = sign | 0x7f800000u | (man << 13);  // inf / NaN (payload kept)
  } else if (exp != 0) {
    out = sign | ((exp + 112) << 23) | (man << 13);
  } else if (man == 0) {
    out = sign;
  } else {  // subnormal: renormalize
    int e = -1;
    uint32_t m = man;
    do { m <<= 1; ++e; } while (!(m & 0x400));
    out = sign | uint32_t(112 - e) << 23 | ((m & 0x3ff) << 13);
  }
  return fastlm::emu::f32_from_bits(out);
}

inline __half __float2half_rn(float f) {
  const uint32_t x = fastlm::emu::f32_bits(f);
  const uint16_t sign = uint16_t((x >> 16) & 0x8000);
  const uint32_t ax = x & 0x7fffffffu;
  if (ax > 0x7f800000u) return __half{uint16_t(sign | 0x7e00)};  // NaN
  if (ax >= 0x477ff000u) return __half{uint16_t(sign | 0x7c00)};  // rounds to >= 65520: inf
  if (ax < 0x38800000u) {  // below the smallest normal half (2^-14): subnormal or zero
    if (ax < 0x33000000u) return __half{sign};  // < 2^-25 rounds to 0 (2^-25 itself ties to 0)
    const uint32_t exp = ax >> 23, man = (ax & 0x7fffff) | 0x800000;
    const int shift = 126 - int(exp);  // man * 2^(exp-150) / 2^-24 = man >> (126 - exp)
    uint32_t q = man >> shift;
    const uint32_t rem = man & ((1u << shift) - 1), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (q & 1))) ++q;
    return __half{uint16_t(sign | q)};
  }
  uint32_t q = ((ax >> 23) - 112) << 10 | ((ax >> 13) & 0x3ff);
  const uint32_t rem = ax & 0x1fff;
  if (rem > 0x1000 || (rem == 0x1000 && (q & 1))) ++q;  // may carry into the exponent: correct
  return __half{uint16_t(sign | q)};
}

inline float __bfloat162float(__nv_bfloat16 h) {
  return fastlm::emu::f32_from_bits(uint32_t(h.bits) << 16);
}

inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t x = fastlm::emu::f32_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{uint16_t((x >> 16) | 0x40)};  // quiet NaN
  x += 0x7fffu + ((x >> 16) & 1);
  return __nv_bfloat16{uint16_t(x >> 16)};
}

inline __half __float2half(float f) { return __float2half_rn(f); }
inline __nv_bfloat16 __float2bfloat16(float f) { return __float2bfloat16_rn(f); }
