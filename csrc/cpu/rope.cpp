// Rotary position embedding on the CPU: q and k of one token are rotated in the same pass.
// Per token (b, t) the R/2 cos/sin values are read from the tables (or computed from the
// position and inv_freq with libm's sincosf, accurate for the large angles of long contexts)
// into a small per-thread buffer once, then applied to all Hq + Hk heads of that token: the
// transcendental work is R/2 per token, not per head, and each element of q and k is read and
// written exactly once. Threads split the tokens; the per-head loops have compile-time unit
// strides in the common dense case so they vectorize. fp32 and bf16 (computed in fp32).
#include <omp.h>

#include <cmath>
#include <cstring>
#include <vector>

#include "fastlm/rope.h"
#include "vec_math.h"

namespace fastlm::cpu {
namespace {

constexpr int64_t kParallelMinElems = 1 << 15;  // below this, threads cost more than they save

FASTLM_INLINE float to_f(float v) { return v; }
FASTLM_INLINE float to_f(uint16_t bf16) { return scalar_to_float(bf16); }

template <typename T> FASTLM_INLINE T from_f(float v);
template <> FASTLM_INLINE float from_f<float>(float v) { return v; }
template <> FASTLM_INLINE uint16_t from_f<uint16_t>(float v) {  // round to nearest even, NaN stays NaN
  uint32_t u;
  std::memcpy(&u, &v, 4);
  if (v != v) return 0x7FC0;
  return uint16_t((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}

float half_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF;
  uint32_t bits;
  if (exp == 0x1F) {
    bits = sign | 0x7F800000u | (man << 13);
  } else if (exp == 0) {
    const float f = std::ldexp(float(man), -24);  // zero or subnormal
    return sign ? -f : f;
  } else {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

float table_value(DType dtype, const void* base, int64_t offset) {
  switch (dtype) {
    case DType::kFloat32: return static_cast<const float*>(base)[offset];
    case DType::kBFloat16: return scalar_to_float(static_cast<const uint16_t*>(base)[offset]);
    case DType::kFloat16: return half_to_float(static_cast<const uint16_t*>(base)[offset]);
  }
  return 0.0f;
}

// c[i], s[i] for the token (b, t), sign and scale applied.
void token_angles(const RopeProblem& p, int64_t b, int64_t t, float* c, float* s) {
  const int64_t half = p.half_rotary;
  const float sign = p.inverse ? -1.0f : 1.0f;
  if (p.positions != nullptr) {
    const float pos = float(p.positions[b * p.positions_s[0] + t * p.positions_s[1]]);
    for (int64_t i = 0; i < half; ++i) {
      float sv, cv;
      sincosf(pos * p.inv_freq[i], &sv, &cv);
      c[i] = p.scale * cv;
      s[i] = sign * (p.scale * sv);
    }
    return;
  }
  const int64_t co = b * p.cos_s[0] + t * p.cos_s[1], so = b * p.sin_s[0] + t * p.sin_s[1];
  for (int64_t i = 0; i < half; ++i) {
    c[i] = p.scale * table_value(p.table_dtype, p.cos, co + i * p.cos_s[2]);
    s[i] = sign * (p.scale * table_value(p.table_dtype, p.sin, so + i * p.sin_s[2]));
  }
}

// One head of one token. kUnit: both last-dim strides are 1 (then xs, ys are ignored).
template <typename T, bool kUnit, bool kInterleaved>
FASTLM_INLINE void rotate_head(const T* __restrict x, int64_t xs, T* __restrict y, int64_t ys,
                               const float* __restrict c, const float* __restrict s, int64_t half,
                               int64_t dim) {
  if constexpr (kUnit) xs = ys = 1;
  const int64_t x2 = kInterleaved ? xs : half * xs, y2 = kInterleaved ? ys : half * ys;
  const int64_t step_x = kInterleaved ? 2 * xs : xs, step_y = kInterleaved ? 2 * ys : ys;
  for (int64_t i = 0; i < half; ++i) {
    const float a = to_f(x[i * step_x]), b = to_f(x[i * step_x + x2]);
    y[i * step_y] = from_f<T>(a * c[i] - b * s[i]);
    y[i * step_y + y2] = from_f<T>(b * c[i] + a * s[i]);
  }
  for (int64_t j = 2 * half; j < dim; ++j) y[j * ys] = x[j * xs];  // partial rotary: pass through
}

template <typename T, bool kUnit, bool kInterleaved>
void run(const RopeProblem& p) {
  const int64_t half = p.half_rotary, tokens = p.batch * p.seq;
  const int64_t work = tokens * (p.q_heads + p.k_heads) * p.head_dim;
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  T* qo = static_cast<T*>(p.q_out);
  T* ko = static_cast<T*>(p.k_out);
#pragma omp parallel if (work >= kParallelMinElems)
  {
    std::vector<float> buf(size_t(2 * half) + 1);
    float* c = buf.data();
    float* s = c + half;
#pragma omp for schedule(static)
    for (int64_t tok = 0; tok < tokens; ++tok) {
      const int64_t b = tok / p.seq, t = tok % p.seq;
      token_angles(p, b, t, c, s);
      for (int64_t h = 0; h < p.q_heads; ++h) {
        rotate_head<T, kUnit, kInterleaved>(q + b * p.q_s[0] + h * p.q_s[1] + t * p.q_s[2], p.q_s[3],
                                            qo + b * p.q_out_s[0] + h * p.q_out_s[1] + t * p.q_out_s[2],
                                            p.q_out_s[3], c, s, half, p.head_dim);
      }
      for (int64_t h = 0; h < p.k_heads; ++h) {
        rotate_head<T, kUnit, kInterleaved>(k + b * p.k_s[0] + h * p.k_s[1] + t * p.k_s[2], p.k_s[3],
                                            ko + b * p.k_out_s[0] + h * p.k_out_s[1] + t * p.k_out_s[2],
                                            p.k_out_s[3], c, s, half, p.head_dim);
      }
    }
  }
}

template <typename T>
void run_typed(const RopeProblem& p) {
  const bool unit = p.q_s[3] == 1 && p.k_s[3] == 1 && p.q_out_s[3] == 1 && p.k_out_s[3] == 1;
  if (unit) p.interleaved ? run<T, true, true>(p) : run<T, true, false>(p);
  else p.interleaved ? run<T, false, true>(p) : run<T, false, false>(p);
}

}  // namespace
}  // namespace fastlm::cpu

namespace fastlm {

void rope_cpu(const RopeProblem& p) {
  if (p.batch == 0 || p.seq == 0 || p.head_dim == 0) return;
  if (p.dtype == DType::kFloat32) cpu::run_typed<float>(p);
  else cpu::run_typed<uint16_t>(p);  // bf16 bits; the binding rejects fp16 q/k on the CPU
}

}  // namespace fastlm
