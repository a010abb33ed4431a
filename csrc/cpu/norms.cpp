// layer_norm / rms_norm on the CPU, with the pre-norm residual add fused in. One row per
// task (OpenMP over rows): the row of h = x + residual is written once and then stays in L1
// for the statistics and the normalized output, so the fused op moves x, residual, h and y
// once each where eager's add-then-norm reads h back from memory. Statistics are fp32 from a
// two-pass (mean, then centered variance) over the L1-hot row. The backward recomputes xhat
// from h, mean, rstd; grad_weight / grad_bias go to per-thread fp32 partial rows reduced in a
// fixed order afterwards (deterministic, like bias_act's grad_bias).
#include <omp.h>

#include <cmath>
#include <type_traits>
#include <vector>

#include "fastlm/norms.h"
#include "vec_math.h"

namespace fastlm::cpu {
namespace {

constexpr int64_t kParallelMinElems = 1 << 15;
constexpr int64_t kStreamMinBytes = int64_t(8) << 20;  // past the caches: streaming stores win

// sum over the row of f(i, n) (tail lanes masked), with four independent accumulators: a
// single chain of dependent adds waits ~4 cycles per vector, longer than the L1 loads feeding it.
template <typename F>
FASTLM_INLINE float row_sum(int64_t cols, F&& f) {
  vf s0 = splat(0.0f), s1 = s0, s2 = s0, s3 = s0;
  int64_t i = 0;
  for (; i + 4 * kLanes <= cols; i += 4 * kLanes) {
    s0 += f(i, int64_t(kLanes));
    s1 += f(i + kLanes, int64_t(kLanes));
    s2 += f(i + 2 * kLanes, int64_t(kLanes));
    s3 += f(i + 3 * kLanes, int64_t(kLanes));
  }
  for (; i < cols; i += kLanes) {
    const int64_t n = cols - i < kLanes ? cols - i : kLanes;
    vf v = f(i, n);
    s0 += n < kLanes ? select(lanes_below(n), v, splat(0.0f)) : v;
  }
  return reduce_add((s0 + s1) + (s2 + s3));
}

// Statistics and output of one row whose h (= x + residual, or x) is in src, L1-hot; S is the
// type src holds (T, or float for the streaming path's scratch row). Streaming also writes h.
template <typename T, typename S>
FASTLM_INLINE void normalize_row(const NormForwardArgs& a, int64_t r, const S* src, bool stream, T* h, T* y) {
  const int64_t cols = a.cols;
  const float inv_cols = 1.0f / float(cols);
  const T* w = static_cast<const T*>(a.weight);
  const T* b = a.rms ? nullptr : static_cast<const T*>(a.bias);
  const float mean = a.rms ? 0.0f : row_sum(cols, [&](int64_t i, int64_t n) { return load_n(src + i, n); }) * inv_cols;
  const float var = row_sum(cols, [&](int64_t i, int64_t n) {
    vf d = load_n(src + i, n) - mean;
    return d * d;
  }) * inv_cols;
  const float rstd = 1.0f / std::sqrt(var + a.eps);
  if (a.mean) a.mean[r] = mean;
  a.rstd[r] = rstd;
  for_each_vector(cols, [&](int64_t i, int64_t n) {
    vf hv = load_n(src + i, n);
    vf v = (hv - mean) * rstd;
    if (w) v = v * load_n(w + i, n);
    if (b) v = v + load_n(b + i, n);
    if constexpr (std::is_same_v<T, float>) {
      if (stream) {
        if (h) stream_store(h + i, hv);
        stream_store(y + i, v);
        return;
      }
    }
    store_n(y + i, v, n);
  });
}

template <typename T>
void forward_rows(const NormForwardArgs& a) {
  const int64_t cols = a.cols;
  const int64_t bytes = a.rows * cols * int64_t(sizeof(T));
  // Large fp32 outputs into mapped, cold pages go out with streaming stores (see vec_math.h).
  // h = x + residual then goes to a per-thread scratch row, not to h, which is streamed out
  // with y: reading h back would fetch the line the streaming store just sent to memory.
  const bool stream = std::is_same_v<T, float> && bytes >= kStreamMinBytes && cols % kLanes == 0 &&
                      stream_aligned(a.y) && (!a.residual || stream_aligned(a.h)) &&
                      pages_resident(a.y, bytes) && (!a.residual || pages_resident(a.h, bytes));
#pragma omp parallel if (a.rows * cols >= kParallelMinElems)
  {
    std::vector<float> scratch(stream && a.residual ? size_t(cols) : 0);
    // Dynamic chunks of rows: rows are independent here, and on a shared machine a descheduled
    // thread no longer holds the others at the barrier (the backward stays static: deterministic).
#pragma omp for schedule(dynamic, 32)
    for (int64_t r = 0; r < a.rows; ++r) {
      const T* x = static_cast<const T*>(a.x) + r * a.x_stride;
      const T* res = a.residual ? static_cast<const T*>(a.residual) + r * a.residual_stride : nullptr;
      T* h = a.residual ? static_cast<T*>(a.h) + r * cols : nullptr;
      T* y = static_cast<T*>(a.y) + r * cols;
      if (!res) {
        normalize_row<T>(a, r, x, stream, nullptr, y);
      } else if (stream) {
        float* s = scratch.data();
        for_each_vector(cols, [&](int64_t i, int64_t n) { store_n(s + i, load_n(x + i, n) + load_n(res + i, n), n); });
        normalize_row<T>(a, r, static_cast<const float*>(s), true, h, y);
      } else {  // h is the output; read it back so in bf16 the norm sees the rounded sum, as eager's does
        for_each_vector(cols, [&](int64_t i, int64_t n) { store_n(h + i, load_n(x + i, n) + load_n(res + i, n), n); });
        normalize_row<T>(a, r, static_cast<const T*>(h), false, nullptr, y);
      }
    }
    if (stream) stream_fence();  // every thread that streamed drains its write-combining buffers
  }
}

template <typename T>
void backward_rows(const NormBackwardArgs& a) {
  const int64_t cols = a.cols;
  const T* w = static_cast<const T*>(a.weight);
  const bool want_w = a.grad_weight != nullptr, want_b = a.grad_bias != nullptr && !a.rms;
  const float inv_cols = 1.0f / float(cols);
  const int threads = a.rows * cols >= kParallelMinElems ? omp_get_max_threads() : 1;
  // Per thread: one fp32 row for grad_weight, one for grad_bias.
  std::vector<float> partial((want_w || want_b) ? size_t(threads) * 2 * size_t(cols) : 0, 0.0f);
#pragma omp parallel num_threads(threads)
  {
    float* pw = want_w ? partial.data() + size_t(omp_get_thread_num()) * 2 * size_t(cols) : nullptr;
    float* pb = want_b ? partial.data() + (size_t(omp_get_thread_num()) * 2 + 1) * size_t(cols) : nullptr;
#pragma omp for schedule(static)
    for (int64_t r = 0; r < a.rows; ++r) {
      const T* gy = static_cast<const T*>(a.grad_y) + r * a.grad_y_stride;
      const T* h = static_cast<const T*>(a.h) + r * a.h_stride;
      const float mean = a.rms ? 0.0f : a.mean[r], rstd = a.rstd[r];
      vf s1 = splat(0.0f), s2 = splat(0.0f);  // sum(xhat * g * w), sum(g * w); padded lanes load 0
      for_each_vector(cols, [&](int64_t i, int64_t n) {
        vf g = load_n(gy + i, n);
        vf xhat = (load_n(h + i, n) - mean) * rstd;
        if (pw) store_n(pw + i, load_n(pw + i, n) + g * xhat, n);
        if (pb) store_n(pb + i, load_n(pb + i, n) + g, n);
        if (w) g = g * load_n(w + i, n);
        s1 += xhat * g;
        s2 += g;
      });
      const float c1 = reduce_add(s1) * inv_cols, c2 = a.rms ? 0.0f : reduce_add(s2) * inv_cols;
      const T* gs = a.grad_sum ? static_cast<const T*>(a.grad_sum) + r * a.grad_sum_stride : nullptr;
      T* gh = static_cast<T*>(a.grad_h) + r * cols;
      for_each_vector(cols, [&](int64_t i, int64_t n) {
        vf g = load_n(gy + i, n);
        if (w) g = g * load_n(w + i, n);
        vf xhat = (load_n(h + i, n) - mean) * rstd;
        vf d = rstd * (g - xhat * c1 - c2);
        if (gs) d = d + load_n(gs + i, n);
        store_n(gh + i, d, n);
      });
    }
  }
  for (int k = 0; k < 2; ++k) {
    T* out = static_cast<T*>(k == 0 ? a.grad_weight : a.grad_bias);
    if (!(k == 0 ? want_w : want_b)) continue;
    for_each_vector(cols, [&](int64_t c, int64_t n) {
      vf sum = splat(0.0f);
      for (int t = 0; t < threads; ++t) sum += load_n(partial.data() + (size_t(t) * 2 + k) * size_t(cols) + c, n);
      store_n(out + c, sum, n);
    });
  }
}

}  // namespace
}  // namespace fastlm::cpu

namespace fastlm {

void norm_forward_cpu(const NormForwardArgs& a) {
  if (a.dtype == DType::kFloat32) cpu::forward_rows<float>(a);
  else cpu::forward_rows<uint16_t>(a);  // bf16 bits; the binding rejects fp16 on the CPU
}

void norm_backward_cpu(const NormBackwardArgs& a) {
  if (a.dtype == DType::kFloat32) cpu::backward_rows<float>(a);
  else cpu::backward_rows<uint16_t>(a);
}

}  // namespace fastlm
