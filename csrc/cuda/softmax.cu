// softmax / log_softmax on CUDA. TPR threads own a row (a warp for rows up to 1024 columns,
// a 512-thread block beyond), walk it in 16-byte packs keeping an online (max, sum) pair per
// thread, merge the pairs (row_softmax.cuh), then walk the row again to write y; a row of any
// length (262,144 columns and beyond) is read twice and written once. Mask kind and log are
// uniform runtime branches, which keeps the instantiation count (and compile time) small.
// Backward: one reduction pass over (y, g), one write pass.
#include <cuda_runtime.h>

#include <algorithm>

#include "fastlm/softmax.h"
#include "row_softmax.cuh"

namespace fastlm::cuda {
namespace {

struct MaskArgs {
  int kind;  // 0 none, 1 bool, 2 additive (T)
  const void* ptr;
  int64_t rows;
  int64_t causal_rows;
  float scale;
};

template <typename T, int VEC>
__device__ __forceinline__ void load_z(const T* x, const MaskArgs& ma, const void* mrow, int64_t c,
                                       int64_t valid, float (&z)[VEC]) {
  const RowPack<T, VEC> p = *reinterpret_cast<const RowPack<T, VEC>*>(x + c);
#pragma unroll
  for (int i = 0; i < VEC; ++i) {
    float v = to_float(p.v[i]) * ma.scale;
    if (ma.kind == 1) v = static_cast<const uint8_t*>(mrow)[c + i] ? v : neg_inf();
    else if (ma.kind == 2) v += to_float(static_cast<const T*>(mrow)[c + i]);
    z[i] = c + i < valid ? v : neg_inf();
  }
}

template <typename T, int TPR, int BLOCK, int VEC>
__global__ void __launch_bounds__(BLOCK)
    forward_kernel(const T* __restrict__ x, int64_t xs, MaskArgs ma, bool log, T* __restrict__ y,
                   int64_t ys, int64_t rows, int64_t cols) {
  FASTLM_SHARED(float, sm_m, [BLOCK / 32]);
  FASTLM_SHARED(float, sm_s, [BLOCK / 32]);
  constexpr int kRowsPerBlock = BLOCK / TPR;
  const int tid = threadIdx.x % TPR;
  const int64_t r = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / TPR;
  if (r >= rows) return;  // TPR > 32 means one row per block and an exact grid: never taken there
  const T* xr = x + r * xs;
  const int64_t mask_elem = ma.kind == 1 ? 1 : int64_t(sizeof(T));
  const void* mrow = ma.kind ? static_cast<const char*>(ma.ptr) + (r % ma.rows) * cols * mask_elem : nullptr;
  const int64_t valid = ma.causal_rows > 0 ? min(cols, r % ma.causal_rows + 1) : cols;
  MaxSum st{neg_inf(), 0.0f};
  for (int64_t c = int64_t(tid) * VEC; c < valid; c += int64_t(TPR) * VEC) {
    float z[VEC];
    load_z<T, VEC>(xr, ma, mrow, c, valid, z);
    st = online_add<VEC>(st, z);
  }
  st = row_merge<TPR>(st, sm_m, sm_s);
  // Fully masked (every z is -inf): 0, or -inf for log. A NaN or +inf in the row leaves m or s
  // NaN and propagates, as torch's softmax does (AMP's GradScaler must see the overflow).
  const bool empty = st.s == 0.0f;
  const float shift = log ? st.m + logf(st.s) : st.m;
  const float inv = 1.0f / st.s;
  T* yr = y + r * ys;
  for (int64_t c = int64_t(tid) * VEC; c < cols; c += int64_t(TPR) * VEC) {
    float z[VEC];
    load_z<T, VEC>(xr, ma, mrow, c, valid, z);
    RowPack<T, VEC> out;
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      float v = log ? z[i] - shift : fast_exp(z[i] - shift) * inv;
      if (empty) v = log ? neg_inf() : 0.0f;
      out.v[i] = from_float<T>(v);
    }
    *reinterpret_cast<RowPack<T, VEC>*>(yr + c) = out;
  }
}

template <typename T, int TPR, int BLOCK, int VEC>
__global__ void __launch_bounds__(BLOCK)
    backward_kernel(const T* __restrict__ g, int64_t gs, const T* __restrict__ y, int64_t ys,
                    float scale, bool log, T* __restrict__ gx, int64_t gxs, int64_t rows, int64_t cols) {
  FASTLM_SHARED(float, sm, [BLOCK / 32]);
  constexpr int kRowsPerBlock = BLOCK / TPR;
  const int tid = threadIdx.x % TPR;
  const int64_t r = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / TPR;
  if (r >= rows) return;
  const T* gr = g + r * gs;
  const T* yr = y + r * ys;
  float acc = 0.0f;
  for (int64_t c = int64_t(tid) * VEC; c < cols; c += int64_t(TPR) * VEC) {
    const RowPack<T, VEC> gp = *reinterpret_cast<const RowPack<T, VEC>*>(gr + c);
    const RowPack<T, VEC> yp = *reinterpret_cast<const RowPack<T, VEC>*>(yr + c);
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      const float yv = to_float(yp.v[i]), gv = to_float(gp.v[i]);
      acc += log ? (yv > neg_inf() ? gv : 0.0f) : yv * gv;
    }
  }
  const float dot = row_sum<TPR>(acc, sm);
  T* gxr = gx + r * gxs;
  for (int64_t c = int64_t(tid) * VEC; c < cols; c += int64_t(TPR) * VEC) {
    const RowPack<T, VEC> gp = *reinterpret_cast<const RowPack<T, VEC>*>(gr + c);
    const RowPack<T, VEC> yp = *reinterpret_cast<const RowPack<T, VEC>*>(yr + c);
    RowPack<T, VEC> out;
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      const float yv = to_float(yp.v[i]), gv = to_float(gp.v[i]);
      const float v = log ? (yv > neg_inf() ? scale * (gv - fast_exp(yv) * dot) : 0.0f) : scale * yv * (gv - dot);
      out.v[i] = from_float<T>(v);
    }
    *reinterpret_cast<RowPack<T, VEC>*>(gxr + c) = out;
  }
}

