// softmax / log_softmax on the CPU: y = softmax(scale * x + mask) with causal masking, fused.
// Why it beats eager (mul, masked_fill, softmax): x and the mask are read once for the
// statistics (online max/sum over L1-sized chunks, one exp per element) and once more to
// write y; no scaled or masked copy of x is ever made. Rows are spread over OpenMP threads.
// Backward: grad_x = scale * y * (g - sum(y g)) (softmax) or scale * (g - exp(y) sum(g))
// (log_softmax, masked entries 0), two passes over (y, g) per row.
#include <omp.h>

#include <algorithm>
#include <cstring>

#include "fastlm/softmax.h"
#include "online_softmax.h"

namespace fastlm::cpu {
namespace {

constexpr int64_t kParallelMinElems = 1 << 14;
enum MaskKind { kNone = 0, kBool = 1, kAdd = 2 };

// z = scale * x (+ mask) for n <= kRowChunk entries starting at column c0, into buf.
template <typename T, int MK>
FASTLM_INLINE void load_z(const T* x, const void* mask, int64_t c0, int64_t n, float scale, float* buf) {
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    vf z = load(x + c0 + i) * scale;
    if constexpr (MK == kAdd) z += load(static_cast<const T*>(mask) + c0 + i);
    store(buf + i, z);
  }
  if (i < n) store_partial(buf + i, load_partial(x + c0 + i, n - i) * scale, n - i);
  if constexpr (MK == kAdd) {
    const T* m = static_cast<const T*>(mask) + c0;
    for (int64_t j = i; j < n; ++j) buf[j] += scalar_to_float(m[j]);
  }
  if constexpr (MK == kBool) {
    const uint8_t* m = static_cast<const uint8_t*>(mask) + c0;
    for (int64_t j = 0; j < n; ++j) buf[j] = m[j] ? buf[j] : kNegInf;
  }
}

template <typename T, int MK, bool LOG>
void forward_row(const T* x, const void* mask, int64_t cols, int64_t valid, float scale, T* y) {
  alignas(64) float buf[kRowChunk];
  RowStats st;
  for (int64_t c0 = 0; c0 < valid; c0 += kRowChunk) {
    const int64_t n = std::min(kRowChunk, valid - c0);
    load_z<T, MK>(x, mask, c0, n, scale, buf);
    st.add(buf, n);
  }
  if (st.empty()) {  // fully masked row: 0, or log(0) = -inf
    fill_row(y, cols, LOG ? kNegInf : 0.0f);
    return;
  }
  const float shift = LOG ? st.lse() : st.m;
  const vf inv = splat(1.0f / st.s);
  for (int64_t c0 = 0; c0 < valid; c0 += kRowChunk) {
    const int64_t n = std::min(kRowChunk, valid - c0);
    load_z<T, MK>(x, mask, c0, n, scale, buf);
    int64_t i = 0;
    for (; i + kLanes <= n; i += kLanes) {
      const vf z = load(buf + i) - shift;
      store(y + c0 + i, LOG ? z : vexp_flush(z) * inv);
    }
    if (i < n) {
      const vf z = load_partial(buf + i, n - i, kNegInf) - shift;
      store_partial(y + c0 + i, LOG ? z : vexp_flush(z) * inv, n - i);
    }
  }
  fill_row(y + valid, cols - valid, LOG ? kNegInf : 0.0f);  // causally masked tail
}

template <typename T, int MK, bool LOG>
void forward(int64_t rows, int64_t cols, const T* x, int64_t xs, float scale, const void* mask,
             int64_t mask_rows, int64_t causal_rows, T* y, int64_t ys) {
  const int64_t mask_elem = MK == kBool ? 1 : int64_t(sizeof(T));
#pragma omp parallel for schedule(static) if (rows * cols >= kParallelMinElems)
  for (int64_t r = 0; r < rows; ++r) {
    const void* m = MK == kNone ? nullptr
                                : static_cast<const char*>(mask) + (r % mask_rows) * cols * mask_elem;
    const int64_t valid = causal_rows > 0 ? std::min(cols, r % causal_rows + 1) : cols;
    forward_row<T, MK, LOG>(x + r * xs, m, cols, valid, scale, y + r * ys);
  }
}

template <typename T, bool LOG>
void backward_row(const T* g, const T* y, int64_t n, float scale, T* gx) {
  // pass 1: softmax: sum(y * g); log_softmax: sum of g over unmasked entries
  vf acc = splat(0.0f);
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    const vf gv = load(g + i), yv = load(y + i);
    acc += LOG ? select(yv > kNegInf, gv, splat(0.0f)) : gv * yv;
  }
  if (i < n) {
    const vf gv = load_partial(g + i, n - i), yv = load_partial(y + i, n - i, LOG ? kNegInf : 0.0f);
    acc += LOG ? select(yv > kNegInf, gv, splat(0.0f)) : gv * yv;
  }
  const float dot = reduce_add(acc);
  auto grad = [&](vf gv, vf yv) {
    if constexpr (LOG) return select(yv > kNegInf, scale * (gv - vexp_flush(yv) * dot), splat(0.0f));
    else return scale * yv * (gv - dot);
  };
  for (i = 0; i + kLanes <= n; i += kLanes) store(gx + i, grad(load(g + i), load(y + i)));
  if (i < n)
    store_partial(gx + i, grad(load_partial(g + i, n - i), load_partial(y + i, n - i, LOG ? kNegInf : 0.0f)), n - i);
}

