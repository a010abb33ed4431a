// bias_act on CUDA: y = act(x + bias), and grad_x = grad_y * act'(x + bias) with grad_bias.
// Memory-bound, so the whole game is bytes: each thread moves 16-byte packs (8 halves or
// 4 floats) down a column strip, the bias pack is loaded once per thread and reused for every
// row it visits, the pre-activation is recomputed in backward instead of stored, and grad_bias
// is summed in registers during the same pass (per-row-split partials, then column_sum.cuh's
// fixed-order reduce: deterministic, no atomics).
//
// Loads in flight (Little's law: ~3 TB/s x ~600 ns = 1.8 MB per H100, ~14 KB per SM): a thread
// issues its kRowsInFlight = 4 rows' packs before it uses any, and the grid holds ~2 blocks of
// 256 threads per SM, so 512 x 4 x 16 B = 32 KB (forward: x) / 64 KB (backward: grad_y and x)
// are in flight per SM, 2-4x the need. Registers (sass_report.py --kernel bias_act, sm_90a):
// forward 40-76, backward 66-128 (bf16 GELU: 4 rows x 8 derivatives unrolled), no spills; 2
// blocks an SM fit even at 128, and the grid asks for no more. The grad_bias partials are
// (2 x SMs / column blocks) x cols fp32: 1.6 MB for 3072 bf16 columns on 132 SMs, written
// and read once, ~2 % of an 8K x 3K backward's 151 MB; column_sum reads them back (32-column
// blocks x 8 warps).
// Widths, strides or pointers that are not 16-byte multiples take the scalar path (VEC = 1).
#include <cuda_runtime.h>

#include <algorithm>

#include "activations.cuh"
#include "column_sum.cuh"
#include "launch.cuh"
#include "row_io.cuh"
#include "fastlm/bias_act.h"

namespace fastlm::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kRowsInFlight = 4;  // rows a thread loads before it uses any of them
constexpr int kBlocksPerSm = 2;   // 512 threads x 4 rows x 16 B = 32 KB of x in flight per SM

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// A block is (tx, ty): tx threads side by side own tx * vec adjacent columns (one pack each;
// tx the power of two >= the packs of a row up to 32, then a multiple of 32 up to 256), ty =
// 256 / tx rows walk down them (a warp covers several narrow rows instead of idling);
// gridDim.x column blocks, gridDim.y row splits (~kBlocksPerSm blocks per SM in all, never
// more than the row blocks).
struct Plan {
  dim3 grid, block;
};

Plan make_plan(int64_t rows, int64_t cols, int vec) {
  const int64_t packs = ceil_div(cols, vec);
  int tx = 1;
  while (tx < 32 && tx < packs) tx *= 2;
  if (packs > 32) tx = int(std::min<int64_t>(kThreads, ceil_div(packs, 32) * 32));
  const int ty = kThreads / tx;
  const int64_t col_blocks = ceil_div(packs, tx);
  const int64_t splits = std::min({ceil_div(int64_t(sm_count()) * kBlocksPerSm, col_blocks), ceil_div(rows, ty),
                                   int64_t(65535)});
  return Plan{dim3(unsigned(col_blocks), unsigned(std::max<int64_t>(1, splits))), dim3(unsigned(tx), unsigned(ty))};
}

// The most row splits any plan for (rows, cols) can have: the backward's workspace is sized
// before the pack width (which depends on pointer alignment) is chosen.
int64_t max_row_splits(int64_t rows) {
  return std::max<int64_t>(1, std::min({int64_t(sm_count()) * kBlocksPerSm, rows, int64_t(65535)}));
}

template <typename T, int VEC>
__device__ __forceinline__ void load_bias(const T* bias, int64_t c, float (&b)[VEC]) {
  if (bias) {
    Pack<T, VEC> p = *reinterpret_cast<const Pack<T, VEC>*>(bias + c);
#pragma unroll
    for (int i = 0; i < VEC; ++i) b[i] = to_float(p.v[i]);
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) b[i] = 0.0f;
  }
}

