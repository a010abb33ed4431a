// bias_act on CUDA: y = act(x + bias), and grad_x = grad_y * act'(x + bias) with grad_bias.
// Memory-bound, so the whole game is bytes: each thread moves one 16-byte pack (8 halves or
// 4 floats) of a row down a column strip, the bias is loaded once per thread and reused for every
// row it visits, the pre-activation is recomputed in backward instead of stored, and grad_bias
// is summed in registers during the same pass (per-row-split partials, then column_sum.cuh's
// fixed-order reduce: deterministic, no atomics).
//
// Any width, row stride and offset keeps 16-byte accesses (row_io.cuh): a row is a scalar head
// up to x's 16-byte boundary, packs, and a scalar tail, the edges owned by column block 0's first
// threads. Column sums need every row a thread visits to split alike, and a row's split depends
// only on (base + r x stride bytes) mod 16, which repeats every P = phase_period <= 8 rows (16 /
// element bytes): row split y walks only rows y mod P + P i, so a thread's slots are the same
// columns in all its rows. grad_y and grad_x use 16-byte accesses at x's pack positions when they
// are in phase with x (equal offsets mod 16 and strides mod 16 bytes: any contiguous tensors);
// an operand out of phase with x takes element accesses there instead, as does the bias (once
// per thread) when out of phase. Before: any width, stride or pointer not a 16-byte multiple
// dropped the whole tensor to 2-byte accesses (GPT-2's 3072 x odd slices, every odd width).
//
// Loads in flight (Little's law: ~3 TB/s x ~600 ns = 1.8 MB per H100, ~14 KB per SM): a thread
// issues its kRowsInFlight = 4 rows' packs and edge elements as one straight run before it uses
// any (rows past the end reload the last row instead of branching around the load). Figures
// from sass_report.py --memory --kernel bias_act, no spills anywhere: forward 90-128 registers
// under launch bounds (256, 2), 2 blocks an SM, 4 x 16 B (+ edges) in flight a thread = 40-48 KB
// per SM; backward fp32 126-128 registers, 2 blocks, 8 x 16 B a thread = 96 KB per SM; backward
// 16-bit 170-191 registers (4 rows x 8 derivatives unrolled; capped at 128 it spilled), 1 block
// of 256, 8 x 16 B a thread = 40 KB per SM, except bf16 on sm_90a, where ptxas splits the batch
// after 3-5 packs: 19.5-21.5 KB per SM, still 1.4x the need. The grad_bias partials are
// (2 x SMs / column blocks + up to P - 1) x cols fp32 (rows padded to 16 bytes): 1.6 MB for
// 3072 bf16 columns on 132 SMs, written and read once, ~2 % of an 8K x 3K backward's 151 MB;
// column_sum reads them back 16 bytes at a time.
#include <cuda_runtime.h>

#include <algorithm>
#include <type_traits>

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
constexpr int kMaxPhases = 8;     // phase_period's bound: 16 / 2-byte elements

__host__ __device__ __forceinline__ int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// A block is (tx, ty): tx threads side by side own tx adjacent packs of a row (one each; tx the
// power of two >= the packs of a row, 8..32, then a multiple of 32 up to 256; column block 0's
// first threads also own the head and tail elements, so tx >= 8 > VEC - 1), ty = 256 / tx rows
// walk down them (a warp covers several narrow rows instead of idling). gridDim.x column blocks;
// gridDim.y = period x splits: row split y walks the rows of phase y % period (row_io's
// phase_period), so every row it visits splits alike and a thread's slots are the same columns
// in all of them (~kBlocksPerSm blocks per SM in all, never more splits than a phase's row blocks).
struct Plan {
  dim3 grid, block;
  int period;
};

Plan make_plan(int64_t rows, int64_t cols, int elem_bytes, int period) {
  const int64_t packs = ceil_div(cols, 16 / elem_bytes);  // >= the packs of any split of the row
  int tx = 8;
  while (tx < 32 && tx < packs) tx *= 2;
  if (packs > 32) tx = int(std::min<int64_t>(kThreads, ceil_div(packs, 32) * 32));
  const int ty = kThreads / tx;
  const int64_t col_blocks = ceil_div(packs, tx);
  const int64_t per_phase = std::min({ceil_div(ceil_div(int64_t(sm_count()) * kBlocksPerSm, col_blocks), period),
                                      ceil_div(ceil_div(rows, period), ty), int64_t(65535 / period)});
  const int64_t splits = period * std::max<int64_t>(1, per_phase);
  return Plan{dim3(unsigned(col_blocks), unsigned(splits)), dim3(unsigned(tx), unsigned(ty)), period};
}

