// Row statistics for softmax-style kernels: the running max m and sum s of exp(z - m), fed
// chunk by chunk (online softmax), so a row of any length is read once for its statistics.
// A chunk costs one exp per element plus one rescale of s per chunk. Entries equal to -inf
// (masked) contribute exactly 0; a fully masked row keeps m = -inf, s = 0.
#pragma once
#include <cmath>
#include <limits>

#include "vec_math.h"

namespace fastlm::cpu {

constexpr int64_t kRowChunk = 512;  // floats of z per chunk: 2 KiB, stays in L1
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

FASTLM_INLINE float chunk_max(const float* z, int64_t n) {
  vf m = splat(kNegInf);
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) m = vmax(m, load(z + i));
  if (i < n) m = vmax(m, load_partial(z + i, n - i, kNegInf));
  return reduce_max(m);
}

// sum of exp(z - shift) over n entries; shift is finite (or NaN, which the sum then is).
FASTLM_INLINE float chunk_exp_sum(const float* z, int64_t n, float shift) {
  vf s = splat(0.0f);
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) s += vexp_flush(load(z + i) - shift);
  if (i < n) s += vexp_flush(load_partial(z + i, n - i, kNegInf) - shift);
  return reduce_add(s);
}

template <typename T>
FASTLM_INLINE void fill_row(T* y, int64_t n, float v) {
  const vf f = splat(v);
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) store(y + i, f);
  if (i < n) store_partial(y + i, f, n - i);
}

struct RowStats {
  float m = kNegInf, s = 0.0f;

  FASTLM_INLINE void add(const float* z, int64_t n) {
    const float cm = chunk_max(z, n);
    const float nm = cm > m ? cm : m;              // a NaN entry may not win the max...
    const float shift = nm == kNegInf ? 0.0f : nm;  // (all masked so far: exp(-inf) = 0)
    s = s * std::exp(m - shift) + chunk_exp_sum(z, n, shift);  // ...but makes s NaN here
    m = nm;
  }
  // Every entry masked. A NaN or +inf entry leaves s NaN, which propagates as torch's does.
  bool empty() const { return s == 0.0f; }
  float lse() const { return m + std::log(s); }
};

}  // namespace fastlm::cpu
