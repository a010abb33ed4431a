// Explicit SIMD float math for the CPU kernels, written with GCC/Clang vector extensions:
// one `vf` holds 16 floats (a single AVX-512 register; the compiler splits it on AVX2/NEON).
// libm's erff/expf/tanhf are scalar calls that stop vectorization, and auto-vectorizing
// our own versions proved fragile, so the math is spelled out on vectors: a Cephes-style exp
// and the Abramowitz-Stegun erfc, both accurate to a few 1e-7, about fp32's own rounding.
#pragma once
#include <cstdint>
#include <cstring>

#include <sys/mman.h>
#include <unistd.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

#define FASTLM_INLINE inline __attribute__((always_inline))

namespace fastlm::cpu {

constexpr int kLanes = 16;
typedef float vf __attribute__((vector_size(4 * kLanes)));
typedef int32_t vi __attribute__((vector_size(4 * kLanes)));
typedef uint16_t vh __attribute__((vector_size(2 * kLanes)));

FASTLM_INLINE vf splat(float v) { return vf{} + v; }
FASTLM_INLINE vf as_vf(vi v) { vf r; std::memcpy(&r, &v, sizeof r); return r; }
FASTLM_INLINE vi as_vi(vf v) { vi r; std::memcpy(&r, &v, sizeof r); return r; }
FASTLM_INLINE vf select(vi mask, vf a, vf b) { return mask ? a : b; }
FASTLM_INLINE vf vabs(vf x) { return as_vf(as_vi(x) & 0x7FFFFFFF); }

// Loads/stores of kLanes elements from fp32 or bf16 (raw uint16 bits) memory, unaligned.
FASTLM_INLINE vf load(const float* p) { vf v; std::memcpy(&v, p, sizeof v); return v; }
FASTLM_INLINE vf load(const uint16_t* p) {
  vh h;
  std::memcpy(&h, p, sizeof h);
  return as_vf(__builtin_convertvector(h, vi) << 16);
}
FASTLM_INLINE void store(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
FASTLM_INLINE void store(uint16_t* p, vf v) {
  // round to nearest even; NaN becomes the canonical quiet NaN
  vi u = as_vi(v);
  vi rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16;
  rounded = (v != v) ? vi{} + 0x7FC0 : rounded;
  vh h = __builtin_convertvector(rounded & 0xFFFF, vh);
  std::memcpy(p, &h, sizeof h);
}

// Tails: the first n (< kLanes) elements, the other lanes set to `fill`; and the inverse.
FASTLM_INLINE float scalar_to_float(float v) { return v; }
FASTLM_INLINE float scalar_to_float(uint16_t h) {
  uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
template <typename T>
FASTLM_INLINE vf load_partial(const T* p, int64_t n, float fill = 0.0f) {
  vf v = splat(fill);
  for (int64_t i = 0; i < n; ++i) v[i] = scalar_to_float(p[i]);
  return v;
}
template <typename T>
FASTLM_INLINE void store_partial(T* p, vf v, int64_t n) {
  T tmp[kLanes];
  store(tmp, v);
  std::memcpy(p, tmp, size_t(n) * sizeof(T));
}

// Lanes [0, n) true (-1), the rest false: masks the padded lanes of a tail vector.
FASTLM_INLINE vi lanes_below(int64_t n) {
  const vi iota = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  return iota < vi{} + int32_t(n);
}

// Calls f(i, n) over [0, count) in kLanes steps, the last with n < kLanes; inlined with a
// constant n for the full steps so their partial-load branches fold away.
template <typename F>
FASTLM_INLINE void for_each_vector(int64_t count, F&& f) {
  int64_t i = 0;
  for (; i + kLanes <= count; i += kLanes) f(i, int64_t(kLanes));
  if (i < count) f(i, count - i);
}
template <typename T>
FASTLM_INLINE vf load_n(const T* p, int64_t n) { return n == kLanes ? load(p) : load_partial(p, n); }
template <typename T>
FASTLM_INLINE void store_n(T* p, vf v, int64_t n) {
  if (n == kLanes) store(p, v);
  else store_partial(p, v, n);
}

// Streaming (non-temporal) stores for large outputs nobody reads back soon: they skip the
// read-for-ownership a normal store pays, so a write costs one memory transfer, not two.
// p must be 64-byte aligned; call stream_fence() before the data is handed to anyone else.
FASTLM_INLINE bool stream_aligned(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 63) == 0; }

// Whether the pages under [p, p + bytes) are already mapped in, judged by the first and last
// page (mincore: one cheap syscall each). A fresh mmap (glibc serves big allocations so, unless
// it reuses freed heap) faults every page in on first touch and the kernel zeroes it through
// the cache; a streaming store then has to evict those zeroed lines, which measured ~25% slower
// than plain stores into them. Streaming only pays off on pages that are mapped and cold.
inline bool pages_resident(const void* p, int64_t bytes) {
  static const uintptr_t page = uintptr_t(sysconf(_SC_PAGESIZE));
  auto resident = [](uintptr_t addr) {
    unsigned char vec = 0;
    return mincore(reinterpret_cast<void*>(addr & ~(page - 1)), 1, &vec) == 0 && (vec & 1);
  };
  const uintptr_t first = reinterpret_cast<uintptr_t>(p);
  return bytes <= 0 || (resident(first) && resident(first + uintptr_t(bytes) - 1));
}
FASTLM_INLINE void stream_store(float* p, vf v) {
#ifdef __AVX512F__
  _mm512_stream_ps(p, v);
#else
  store(p, v);
#endif
}
FASTLM_INLINE void stream_fence() {
#ifdef __AVX512F__
  _mm_sfence();
#endif
}

FASTLM_INLINE vf vmax(vf a, vf b) { return select(a > b, a, b); }
FASTLM_INLINE vf vmin(vf a, vf b) { return select(a < b, a, b); }
FASTLM_INLINE float reduce_add(vf v) {
  float s = 0.0f;
  for (int i = 0; i < kLanes; ++i) s += v[i];
  return s;
}
FASTLM_INLINE float reduce_max(vf v) {
  float m = v[0];
  for (int i = 1; i < kLanes; ++i) m = v[i] > m ? v[i] : m;
  return m;
}

// exp(x) = 2^n * e^r with |r| <= ln2/2. Inputs are clamped so 2^n stays a normal float
// (e^-87 ~ 1.6e-38, e^88 ~ 1.7e38); NaN compares false both times and passes through.
FASTLM_INLINE vf vexp(vf x) {
  x = select(x < -87.0f, splat(-87.0f), x);
  x = select(x > 88.0f, splat(88.0f), x);
  const vf shifter = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  vf n = (x * 1.44269504088896341f + shifter) - shifter;
  vf r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  vf p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  vi e = (__builtin_convertvector(n, vi) + 127) << 23;
  return p * as_vf(e);
}

// exp(x) with everything below -87 (including -inf, i.e. masked entries) flushed to exactly 0.
FASTLM_INLINE vf vexp_flush(vf x) { return select(x < -87.0f, splat(0.0f), vexp(x)); }

// 1/d. With AVX-512: the 14-bit estimate plus one Newton step (~1 ulp), several times the
// throughput of a divide. Callers keep d finite (an infinite d would give NaN here).
FASTLM_INLINE vf vrcp(vf d) {
#ifdef __AVX512F__
  vf r = _mm512_rcp14_ps(d);
  return r * (2.0f - d * r);
#else
  return 1.0f / d;
#endif
}

// Standard normal CDF and density from one exp(-x^2/2): erfc by Abramowitz-Stegun 7.1.26
// (absolute error < 1.5e-7, about fp32's rounding of 1 + erf) times the same exponential
// the density needs, so gelu's derivative costs one exp and one reciprocal.
FASTLM_INLINE void vnormal_cdf_pdf(vf x, vf* cdf, vf* pdf) {
  vf a = vabs(x) * 0.70710678118654752f;
  // Past a = 9 (|x| > 12.7) the tail is below 1e-36 and every later product would go subnormal,
  // which costs ~100x on x86 (microcode assists); clamping keeps them normal and changes no
  // result by more than 1e-35 absolute. It also keeps vrcp's input finite.
  a = select(a > 9.0f, splat(9.0f), a);
  vf t = vrcp(1.0f + 0.3275911f * a);
  vf p = splat(1.061405429f);
  p = p * t - 1.453152027f;
  p = p * t + 1.421413741f;
  p = p * t - 0.284496736f;
  p = p * t + 0.254829592f;
  vf e = vexp(-a * a);
  vf tail = 0.5f * (p * t) * e;  // Phi(-|x|)
  *cdf = select(x < 0.0f, tail, 1.0f - tail);
  *pdf = e * 0.39894228040143268f;
}

// 1 - 2/(e^{2x}+1); abs error ~1e-7. |x| is clamped to 10, where tanh is +-1 in fp32: past it
// 1/(e^{2x}+1) would leave the normal range, and subnormal math costs ~100x on x86.
FASTLM_INLINE vf vtanh(vf x) {
  x = select(x < -10.0f, splat(-10.0f), x);  // compares are false for NaN: it passes through
  x = select(x > 10.0f, splat(10.0f), x);
  return 1.0f - 2.0f * vrcp(vexp(2.0f * x) + 1.0f);
}

// x >= -80 keeps 1/(1 + e^{-x}) normal (sigmoid(-80) ~ 1.8e-35); below, the true value is
// smaller still, so the result changes by < 2e-35 absolute and no subnormals are produced.
FASTLM_INLINE vf vsigmoid(vf x) { return vrcp(1.0f + vexp(-select(x < -80.0f, splat(-80.0f), x))); }

}  // namespace fastlm::cpu