template <typename T, Activation A, int VEC>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(const T* __restrict__ x, int64_t xs, const T* __restrict__ bias,
                   T* __restrict__ y, int64_t ys, int64_t rows, int64_t cols) {
  const int64_t c = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
  if (c >= cols) return;
  float b[VEC];
  load_bias<T, VEC>(bias, c, b);
  const int64_t step = int64_t(gridDim.y) * blockDim.y;
  for (int64_t r0 = int64_t(blockIdx.y) * blockDim.y + threadIdx.y; r0 < rows; r0 += kRowsInFlight * step) {
    Pack<T, VEC> xp[kRowsInFlight];
#pragma unroll
    for (int u = 0; u < kRowsInFlight; ++u) {
      if (r0 + u * step < rows) xp[u] = *reinterpret_cast<const Pack<T, VEC>*>(x + (r0 + u * step) * xs + c);
    }
#pragma unroll
    for (int u = 0; u < kRowsInFlight; ++u) {
      if (r0 + u * step >= rows) break;
      Pack<T, VEC> yp;
#pragma unroll
      for (int i = 0; i < VEC; ++i) yp.v[i] = from_float<T>(act_forward<A>(to_float(xp[u].v[i]) + b[i]));
      *reinterpret_cast<Pack<T, VEC>*>(y + (r0 + u * step) * ys + c) = yp;
    }
  }
}

// partial (gridDim.y, cols) fp32: this row split's grad_bias, summed in registers and folded
// over the block's ty rows in shared memory; null when no bias gradient is wanted.
template <typename T, Activation A, int VEC>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(const T* __restrict__ gy, int64_t gys, const T* __restrict__ x, int64_t xs,
                    const T* __restrict__ bias, T* __restrict__ gx, int64_t gxs,
                    float* __restrict__ partial, int64_t rows, int64_t cols) {
  FASTLM_SHARED(float, red, [kThreads * VEC]);
  const int64_t c = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
  const bool active = c < cols;  // no early return: the block meets at __syncthreads below
  float acc[VEC];
#pragma unroll
  for (int i = 0; i < VEC; ++i) acc[i] = 0.0f;
  if (active) {
    float b[VEC];
    load_bias<T, VEC>(bias, c, b);
    const int64_t step = int64_t(gridDim.y) * blockDim.y;
    for (int64_t r0 = int64_t(blockIdx.y) * blockDim.y + threadIdx.y; r0 < rows; r0 += kRowsInFlight * step) {
      Pack<T, VEC> gp[kRowsInFlight], xp[kRowsInFlight];
#pragma unroll
      for (int u = 0; u < kRowsInFlight; ++u) {
        const int64_t r = r0 + u * step;
        if (r >= rows) continue;
        gp[u] = *reinterpret_cast<const Pack<T, VEC>*>(gy + r * gys + c);
        xp[u] = *reinterpret_cast<const Pack<T, VEC>*>(x + r * xs + c);
      }
#pragma unroll
      for (int u = 0; u < kRowsInFlight; ++u) {
        if (r0 + u * step >= rows) break;
        Pack<T, VEC> op;
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          const float g = to_float(gp[u].v[i]) * act_derivative<A>(to_float(xp[u].v[i]) + b[i]);
          op.v[i] = from_float<T>(g);
          acc[i] += g;
        }
        *reinterpret_cast<Pack<T, VEC>*>(gx + (r0 + u * step) * gxs + c) = op;
      }
    }
  }
  if (partial == nullptr) return;  // uniform across the grid
  const int slot = (threadIdx.y * blockDim.x + threadIdx.x) * VEC;
#pragma unroll
  for (int i = 0; i < VEC; ++i) red[slot + i] = acc[i];
  __syncthreads();
  if (threadIdx.y != 0 || !active) return;
  for (int j = 1; j < int(blockDim.y); ++j) {
#pragma unroll
    for (int i = 0; i < VEC; ++i) acc[i] += red[(j * blockDim.x + threadIdx.x) * VEC + i];
  }
#pragma unroll
  for (int i = 0; i < VEC; ++i) partial[int64_t(blockIdx.y) * cols + c + i] = acc[i];
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

// 16-byte packs need every row start and the bias 16-byte aligned.
template <typename T>
int pick_vec(int64_t cols, std::initializer_list<int64_t> strides, std::initializer_list<const void*> ptrs) {
  if (cols % kVec<T>) return 1;
  for (int64_t s : strides) if (s % kVec<T>) return 1;
  for (const void* p : ptrs) if (p && !aligned16(p)) return 1;
  return kVec<T>;
}