template <typename T, bool LOG>
void backward(int64_t rows, int64_t cols, const T* g, int64_t gs, const T* y, int64_t ys,
              float scale, T* gx, int64_t gxs) {
#pragma omp parallel for schedule(static) if (rows * cols >= kParallelMinElems)
  for (int64_t r = 0; r < rows; ++r) backward_row<T, LOG>(g + r * gs, y + r * ys, cols, scale, gx + r * gxs);
}

template <typename T, int MK>
void forward_t(bool log, int64_t rows, int64_t cols, const void* x, int64_t xs, float scale,
               const void* mask, int64_t mask_rows, int64_t causal_rows, void* y, int64_t ys) {
  auto* xp = static_cast<const T*>(x);
  auto* yp = static_cast<T*>(y);
  if (log) forward<T, MK, true>(rows, cols, xp, xs, scale, mask, mask_rows, causal_rows, yp, ys);
  else forward<T, MK, false>(rows, cols, xp, xs, scale, mask, mask_rows, causal_rows, yp, ys);
}

template <typename T>
void forward_mask(int mask_kind, bool log, int64_t rows, int64_t cols, const void* x, int64_t xs,
                  float scale, const void* mask, int64_t mask_rows, int64_t causal_rows, void* y, int64_t ys) {
  if (mask_kind == kBool) forward_t<T, kBool>(log, rows, cols, x, xs, scale, mask, mask_rows, causal_rows, y, ys);
  else if (mask_kind == kAdd) forward_t<T, kAdd>(log, rows, cols, x, xs, scale, mask, mask_rows, causal_rows, y, ys);
  else forward_t<T, kNone>(log, rows, cols, x, xs, scale, mask, mask_rows, causal_rows, y, ys);
}

template <typename T>
void backward_t(bool log, int64_t rows, int64_t cols, const void* g, int64_t gs, const void* y,
                int64_t ys, float scale, void* gx, int64_t gxs) {
  auto* gp = static_cast<const T*>(g);
  auto* yp = static_cast<const T*>(y);
  auto* gxp = static_cast<T*>(gx);
  if (log) backward<T, true>(rows, cols, gp, gs, yp, ys, scale, gxp, gxs);
  else backward<T, false>(rows, cols, gp, gs, yp, ys, scale, gxp, gxs);
}

}  // namespace
}  // namespace fastlm::cpu

namespace fastlm {

void softmax_forward_cpu(DType dtype, bool log, int64_t rows, int64_t cols, const void* x,
                         int64_t x_row_stride, float scale, int mask_kind, const void* mask,
                         int64_t mask_rows, int64_t causal_rows, void* y, int64_t y_row_stride) {
  if (rows == 0 || cols == 0) return;
  if (dtype == DType::kFloat32)
    cpu::forward_mask<float>(mask_kind, log, rows, cols, x, x_row_stride, scale, mask, mask_rows, causal_rows, y, y_row_stride);
  else  // bf16 bits; the binding rejects fp16 on the CPU
    cpu::forward_mask<uint16_t>(mask_kind, log, rows, cols, x, x_row_stride, scale, mask, mask_rows, causal_rows, y, y_row_stride);
}

void softmax_backward_cpu(DType dtype, bool log, int64_t rows, int64_t cols, const void* grad_y,
                          int64_t grad_y_row_stride, const void* y, int64_t y_row_stride,
                          float scale, void* grad_x, int64_t grad_x_row_stride) {
  if (rows == 0 || cols == 0) return;
  if (dtype == DType::kFloat32)
    cpu::backward_t<float>(log, rows, cols, grad_y, grad_y_row_stride, y, y_row_stride, scale, grad_x, grad_x_row_stride);
  else
    cpu::backward_t<uint16_t>(log, rows, cols, grad_y, grad_y_row_stride, y, y_row_stride, scale, grad_x, grad_x_row_stride);
}

}  // namespace fastlm
