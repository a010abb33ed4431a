// Triton's tl.rand on the CPU, bit for bit, kLanes offsets at a time: the attention dropout
// keep-mask of the cpu backend is the one the Triton kernels draw (fastlm/triton/attention.py,
// _drop_scale: keep = tl.rand(seed + bh, (i * Tk + j).to(uint32)) >= p), so the same seed gives
// the same mask on both backends.
//
// What tl.rand(seed, offset) computes for a uint32 offset (triton/language/random.py):
//  - the seed is an integer scalar made uint64 (an int32 sign-extends) and split into the Philox
//    key (k0, k1) = (low 32 bits, high 32 bits);
//  - the counter is (offset, 0, 0, 0) (a 32-bit offset has no high word);
//  - 10 rounds of Philox-4x32: c0' = umulhi(B, c2) ^ c1 ^ k0, c2' = umulhi(A, c0) ^ c3 ^ k1,
//    c1' = B * c2, c3' = A * c0 (A = 0xD2511F53, B = 0xCD9E8D57), then the key is bumped by
//    (0x9E3779B9, 0xBB67AE85); the result is c0;
//  - the uint32 becomes a float in [0, 1): bitcast to int32 x, x = ~x where negative, then
//    float(x) * 4.6566127342e-10f (fp32 conversion and product).
// The dropout seed argument of the Triton kernels is an int32 (the op passes seed & 0x7FFFFFFF), and
// seed + bh is an int32 sum that wraps; philox_key reproduces that (and the int64 case Triton
// takes for a seed outside the int32 range).
#pragma once
#include <cstdint>

#include "vec_math.h"

namespace fastlm::cpu {

typedef uint32_t vu __attribute__((vector_size(4 * kLanes)));
typedef uint64_t vu64 __attribute__((vector_size(8 * kLanes)));

struct PhiloxKey {
  uint32_t k0, k1;
};

// The key of tl.rand(seed + bh, ...): seed + bh is evaluated in the type Triton gives the seed
// argument, int32 when it fits (wrapping), else int64, then sign-extended to uint64 and split.
FASTLM_INLINE PhiloxKey philox_key(int64_t seed, int64_t bh) {
  uint64_t s;
  if (seed >= INT32_MIN && seed <= INT32_MAX) {
    s = uint64_t(int64_t(int32_t(uint32_t(seed) + uint32_t(bh))));
  } else {
    s = uint64_t(seed) + uint64_t(bh);
  }
  return {uint32_t(s), uint32_t(s >> 32)};
}

// The full 64-bit products a * b per lane: one widening multiply gives Philox both umulhi (the
// high words) and the wrapped product (the low words).
FASTLM_INLINE vu64 mul_wide(uint32_t a, vu b) { return __builtin_convertvector(b, vu64) * uint64_t(a); }
FASTLM_INLINE vu hi_words(vu64 x) { return __builtin_convertvector(x >> 32, vu); }
FASTLM_INLINE vu lo_words(vu64 x) { return __builtin_convertvector(x, vu); }

// Philox-4x32-10 on counters (c0, 0, 0, 0): the first output word, tl.randint.
FASTLM_INLINE vu philox_randint(vu c0, PhiloxKey key) {
  constexpr uint32_t kKeyA = 0x9E3779B9u, kKeyB = 0xBB67AE85u;
  constexpr uint32_t kRoundA = 0xD2511F53u, kRoundB = 0xCD9E8D57u;
  vu c1 = vu{}, c2 = vu{}, c3 = vu{};
  uint32_t k0 = key.k0, k1 = key.k1;
#pragma GCC unroll 10
  for (int r = 0; r < 10; ++r) {
    const vu64 pb = mul_wide(kRoundB, c2), pa = mul_wide(kRoundA, c0);
    c0 = hi_words(pb) ^ c1 ^ k0;  // umulhi(B, c2) ^ c1 ^ k0
    c2 = hi_words(pa) ^ c3 ^ k1;  // umulhi(A, c0) ^ c3 ^ k1
    c1 = lo_words(pb);            // B * c2
    c3 = lo_words(pa);            // A * c0
    k0 += kKeyA;
    k1 += kKeyB;
  }
  return c0;
}

// tl.rand: uniform floats in [0, 1) from the Philox words, Triton's uint_to_uniform_float.
FASTLM_INLINE vf philox_rand(vu offsets, PhiloxKey key) {
  vi x = (vi)philox_randint(offsets, key);
  x = x < 0 ? ~x : x;
  return __builtin_convertvector(x, vf) * 4.6566127342e-10f;
}

}  // namespace fastlm::cpu