// The most row splits any plan for (rows, cols) can have (period x ceil(target / period) and
// period x ceil(rows / period) are below target + 8 and rows + 8): the backward's workspace is
// sized before the strides are seen.
int64_t max_row_splits(int64_t rows) {
  return std::min({int64_t(sm_count()) * kBlocksPerSm + kMaxPhases, rows + kMaxPhases, int64_t(65535)});
}

// fp32 partial rows padded to whole 16-byte packs (column_sum.cuh reads them 4 floats at a time).
int64_t partial_ld(int64_t cols) { return ceil_div(cols, 4) * 4; }

// This block's rows: phase q = blockIdx.y % period, the phase's n rows q + period i, i = first,
// first + step, ... for this thread's row group.
struct PhaseRows {
  int64_t q, period, n, first, step;
  __device__ __forceinline__ int64_t row(int64_t i) const { return q + period * i; }
  // rows past the phase's end load its last row again (not stored): the loads of a batch stay
  // one straight run, with no branch between them
  __device__ __forceinline__ int64_t clamp(int64_t i) const { return i < n ? i : n - 1; }
};

__device__ __forceinline__ PhaseRows phase_rows(int64_t rows, int period) {
  const int64_t q = blockIdx.y % period, splits = gridDim.y / period;
  return PhaseRows{q, period, rows > q ? ceil_div(rows - q, period) : 0,
                   int64_t(blockIdx.y / period) * blockDim.y + threadIdx.y, splits * blockDim.y};
}

// The thread's columns: one pack of the phase's split (pack blockIdx.x * tx + threadIdx.x) and,
// in column block 0, head and tail element threadIdx.x. With one pack a thread, Slots' thread
// count only bounds the edges: tx >= 8 >= VEC - 1.
template <typename T>
using ColumnSlots = Slots<T, 8, 1>;

template <typename T>
__device__ __forceinline__ ColumnSlots<T> column_slots(const T* phase_row, int64_t cols) {
  return ColumnSlots<T>{split_row(phase_row, cols), int(threadIdx.x), int64_t(blockIdx.x) * blockDim.x,
                        blockIdx.x == 0};
}

// The bias at the thread's slots, loaded once (16-byte when in phase with x's rows, else element
// by element) and reused for every row; 0 without a bias.
template <typename T>
__device__ __forceinline__ void load_bias(const ColumnSlots<T>& cs, const T* bias, const T* phase_row,
                                          float (&b)[Held<T, 1>::kSlots]) {
#pragma unroll
  for (int i = 0; i < Held<T, 1>::kSlots; ++i) b[i] = 0.0f;
  if (bias == nullptr) return;
  const Held<T, 1> h = cs.load(bias, same_phase(bias, phase_row));
  cs.for_each([&](int slot, int64_t) { b[slot] = h.at(slot); });
}

template <typename T, Activation A>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm)
    forward_kernel(const T* __restrict__ x, int64_t xs, const T* __restrict__ bias,
                   T* __restrict__ y, int64_t ys, int64_t rows, int64_t cols, int period) {
  const PhaseRows pr = phase_rows(rows, period);
  const T* x_q = x + pr.q * xs;  // the phase's first row (maybe past the end: address only)
  const auto cs = column_slots(x_q, cols);
  if (!cs.has_pack(0) && !cs.has_head() && !cs.has_tail()) return;
  float b[Held<T, 1>::kSlots];
  load_bias(cs, bias, x_q, b);
  const bool y_vec = same_phase(y + pr.q * ys, x_q);  // the same for every row of the phase
  for (int64_t i0 = pr.first; i0 < pr.n; i0 += kRowsInFlight * pr.step) {
    Held<T, 1> xh[kRowsInFlight];
#pragma unroll
    for (int u = 0; u < kRowsInFlight; ++u) xh[u] = cs.load(x + pr.row(pr.clamp(i0 + u * pr.step)) * xs, true);
#pragma unroll
    for (int u = 0; u < kRowsInFlight; ++u) {
      if (i0 + u * pr.step >= pr.n) break;
      cs.store(y + pr.row(i0 + u * pr.step) * ys, y_vec,
               [&](int slot, int64_t) { return act_forward<A>(xh[u].at(slot) + b[slot]); });
    }
  }
}

