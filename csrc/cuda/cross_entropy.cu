// cross_entropy on CUDA, fused.
//
// What: forward: TPR threads own a row (launch_rows in row_softmax.cuh: 8 threads up to 16
// packs, a warp up to 128, 128 threads up to 1024, 512 beyond; a pack is 16 bytes), and read it
// once in chunks of K packs per thread, keeping the online (max, sum) pair and the label-smoothing
// sums; one thread writes loss[r] and lse[r]. Backward: the same walk recomputes p = exp(x - lse)
// and writes the gradient (no N x C tensor is saved). row_io.cuh splits every row into a scalar
// head (up to its first 16-byte boundary), a 16-byte body and a scalar tail, so GPT-2's 50257-wide
// vocab, whose rows start at every 2-byte phase, and any slice are read with 16-byte loads.
// Targets: ignore_index gives a 0 row; any other target outside [0, C) gives NaN loss, lse and
// gradient row, decided on the device: no host sync (the Python layer checks CPU targets).
//
// Why it is fast: both kernels are one pass over the logits (forward 2 B/element read, backward
// 2 B read + 2 B written for 16-bit types) and issue all K loads of a chunk before using any.
// sm_90a figures (scripts/sass_report.py --memory --kernel cross_entropy): K = 8 layouts hold
// 130-148 B per thread in flight at 72-128 registers (16-20 warps per SM): 65-102 KB per SM;
// K = 4: 68-84 B, 34-81 KB; 8 threads x 2 packs: 32-56 B, 36-56 KB; all above the ~13.6 KB per
// SM that Little's law asks of an H100 (3.0 TB/s x ~600 ns / 132 SMs), no spills. Ignored rows
// skip their loads. Class weights (optional) are read element by element (fp32, cached).
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

__device__ __forceinline__ float quiet_nan() { return __int_as_float(0x7fc00000); }

template <typename T, typename L>
__global__ void __launch_bounds__(L::BLOCK, 1)
    forward_kernel(const T* __restrict__ x, int64_t xs, CeArgs a, float* __restrict__ loss,
                   float* __restrict__ lse, int64_t rows, int64_t cols) {
  FASTLM_SHARED(MaxSum, sm_pair, [L::BLOCK / 32]);
  FASTLM_SHARED(float, sm_sum, [L::BLOCK / 32]);
  bool live;
  const int64_t r = layout_row<L>(rows, live);
  const int lane = threadIdx.x % L::TPR;
  const int64_t t = a.target[r];
  const bool ignored = t == a.ignore_index, bad = !ignored && (t < 0 || t >= cols);
  const T* xr = x + r * xs;
  MaxSum st{neg_inf(), 0.0f};
  float smooth = 0.0f, wsum = 0.0f, x_t = 0.0f, w_t = 1.0f;
  if (!ignored && !bad) {  // uniform over the row's threads; the reductions below are not skipped
    if (lane == 0) {  // loaded before the walk: nothing but two floats stays live across it
      x_t = to_float(xr[t]);
      if (a.weight) w_t = a.weight[t];
    }
    stream_row<T, L::TPR, L::K>(split_row(xr, cols), lane, [&](const auto& slots) {
      const auto h = slots.load(xr, true);
      st = fold(st, slots, [&](int slot, int64_t) { return h.at(slot); });
      if (a.eps > 0.0f) {
        slots.for_each([&](int slot, int64_t c) {
          const float w = a.weight ? a.weight[c] : 1.0f;
          smooth += w * h.at(slot);
          wsum += w;
        });
      }
    });
  }
  st = row_merge<L::TPR>(st, sm_pair);
  if (a.eps > 0.0f) {
    smooth = row_sum<L::TPR>(smooth, sm_sum);
    wsum = row_sum<L::TPR>(wsum, sm_sum);
  }
  if (!live || lane != 0) return;
  if (ignored || bad) {
    loss[r] = lse[r] = ignored ? 0.0f : quiet_nan();
    return;
  }
  const float l = st.m + logf(st.s);
  float v = (1.0f - a.eps) * w_t * (l - x_t);
  if (a.eps > 0.0f) v += __fdividef(a.eps, float(cols)) * (wsum * l - smooth);
  loss[r] = v;
  lse[r] = l;
}

template <typename T, typename L>
__global__ void __launch_bounds__(L::BLOCK, 1)
    backward_kernel(const T* __restrict__ x, int64_t xs, CeArgs a, const float* __restrict__ weight_sum,
                    const float* __restrict__ lse, const float* __restrict__ gscale, T* __restrict__ grad,
                    int64_t gs, int64_t rows, int64_t cols) {
  bool live;
  const int64_t r = layout_row<L>(rows, live);
  if (!live) return;  // no reductions here: spare threads may leave
  const int lane = threadIdx.x % L::TPR;
  const int64_t t = a.target[r];
  const bool ignored = t == a.ignore_index, bad = !ignored && (t < 0 || t >= cols);
  const T* xr = x + r * xs;
  T* gr = grad + r * gs;
  const RowSplit s = split_row(xr, cols);
  const bool vec = same_phase(xr, gr);
  if (ignored || bad) {  // a row of 0 (ignored) or NaN (target out of range); the logits are not read
    const float v = ignored ? 0.0f : quiet_nan();
    stream_row<T, L::TPR, L::K>(s, lane, [&](const auto& slots) { slots.store(gr, vec, [&](int, int64_t) { return v; }); });
    return;
  }
  const float g = gscale[r];
  const float wt = a.weight ? a.weight[t] : 1.0f;
  const float W = a.weight ? *weight_sum : float(cols);
  // grad = ca (p - [c == t]) + cb (W p - w[c]); each bracket is exactly 0 where p == 1 and C == 1
  const float ca = g * (1.0f - a.eps) * wt, cb = g * __fdividef(a.eps, float(cols));  // no IEEE slow-path call
  const float shift = lse[r];
  stream_row<T, L::TPR, L::K>(s, lane, [&](const auto& slots) {
    const auto h = slots.load(xr, true);
    slots.store(gr, vec, [&](int slot, int64_t c) {
      const float w = a.weight ? a.weight[c] : 1.0f;
      const float pc = fast_exp(h.at(slot) - shift);
      return ca * (pc - (c == t ? 1.0f : 0.0f)) + cb * (W * pc - w);
    });
  });
}

template <typename T>
int forward_t(int64_t rows, int64_t cols, const void* x, int64_t xs, const CeArgs& a, float* loss, float* lse,
              cudaStream_t stream) {
  return launch_rows<T, 8>(rows, cols, [&](auto layout, unsigned grid) {
    using L = decltype(layout);
    launch_kernel(forward_kernel<T, L>, grid, L::BLOCK, 0, stream, static_cast<const T*>(x), xs, a, loss, lse,
                  rows, cols);
  });
}

template <typename T>
int backward_t(int64_t rows, int64_t cols, const void* x, int64_t xs, const CeArgs& a, const float* wsum,
               const float* lse, const float* gscale, void* grad, int64_t gs, cudaStream_t stream) {
  return launch_rows<T, 8>(rows, cols, [&](auto layout, unsigned grid) {
    using L = decltype(layout);
    launch_kernel(backward_kernel<T, L>, grid, L::BLOCK, 0, stream, static_cast<const T*>(x), xs, a, wsum, lse,
                  gscale, static_cast<T*>(grad), gs, rows, cols);
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