template <typename T>
int forward_t(bool log, int64_t rows, int64_t cols, const void* x, int64_t xs, const MaskArgs& ma,
              void* y, int64_t ys, cudaStream_t stream) {
  const int vec = pick_vec<T>(cols, {xs, ys}, {x, y});  // mask entries are read one by one
  return launch_rows<T>(rows, cols, vec, [&](auto tpr, auto block, auto v, unsigned grid) {
    launch_kernel(forward_kernel<T, tpr.value, block.value, v.value>, grid, block.value, 0, stream,
                  static_cast<const T*>(x), xs, ma, log, static_cast<T*>(y), ys, rows, cols);
  });
}

template <typename T>
int backward_t(bool log, int64_t rows, int64_t cols, const void* g, int64_t gs, const void* y, int64_t ys,
               float scale, void* gx, int64_t gxs, cudaStream_t stream) {
  const int vec = pick_vec<T>(cols, {gs, ys, gxs}, {g, y, gx});
  return launch_rows<T>(rows, cols, vec, [&](auto tpr, auto block, auto v, unsigned grid) {
    launch_kernel(backward_kernel<T, tpr.value, block.value, v.value>, grid, block.value, 0, stream,
                  static_cast<const T*>(g), gs, static_cast<const T*>(y), ys, scale, log, static_cast<T*>(gx), gxs,
                  rows, cols);
  });
}

}  // namespace
}  // namespace fastlm::cuda

namespace fastlm {

int softmax_forward_cuda(DType dtype, bool log, int64_t rows, int64_t cols, const void* x,
                         int64_t x_row_stride, float scale, int mask_kind, const void* mask,
                         int64_t mask_rows, int64_t causal_rows, void* y, int64_t y_row_stride,
                         cudaStream_t stream) {
  if (rows == 0 || cols == 0) return 0;
  const cuda::MaskArgs ma{mask_kind, mask, mask_rows > 0 ? mask_rows : 1, causal_rows, scale};
  switch (dtype) {
    case DType::kFloat32: return cuda::forward_t<float>(log, rows, cols, x, x_row_stride, ma, y, y_row_stride, stream);
    case DType::kFloat16: return cuda::forward_t<__half>(log, rows, cols, x, x_row_stride, ma, y, y_row_stride, stream);
    case DType::kBFloat16: return cuda::forward_t<__nv_bfloat16>(log, rows, cols, x, x_row_stride, ma, y, y_row_stride, stream);
  }
  return int(cudaErrorInvalidValue);
}

int softmax_backward_cuda(DType dtype, bool log, int64_t rows, int64_t cols, const void* grad_y,
                          int64_t grad_y_row_stride, const void* y, int64_t y_row_stride,
                          float scale, void* grad_x, int64_t grad_x_row_stride, cudaStream_t stream) {
  if (rows == 0 || cols == 0) return 0;
  switch (dtype) {
    case DType::kFloat32: return cuda::backward_t<float>(log, rows, cols, grad_y, grad_y_row_stride, y, y_row_stride, scale, grad_x, grad_x_row_stride, stream);
    case DType::kFloat16: return cuda::backward_t<__half>(log, rows, cols, grad_y, grad_y_row_stride, y, y_row_stride, scale, grad_x, grad_x_row_stride, stream);
    case DType::kBFloat16: return cuda::backward_t<__nv_bfloat16>(log, rows, cols, grad_y, grad_y_row_stride, y, y_row_stride, scale, grad_x, grad_x_row_stride, stream);
  }
  return int(cudaErrorInvalidValue);
}

}  // namespace fastlm