// partial (gridDim.y, ld) fp32: this row split's grad_bias, summed in registers over its rows
// (all of one phase, so a slot is one column) and folded over the block's ty row groups in
// shared memory; every column of the row written by exactly one thread. Null when no bias
// gradient is wanted.
template <typename T, Activation A>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(const T* __restrict__ gy, int64_t gys, const T* __restrict__ x, int64_t xs,
                    const T* __restrict__ bias, T* __restrict__ gx, int64_t gxs,
                    float* __restrict__ partial, int64_t ld, int64_t rows, int64_t cols, int period) {
  constexpr int kSlots = Held<T, 1>::kSlots;
  FASTLM_SHARED(float, red, [kThreads * kSlots]);
  const PhaseRows pr = phase_rows(rows, period);
  const T* x_q = x + pr.q * xs;
  const auto cs = column_slots(x_q, cols);
  float acc[kSlots], b[kSlots];
#pragma unroll
  for (int i = 0; i < kSlots; ++i) acc[i] = 0.0f;
  load_bias(cs, bias, x_q, b);
  const bool gy_vec = same_phase(gy + pr.q * gys, x_q), gx_vec = same_phase(gx + pr.q * gxs, x_q);
  for (int64_t i0 = pr.first; i0 < pr.n; i0 += kRowsInFlight * pr.step) {
    Held<T, 1> gh[kRowsInFlight], xh[kRowsInFlight];
    auto load_rows = [&](auto gy_in_phase) {  // one straight run of 8 loads per (compile-time) grad_y width
#pragma unroll
      for (int u = 0; u < kRowsInFlight; ++u) {
        const int64_t r = pr.row(pr.clamp(i0 + u * pr.step));
        gh[u] = cs.load(gy + r * gys, decltype(gy_in_phase)::value);
        xh[u] = cs.load(x + r * xs, true);
      }
    };
    if (gy_vec) load_rows(std::true_type{});
    else load_rows(std::false_type{});
#pragma unroll
    for (int u = 0; u < kRowsInFlight; ++u) {
      if (i0 + u * pr.step >= pr.n) break;
      cs.store(gx + pr.row(i0 + u * pr.step) * gxs, gx_vec, [&](int slot, int64_t) {
        const float g = gh[u].at(slot) * act_derivative<A>(xh[u].at(slot) + b[slot]);
        acc[slot] += g;
        return g;
      });
    }
  }
  if (partial == nullptr) return;  // uniform across the grid
  const int base = (threadIdx.y * blockDim.x + threadIdx.x) * kSlots;
#pragma unroll
  for (int i = 0; i < kSlots; ++i) red[base + i] = acc[i];
  __syncthreads();
  if (threadIdx.y != 0) return;
  for (int j = 1; j < int(blockDim.y); ++j) {
#pragma unroll
    for (int i = 0; i < kSlots; ++i) acc[i] += red[(j * blockDim.x + threadIdx.x) * kSlots + i];
  }
  float* mine = partial + int64_t(blockIdx.y) * ld;
  cs.for_each([&](int slot, int64_t c) { mine[c] = acc[slot]; });
}

template <typename T, Activation A>
int launch_forward(int64_t rows, int64_t cols, const void* x, int64_t xs, const void* bias,
                   void* y, int64_t ys, cudaStream_t stream) {
  const Plan plan = make_plan(rows, cols, sizeof(T), phase_period(sizeof(T), {xs, ys}));
  launch_kernel(forward_kernel<T, A>, plan.grid, plan.block, 0, stream, static_cast<const T*>(x), xs,
                static_cast<const T*>(bias), static_cast<T*>(y), ys, rows, cols, plan.period);
  return int(cudaGetLastError());
}

template <typename T, Activation A>
int launch_backward(int64_t rows, int64_t cols, const void* gy, int64_t gys, const void* x,
                    int64_t xs, const void* bias, void* gx, int64_t gxs, void* grad_bias,
                    float* workspace, cudaStream_t stream) {
  float* partial = grad_bias ? workspace : nullptr;
  const Plan plan = make_plan(rows, cols, sizeof(T), phase_period(sizeof(T), {gys, xs, gxs}));
  if (grad_bias && (workspace == nullptr || int64_t(plan.grid.y) > max_row_splits(rows))) return int(cudaErrorInvalidValue);
  const int64_t ld = partial_ld(cols);
  launch_kernel(backward_kernel<T, A>, plan.grid, plan.block, 0, stream, static_cast<const T*>(gy), gys,
                static_cast<const T*>(x), xs, static_cast<const T*>(bias), static_cast<T*>(gx), gxs, partial, ld,
                rows, cols, plan.period);
  if (grad_bias) launch_column_sum(partial, int64_t(plan.grid.y), ld, cols, static_cast<T*>(grad_bias), stream);
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
  return cuda::max_row_splits(rows) * cuda::partial_ld(cols);
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
