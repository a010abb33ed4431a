// cross_entropy on CUDA, fused. Forward: TPR threads own a row (a warp up to 1024 columns, a
// 512-thread block beyond) and read it once in 16-byte packs, keeping the online (max, sum)
// pair and the label-smoothing sum; one thread writes loss[r] and lse[r]. Backward: the same
// row walk recomputes p = exp(x - lse) and writes the gradient (no N x C tensor is saved).
// Targets out of range are rejected by the caller; here they are treated like ignored rows.
#include <cuda_runtime.h>

#include "fastlm/cross_entropy.h"
#include "row_softmax.cuh"

namespace fastlm::cuda {
namespace {

struct CeArgs {
  const int64_t* target;
  const float* weight;
  int64_t ignore_index;
  float eps;
};

__device__ __forceinline__ bool ignored(int64_t t, int64_t ignore_index, int64_t cols) {
  return t == ignore_index || t < 0 || t >= cols;
}

template <typename T, int TPR, int BLOCK, int VEC>
__global__ void __launch_bounds__(BLOCK)
    forward_kernel(const T* __restrict__ x, int64_t xs, CeArgs a, float* __restrict__ loss,
                   float* __restrict__ lse, int64_t rows, int64_t cols) {
  FASTLM_SHARED(float, sm_m, [BLOCK / 32]);
  FASTLM_SHARED(float, sm_s, [BLOCK / 32]);
  constexpr int kRowsPerBlock = BLOCK / TPR;
  const int tid = threadIdx.x % TPR;
  const int64_t r = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / TPR;
  if (r >= rows) return;  // TPR > 32: one row per block and an exact grid, never taken there
  const int64_t t = a.target[r];
  if (ignored(t, a.ignore_index, cols)) {  // uniform over the row's threads
    if (tid == 0) loss[r] = lse[r] = 0.0f;
    return;
  }
  const T* xr = x + r * xs;
  MaxSum st{neg_inf(), 0.0f};
  float smooth = 0.0f, wsum = 0.0f;
  for (int64_t c = int64_t(tid) * VEC; c < cols; c += int64_t(TPR) * VEC) {
    const RowPack<T, VEC> p = *reinterpret_cast<const RowPack<T, VEC>*>(xr + c);
    float z[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      z[i] = to_float(p.v[i]);
      const float w = a.weight ? a.weight[c + i] : 1.0f;
      smooth += w * z[i];
      wsum += w;
    }
    st = online_add<VEC>(st, z);
  }
  st = row_merge<TPR>(st, sm_m, sm_s);
  if (a.eps > 0.0f) {
    smooth = row_sum<TPR>(smooth, sm_m);
    wsum = row_sum<TPR>(wsum, sm_m);
  }
  if (tid != 0) return;
  const float l = st.m + logf(st.s);
  const float wt = a.weight ? a.weight[t] : 1.0f;
  float v = (1.0f - a.eps) * wt * (l - to_float(xr[t]));
  if (a.eps > 0.0f) v += a.eps / float(cols) * (wsum * l - smooth);
  loss[r] = v;
  lse[r] = l;
}

template <typename T, int TPR, int BLOCK, int VEC>
__global__ void __launch_bounds__(BLOCK)
    backward_kernel(const T* __restrict__ x, int64_t xs, CeArgs a, const float* __restrict__ weight_sum,
                    const float* __restrict__ lse, const float* __restrict__ gscale, T* __restrict__ grad,
                    int64_t gs, int64_t rows, int64_t cols) {
  constexpr int kRowsPerBlock = BLOCK / TPR;
  const int tid = threadIdx.x % TPR;
  const int64_t r = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / TPR;
  if (r >= rows) return;
  const int64_t t = a.target[r];
  const bool skip = ignored(t, a.ignore_index, cols);
  const float g = skip ? 0.0f : gscale[r];
  const float wt = skip ? 0.0f : (a.weight ? a.weight[t] : 1.0f);
  const float W = a.weight ? *weight_sum : float(cols);
  // grad = ca (p - [c == t]) + cb (W p - w[c]); each bracket is exactly 0 where p == 1 and C == 1
  const float ca = g * (1.0f - a.eps) * wt, cb = g * a.eps / float(cols);
  const float shift = skip ? 0.0f : lse[r];
  const T* xr = x + r * xs;
  T* gr = grad + r * gs;
  for (int64_t c = int64_t(tid) * VEC; c < cols; c += int64_t(TPR) * VEC) {
    const RowPack<T, VEC> p = *reinterpret_cast<const RowPack<T, VEC>*>(xr + c);
    RowPack<T, VEC> out;
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      const float w = a.weight ? a.weight[c + i] : 1.0f;
      const float pc = skip ? 0.0f : fast_exp(to_float(p.v[i]) - shift);  // ignored rows: lse is 0
      const float v = ca * (pc - (c + i == t ? 1.0f : 0.0f)) + cb * (W * pc - w);
      out.v[i] = from_float<T>(v);
    }
    *reinterpret_cast<RowPack<T, VEC>*>(gr + c) = out;
  }
}

template <typename T>
int forward_t(int64_t rows, int64_t cols, const void* x, int64_t xs, const CeArgs& a, float* loss, float* lse,
              cudaStream_t stream) {
  const int vec = pick_vec<T>(cols, {xs}, {x});
  return launch_rows<T>(rows, cols, vec, [&](auto tpr, auto block, auto v, unsigned grid) {
    launch_kernel(forward_kernel<T, tpr.value, block.value, v.value>, grid, block.value, 0, stream,
                  static_cast<const T*>(x), xs, a, loss, lse, rows, cols);
  });
}

template <typename T>
int backward_t(int64_t rows, int64_t cols, const void* x, int64_t xs, const CeArgs& a, const float* wsum,
               const float* lse, const float* gscale, void* grad, int64_t gs, cudaStream_t stream) {
  const int vec = pick_vec<T>(cols, {xs, gs}, {x, grad});
  return launch_rows<T>(rows, cols, vec, [&](auto tpr, auto block, auto v, unsigned grid) {
    launch_kernel(backward_kernel<T, tpr.value, block.value, v.value>, grid, block.value, 0, stream,
                  static_cast<const T*>(x), xs, a, wsum, lse, gscale, static_cast<T*>(grad), gs, rows, cols);
  });
}

}  // namespace
}  // namespace fastlm::cuda

