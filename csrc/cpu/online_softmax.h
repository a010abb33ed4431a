// Row statistics for softmax-style kernels: the running max m and sum s of exp(z - m), fed
// chunk by chunk (online softmax), so a row of any length is read once for its statistics.
// A chunk costs one exp per element plus one rescale of s per chunk. Entries equal to -inf
// (masked) contribute exactly 0; a row with no finite entry keeps m = -inf, s = 0.
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

// sum of exp(z - shift) over n entries; shift is finite.
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
    if (!(cm > kNegInf)) return;  // all masked (or NaN max: handled by the NaN check below)
    const float nm = cm > m ? cm : m;
    s = s * std::exp(m - nm) + chunk_exp_sum(z, n, nm);
    m = nm;
  }
  bool empty() const { return !(s > 0.0f); }
  float lse() const { return m + std::log(s); }
};

}  // namespace fastlm::cpu
