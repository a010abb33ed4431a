// cross_entropy on the CPU, fused: the forward reads each row of logits once (online max/sum
// over L1-sized chunks, plus the label-smoothing sum in the same chunk loop) and keeps only the
// per-row lse; the backward recomputes p = exp(x - lse) and writes the gradient in one pass.
// Eager torch instead writes log_softmax (N x C), reads it for nll, and in backward writes and
// reads N x C temporaries again. Rows are spread over OpenMP threads.
#include <omp.h>

#include <algorithm>
#include <atomic>

#include "fastlm/cross_entropy.h"
#include "online_softmax.h"

namespace fastlm::cpu {
namespace {

constexpr int64_t kParallelMinElems = 1 << 14;

template <typename T>
FASTLM_INLINE void to_floats(const T* x, int64_t n, float* buf) {
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) store(buf + i, load(x + i));
  if (i < n) store_partial(buf + i, load_partial(x + i, n - i), n - i);
}

// sum_c w[c] * z[c] (w null: sum_c z[c])
FASTLM_INLINE float weighted_sum(const float* z, const float* w, int64_t n) {
  vf acc = splat(0.0f);
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) acc += w ? load(z + i) * load(w + i) : load(z + i);
  if (i < n) acc += w ? load_partial(z + i, n - i) * load_partial(w + i, n - i) : load_partial(z + i, n - i);
  return reduce_add(acc);
}

template <typename T>
int64_t forward(int64_t rows, int64_t cols, const T* x, int64_t xs, const int64_t* target, const float* w,
                int64_t ignore_index, float eps, float* loss, float* lse) {
  const float weight_sum = w ? weighted_sum(w, nullptr, cols) : float(cols);
  std::atomic<int64_t> bad{rows};
#pragma omp parallel for schedule(static) if (rows * cols >= kParallelMinElems)
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t t = target[r];
    if (t == ignore_index) {
      loss[r] = 0.0f;
      lse[r] = 0.0f;
      continue;
    }
    if (t < 0 || t >= cols) {
      int64_t cur = bad.load();
      while (r < cur && !bad.compare_exchange_weak(cur, r)) {}
      continue;
    }
    const T* xr = x + r * xs;
    alignas(64) float buf[kRowChunk];
    RowStats st;
    float smooth = 0.0f;
    for (int64_t c0 = 0; c0 < cols; c0 += kRowChunk) {
      const int64_t n = std::min(kRowChunk, cols - c0);
      to_floats(xr + c0, n, buf);
      st.add(buf, n);
      if (eps > 0.0f) smooth += weighted_sum(buf, w ? w + c0 : nullptr, n);
    }
    const float l = st.lse();
    const float wt = w ? w[t] : 1.0f;
    lse[r] = l;
    loss[r] = (1.0f - eps) * wt * (l - scalar_to_float(xr[t])) + (eps > 0.0f ? eps / float(cols) * (weight_sum * l - smooth) : 0.0f);
  }
  const int64_t b = bad.load();
  return b < rows ? b : -1;
}

template <typename T>
void backward(int64_t rows, int64_t cols, const T* x, int64_t xs, const int64_t* target, const float* w,
              int64_t ignore_index, float eps, const float* lse, const float* gscale,
              T* grad, int64_t gs) {
  const float weight_sum = w ? weighted_sum(w, nullptr, cols) : float(cols);
#pragma omp parallel for schedule(static) if (rows * cols >= kParallelMinElems)
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t t = target[r];
    T* gr = grad + r * gs;
    if (t == ignore_index || t < 0 || t >= cols) {  // ignored row: zero gradient
      fill_row(gr, cols, 0.0f);
      continue;
    }
    const float g = gscale[r], wt = w ? w[t] : 1.0f;
    // grad = a (p - [c == t]) + b (W p - w[c]); each bracket is exactly 0 where p == 1 and C == 1
    const float a = g * (1.0f - eps) * wt, b = g * eps / float(cols);
    const vf av = splat(a), bv = splat(b), wsv = splat(weight_sum), shift = splat(lse[r]);
    const T* xr = x + r * xs;
    int64_t i = 0;
    for (; i + kLanes <= cols; i += kLanes) {
      const vf p = vexp_flush(load(xr + i) - shift);
      store(gr + i, av * p + bv * (wsv * p - (w ? load(w + i) : splat(1.0f))));
    }
    if (i < cols) {
      const int64_t n = cols - i;
      const vf p = vexp_flush(load_partial(xr + i, n) - shift);
      store_partial(gr + i, av * p + bv * (wsv * p - (w ? load_partial(w + i, n) : splat(1.0f))), n);
    }
    // the target entry, recomputed in full so a bf16 gradient is rounded once
    const float pt = std::exp(scalar_to_float(xr[t]) - lse[r]);
    const float gt = a * (pt - 1.0f) + b * (weight_sum * pt - (w ? w[t] : 1.0f));
    store_partial(gr + t, splat(gt), 1);
  }
}

}  // namespace
}  // namespace fastlm::cpu

namespace fastlm {

int64_t cross_entropy_forward_cpu(DType dtype, int64_t rows, int64_t cols, const void* logits,
                                  int64_t logits_row_stride, const int64_t* target, const float* weight,
                                  int64_t ignore_index, float label_smoothing, float* loss, float* lse) {
  if (rows == 0) return -1;
  if (dtype == DType::kFloat32)
    return cpu::forward(rows, cols, static_cast<const float*>(logits), logits_row_stride, target, weight,
                        ignore_index, label_smoothing, loss, lse);
  return cpu::forward(rows, cols, static_cast<const uint16_t*>(logits), logits_row_stride, target, weight,
                      ignore_index, label_smoothing, loss, lse);
}

void cross_entropy_backward_cpu(DType dtype, int64_t rows, int64_t cols, const void* logits,
                                int64_t logits_row_stride, const int64_t* target, const float* weight,
                                int64_t ignore_index, float label_smoothing,
                                const float* lse, const float* gscale, void* grad, int64_t grad_row_stride) {
  if (rows == 0 || cols == 0) return;
  if (dtype == DType::kFloat32)
    cpu::backward(rows, cols, static_cast<const float*>(logits), logits_row_stride, target, weight,
                  ignore_index, label_smoothing, lse, gscale, static_cast<float*>(grad), grad_row_stride);
  else
    cpu::backward(rows, cols, static_cast<const uint16_t*>(logits), logits_row_stride, target, weight,
                  ignore_index, label_smoothing, lse, gscale, static_cast<uint16_t*>(grad), grad_row_stride);
}

}  // namespace fastlm