namespace fastlm {

int cross_entropy_forward_cuda(DType dtype, int64_t rows, int64_t cols, const void* logits,
                               int64_t logits_row_stride, const int64_t* target, const float* weight,
                               int64_t ignore_index, float label_smoothing, float* loss, float* lse,
                               cudaStream_t stream) {
  if (rows == 0) return 0;
  const cuda::CeArgs a{target, weight, ignore_index, label_smoothing};
  switch (dtype) {
    case DType::kFloat32: return cuda::forward_t<float>(rows, cols, logits, logits_row_stride, a, loss, lse, stream);
    case DType::kFloat16: return cuda::forward_t<__half>(rows, cols, logits, logits_row_stride, a, loss, lse, stream);
    case DType::kBFloat16: return cuda::forward_t<__nv_bfloat16>(rows, cols, logits, logits_row_stride, a, loss, lse, stream);
  }
  return int(cudaErrorInvalidValue);
}

int cross_entropy_backward_cuda(DType dtype, int64_t rows, int64_t cols, const void* logits,
                                int64_t logits_row_stride, const int64_t* target, const float* weight,
                                const float* weight_sum, int64_t ignore_index, float label_smoothing,
                                const float* lse, const float* gscale, void* grad, int64_t grad_row_stride,
                                cudaStream_t stream) {
  if (rows == 0 || cols == 0) return 0;
  const cuda::CeArgs a{target, weight, ignore_index, label_smoothing};
  switch (dtype) {
    case DType::kFloat32:
      return cuda::backward_t<float>(rows, cols, logits, logits_row_stride, a, weight_sum, lse, gscale, grad, grad_row_stride, stream);
    case DType::kFloat16:
      return cuda::backward_t<__half>(rows, cols, logits, logits_row_stride, a, weight_sum, lse, gscale, grad, grad_row_stride, stream);
    case DType::kBFloat16:
      return cuda::backward_t<__nv_bfloat16>(rows, cols, logits, logits_row_stride, a, weight_sum, lse, gscale, grad, grad_row_stride, stream);
  }
  return int(cudaErrorInvalidValue);
}

}  // namespace fastlm