template <typename T, Activation A>
int launch_forward(int64_t rows, int64_t cols, const void* x, int64_t xs, const void* bias,
                   void* y, int64_t ys, cudaStream_t stream) {
  const T* xp = static_cast<const T*>(x);
  const T* bp = static_cast<const T*>(bias);
  T* yp = static_cast<T*>(y);
  const int vec = pick_vec<T>(cols, {xs, ys}, {x, bias, y});
  const Plan plan = make_plan(rows, cols, vec);
  if (vec == kVec<T>)
    launch_kernel(forward_kernel<T, A, kVec<T>>, plan.grid, plan.block, 0, stream, xp, xs, bp, yp, ys, rows, cols);
  else
    launch_kernel(forward_kernel<T, A, 1>, plan.grid, plan.block, 0, stream, xp, xs, bp, yp, ys, rows, cols);
  return int(cudaGetLastError());
}

template <typename T, Activation A>
int launch_backward(int64_t rows, int64_t cols, const void* gy, int64_t gys, const void* x,
                    int64_t xs, const void* bias, void* gx, int64_t gxs, void* grad_bias,
                    float* workspace, cudaStream_t stream) {
  const T* gyp = static_cast<const T*>(gy);
  const T* xp = static_cast<const T*>(x);
  const T* bp = static_cast<const T*>(bias);
  T* gxp = static_cast<T*>(gx);
  float* partial = grad_bias ? workspace : nullptr;
  const int vec = pick_vec<T>(cols, {gys, xs, gxs}, {gy, x, bias, gx});
  const Plan plan = make_plan(rows, cols, vec);
  if (vec == kVec<T>)
    launch_kernel(backward_kernel<T, A, kVec<T>>, plan.grid, plan.block, 0, stream, gyp, gys, xp, xs, bp, gxp, gxs,
                  partial, rows, cols);
  else
    launch_kernel(backward_kernel<T, A, 1>, plan.grid, plan.block, 0, stream, gyp, gys, xp, xs, bp, gxp, gxs, partial,
                  rows, cols);
  if (grad_bias) launch_column_sum(partial, int64_t(plan.grid.y), cols, cols, static_cast<T*>(grad_bias), stream);
  return int(cudaGetLastError());
}

// Turns the runtime (dtype, activation) pair into one template instantiation.
template <template <typename, Activation> class Fn, typename... Args>
int dispatch(DType dtype, Activation act, Args... args) {
  auto with_act = [&](auto tag) -> int {
    using T = decltype(tag);
    switch (act) {
      case Activation::kGelu: return Fn<T, Activation::kGelu>::run(args...);
      case Activation::kGeluTanh: return Fn<T, Activation::kGeluTanh>::run(args...);
      case Activation::kRelu: return Fn<T, Activation::kRelu>::run(args...);
      case Activation::kSilu: return Fn<T, Activation::kSilu>::run(args...);
    }
    return int(cudaErrorInvalidValue);
  };
  switch (dtype) {
    case DType::kFloat32: return with_act(float{});
    case DType::kFloat16: return with_act(__half{});
    case DType::kBFloat16: return with_act(__nv_bfloat16{});
  }
  return int(cudaErrorInvalidValue);
}

template <typename T, Activation A>
struct Forward {
  template <typename... Args>
  static int run(Args... args) { return launch_forward<T, A>(args...); }
};

template <typename T, Activation A>
struct Backward {
  template <typename... Args>
  static int run(Args... args) { return launch_backward<T, A>(args...); }
};

}  // namespace
}  // namespace fastlm::cuda

namespace fastlm {

int bias_act_forward_cuda(DType dtype, Activation act, int64_t rows, int64_t cols,
                          const void* x, int64_t x_row_stride, const void* bias,
                          void* y, int64_t y_row_stride, cudaStream_t stream) {
  if (rows == 0 || cols == 0) return 0;
  return cuda::dispatch<cuda::Forward>(dtype, act, rows, cols, x, x_row_stride, bias, y,
                                       y_row_stride, stream);
}

int64_t bias_act_backward_cuda_workspace(int64_t rows, int64_t cols) {
  return cuda::max_row_splits(rows) * cols;
}

int bias_act_backward_cuda(DType dtype, Activation act, int64_t rows, int64_t cols,
                           const void* grad_y, int64_t grad_y_row_stride,
                           const void* x, int64_t x_row_stride, const void* bias,
                           void* grad_x, int64_t grad_x_row_stride, void* grad_bias,
                           float* workspace, cudaStream_t stream) {
  if (cols == 0) return 0;
  return cuda::dispatch<cuda::Backward>(dtype, act, rows, cols, grad_y, grad_y_row_stride, x,
                                        x_row_stride, bias, grad_x, grad_x_row_stride,
                                        grad_bias, workspace, stream);
}

}  // namespace fastlm
