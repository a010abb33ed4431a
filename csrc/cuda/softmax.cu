// softmax / log_softmax on CUDA, y = softmax(scale x + mask), and its backward.
//
// What: TPR threads own a row (launch_rows in row_softmax.cuh: 8 threads for <= 16 packs, a warp
// for <= 128, 128 threads for <= 1024, 512 for <= 4096 packs; a pack is 16 bytes: 8 halves or 4
// floats), several rows per CTA when rows are narrow. Rows up to 4096 packs (32768 halves, 16384
// floats) are HELD: each thread loads its K packs (row_io.cuh: scalar head up to the row's first
// 16-byte boundary, 16-byte body, scalar tail, so any width, stride and offset is vectorised),
// folds them into an online (max, sum) pair, the pairs merge across the row, and y is written
// from the registers: the row is read from DRAM once. Longer rows stream in chunks of 512 x 4
// packs and keep as many packs as fit in shared memory (227 KB on sm_90, 163 KB on sm_80), so a
// 65536-wide bf16 row is still read once; a 131072-wide one re-reads its last 11 % (sm_90),
// an fp32 one its last 56 %. On sm_90a such rows go to a thread-block cluster instead
// (forward_cluster): S = 2..8 CTAs hold the row in their shared memory, 128 KB each at most, so
// rows up to 262144 floats / 524288 halves are read from DRAM once, and the S (max, sum) pairs
// cross the cluster through distributed shared memory (DSMEM).
// Backward: dot = sum(y g) (log: sum g), then gx = scale y (g - dot) (log: scale (g - e^y dot))
// from the held (y, g) registers, for rows up to 2048 packs (two operands: K <= 4 keeps them in
// registers). Longer rows on sm_90a go to a cluster too (backward_cluster): S = 2..8 CTAs hold y
// and g of the row, 64 KB of each per CTA at most (rows up to 131072 floats / 262144 halves), the
// S partial dots cross through DSMEM and are added in rank order (deterministic), and gx is
// written from shared memory: y and g read once, gx written once (3 row-sized DRAM streams).
// Elsewhere such rows read (y, g) twice (5 streams once the ~132 rows in flight outgrow L2: past
// ~64K halves a row on an H100).
// A cluster is launched only where cudaOccupancyMaxActiveClusters says the GPCs can place it at
// 128 KB a CTA (asked once per device, kernel and cluster size: cluster_launch.cuh), and a launch
// the device still refuses (cudaErrorInvalidClusterSize, cudaErrorLaunchOutOfResources) is
// remembered and falls back as well: the single-CTA kernels (forward_long, backward_kernel) take
// the rows.
//
// Why it is fast: every 16-byte load a thread makes (K packs of x, or of y and grad_y) is
// issued before the first is used. Little's law asks ~13.6 KB in flight per SM of an H100
// (3.0 TB/s x ~600 ns / 132 SMs). sm_90a figures (scripts/sass_report.py --memory --kernel
// softmax): forward held at 512 x 8 packs: 79-117 registers, 1 CTA (16 warps) per SM, 132-136 B
// per thread in flight = 66-68 KB per SM; 128 x 8: 85-117 registers, 66-85 KB; a warp x 4:
// 43-63 KB; 8 threads x 2: 24-36 warps x 36-40 B = 27-45 KB; the long-row stream 512 x 4:
// 34-36 KB. Backward (two operands, K <= 4): 36-80 KB. The cluster kernels: 1 CTA of 16 warps
// per SM (128 KB + 1 KB reserved of the SM's 228 KB), each slice staged with 4 x 16-byte loads in
// flight per thread (the backward stages y, then g): 32 KB per SM; 48-90 registers (the
// backward's fp16/bf16 at 90, under the 128 that 512 threads allow). So every layout has 2-7x
// the bytes in flight that the copy bandwidth needs, no spills, and loads 16 bytes wide except
// <= 2 (VEC - 1) head/tail elements a row, and the masks (read element by element: small,
// cached). Mask kind and log are uniform runtime branches, which keeps the instantiation count
// small.
#include <cuda_runtime.h>

#include <algorithm>
#include <type_traits>

#include "fastlm/softmax.h"
#include "cluster_launch.cuh"
#include "ptx_sm90.cuh"
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

// z = scale x (+ additive mask, or -inf where a bool mask drops it or past the causal limit).
template <typename T>
struct Logit {
  MaskArgs ma;
  const void* mrow;
  int64_t valid;
  __device__ __forceinline__ float operator()(float x, int64_t c) const {
    float v = x * ma.scale;
    if (ma.kind == 1) v = static_cast<const uint8_t*>(mrow)[c] ? v : neg_inf();
    else if (ma.kind == 2) v += to_float(static_cast<const T*>(mrow)[c]);
    return c < valid ? v : neg_inf();
  }
};

// Row indices are 32-bit here (the launcher refuses 2^31 rows and more): a 64-bit remainder is a
// subroutine call, around which ptxas spills.
template <typename T>
__device__ __forceinline__ Logit<T> row_logit(const MaskArgs& ma, int64_t r, int64_t cols) {
  const int64_t mask_elem = ma.kind == 1 ? 1 : int64_t(sizeof(T));
  const uint32_t r32 = uint32_t(r);
  const void* mrow =
      ma.kind ? static_cast<const char*>(ma.ptr) + int64_t(r32 % uint32_t(ma.rows)) * cols * mask_elem : nullptr;
  return Logit<T>{ma, mrow, ma.causal_rows > 0 ? min(cols, int64_t(r32 % uint32_t(ma.causal_rows)) + 1) : cols};
}

// y from z and the row's merged pair. Fully masked (every z is -inf): 0, or -inf for log; a NaN
// or +inf in the row left s NaN and every output NaN.
struct Output {
  bool log, empty;
  float shift, inv;
  __device__ __forceinline__ Output(MaxSum st, bool log_) : log(log_), empty(st.s == 0.0f) {
    shift = log ? st.m + logf(st.s) : st.m;
    inv = __fdividef(1.0f, st.s);  // IEEE division's slow-path call would spill
  }
  __device__ __forceinline__ float operator()(float z) const {
    if (empty) return log ? neg_inf() : 0.0f;
    return log ? z - shift : fast_exp(z - shift) * inv;
  }
};

template <typename T, typename L>
__global__ void __launch_bounds__(L::BLOCK, 1)
    forward_held(const T* __restrict__ x, int64_t xs, MaskArgs ma, bool log, T* __restrict__ y, int64_t ys,
                 int64_t rows, int64_t cols) {
  FASTLM_SHARED(MaxSum, sm, [L::BLOCK / 32]);
  bool live;
  const int64_t r = layout_row<L>(rows, live);
  const T* xr = x + r * xs;
  T* yr = y + r * ys;
  const auto slots = whole_row<T, L::TPR, L::K>(split_row(xr, cols), threadIdx.x % L::TPR);
  const auto h = slots.load(xr, true);
  const Logit<T> z = row_logit<T>(ma, r, cols);
  auto zs = [&](int slot, int64_t c) { return z(h.at(slot), c); };
  const Output out(row_merge<L::TPR>(fold(MaxSum{neg_inf(), 0.0f}, slots, zs), sm), log);
  if (live) slots.store(yr, same_phase(xr, yr), [&](int slot, int64_t c) { return out(zs(slot, c)); });
}

// Rows of more than 4096 packs: pass 1 streams the row (4 packs per thread in flight) into the
// online pair and stashes the first `stash_packs` packs in shared memory; pass 2 writes y from
// the stash, re-reading from global memory only the packs past it.
template <typename T, typename L>
__global__ void __launch_bounds__(L::BLOCK, 1)
    forward_long(const T* __restrict__ x, int64_t xs, MaskArgs ma, bool log, T* __restrict__ y, int64_t ys,
                 int64_t cols, int64_t stash_packs) {
  FASTLM_SHARED(MaxSum, sm, [L::BLOCK / 32]);
  FASTLM_DYNAMIC_SHARED(float, stash_words);  // one untyped array for every instantiation
  auto* stash = reinterpret_cast<Pack<T, kVec<T>>*>(stash_words);
  const int64_t r = blockIdx.x;
  const T* xr = x + r * xs;
  T* yr = y + r * ys;
  const RowSplit s = split_row(xr, cols);
  const Logit<T> z = row_logit<T>(ma, r, cols);
  const int lane = threadIdx.x;
  MaxSum st{neg_inf(), 0.0f};
  stream_row<T, L::TPR, L::K>(s, lane, [&](const auto& slots) {
    const auto h = slots.load(xr, true);
    st = fold(st, slots, [&](int slot, int64_t c) { return z(h.at(slot), c); });
#pragma unroll
    for (int k = 0; k < L::K; ++k) {
      const int64_t p = slots.p0 + lane + int64_t(k) * L::TPR;
      if (slots.has_pack(k) && p < stash_packs) stash[p] = h.body[k];
    }
  });
  const Output out(row_merge<L::TPR>(st, sm), log);
  const bool vec = same_phase(xr, yr);
  stream_row<T, L::TPR, L::K>(s, lane, [&](const auto& slots) {
    using H = std::decay_t<decltype(slots.load(xr, true))>;
    H h;
    if (slots.p0 + int64_t(L::TPR) * L::K <= stash_packs) {  // uniform: the whole chunk is stashed
#pragma unroll
      for (int k = 0; k < L::K; ++k)
        if (slots.has_pack(k)) h.body[k] = stash[slots.p0 + lane + int64_t(k) * L::TPR];
      if (slots.has_head()) h.head = xr[lane];
      if (slots.has_tail()) h.tail = xr[slots.tail_col()];
    } else {
      h = slots.load(xr, true);
    }
    slots.store(yr, vec, [&](int slot, int64_t c) { return out(z(h.at(slot), c)); });
  });
}

// ---------------------------------------------- sm_90a: long rows on a thread-block cluster
// A row of more than 4096 packs (forward; 2048 for the backward's two operands) on a cluster of S
// CTAs (blockIdx.x = S row + rank: a cluster of shape (S, 1, 1) is S consecutive blocks, rank =
// blockIdx.x % S): rank q holds packs [q P, (q + 1) P) of each operand in shared memory (P =
// slice_packs: 8192 packs of x, or 4096 of y and 4096 of grad_y, 128 KB at most), rank 0 also the
// head scalars and rank S-1 the tail ones (< VEC each: one per thread at most). Any width, stride
// and offset: the slices are of the first operand's body packs (row_io.cuh); a second operand out
// of its phase is staged element by element. Each CTA reduces its slice to one value, threads
// 0..S-1 fetch the S values through DSMEM after a cluster barrier and every CTA combines them in
// rank order (the same result in all, deterministic), then writes its slice of the output from
// shared memory. The arrive after the fetch and the wait before exit keep every CTA's value alive
// until the others have read it, without stalling the writes. The slices, their staging, the
// gather and the launch (cluster_fits, launch_on_cluster) are cluster_launch.cuh's, shared with
// the norms.
// The forward: each CTA folds its slice of z into a (max, sum) pair (fold's arithmetic,
// row_softmax.cuh: the max, then the sum at that shift), the pairs are merged in rank order, and
// y is written from the slice.
template <typename T>
__global__ void __launch_bounds__(kClusterBlock, 1)
    forward_cluster(const T* __restrict__ x, int64_t xs, MaskArgs ma, bool log, T* __restrict__ y, int64_t ys,
                    int64_t cols, int64_t slice_packs, int size) {
  using P = Pack<T, kVec<T>>;
  constexpr int V = kVec<T>;
  FASTLM_SHARED(MaxSum, sm, [kClusterBlock / 32]);
  FASTLM_SHARED(float2, mine, [1]);            // this CTA's (max, sum), read by the others
  FASTLM_SHARED(float2, pairs, [kMaxCluster]);  // every rank's, fetched
  FASTLM_DYNAMIC_SHARED(float, slice_words);
  P* slice = reinterpret_cast<P*>(slice_words);
  const ClusterSlice c = cluster_slice(x, xs, cols, slice_packs, size);
  const RowSplit& s = c.s;
  const T* xr = x + c.row * xs;
  T* yr = y + c.row * ys;
  const int tid = threadIdx.x;
  stage_slice<true>(xr + s.head, slice, c.p0, c.p1);
  const float edge_x = c.has_edge ? to_float(xr[c.edge_col]) : 0.0f;
  const Logit<T> z = row_logit<T>(ma, c.row, cols);
  __syncthreads();
  auto for_each = [&](auto&& f) {  // f(z, col) over this thread's elements
    if (c.has_edge) f(z(edge_x, c.edge_col), c.edge_col);
    for (int64_t p = c.p0 + tid; p < c.p1; p += kClusterBlock) {
      const P v = slice[p - c.p0];
#pragma unroll
      for (int j = 0; j < V; ++j) f(z(to_float(v.v[j]), s.head + p * V + j), s.head + p * V + j);
    }
  };
  float m = neg_inf();
  for_each([&](float v, int64_t) { m = fmaxf(m, v); });
  const float shift = m == neg_inf() ? 0.0f : m;
  float sum = 0.0f;
  for_each([&](float v, int64_t) { sum += fast_exp(v - shift); });
  const MaxSum st = row_merge<kClusterBlock>(MaxSum{m, sum}, sm);
  if (tid == 0) mine[0] = make_float2(st.m, st.s);
  cluster_gather(mine, pairs, size, true);
  MaxSum total{neg_inf(), 0.0f};
  for (int q = 0; q < size; ++q) total = merge(total, MaxSum{pairs[q].x, pairs[q].y});
  const Output out(total, log);
  if (same_phase(xr, yr)) {
    P* yb = reinterpret_cast<P*>(yr + s.head);
    for (int64_t p = c.p0 + tid; p < c.p1; p += kClusterBlock) {
      const P v = slice[p - c.p0];
      P o;
#pragma unroll
      for (int j = 0; j < V; ++j) o.v[j] = from_float<T>(out(z(to_float(v.v[j]), s.head + p * V + j)));
      yb[p] = o;
    }
    if (c.has_edge) yr[c.edge_col] = from_float<T>(out(z(edge_x, c.edge_col)));
  } else {
    for_each([&](float v, int64_t col) { yr[col] = from_float<T>(out(v)); });
  }
  sm90::cluster_wait();  // every CTA has fetched this one's pair: its shared memory may go
}

// The backward's arithmetic: dot = sum(term(y, g)) over the row, grad_x = grad(y, g, dot). Masked
// entries (y = 0, or -inf for log) add nothing to dot and get 0.
struct GradTerms {
  float scale;
  bool log;
  __device__ __forceinline__ float term(float yv, float gv) const {
    return log ? (yv > neg_inf() ? gv : 0.0f) : yv * gv;
  }
  __device__ __forceinline__ float grad(float yv, float gv, float dot) const {
    return log ? (yv > neg_inf() ? scale * (gv - fast_exp(yv) * dot) : 0.0f) : scale * yv * (gv - dot);
  }
};

// The backward: each CTA stages its slice of y and of grad_y (64 KB each at most), sums its terms,
// the S partial dots are added in rank order, and grad_x is written from the slices.
template <typename T>
__global__ void __launch_bounds__(kClusterBlock, 1)
    backward_cluster(const T* __restrict__ g, int64_t gs, const T* __restrict__ y, int64_t ys, GradTerms f,
                     T* __restrict__ gx, int64_t gxs, int64_t cols, int64_t slice_packs, int size) {
  using P = Pack<T, kVec<T>>;
  constexpr int V = kVec<T>;
  FASTLM_SHARED(float, sm, [kClusterBlock / 32]);
  FASTLM_SHARED(float, mine, [1]);             // this CTA's partial dot, read by the others
  FASTLM_SHARED(float, dots, [kMaxCluster]);   // every rank's, fetched
  FASTLM_DYNAMIC_SHARED(float, slice_words);
  P* y_slice = reinterpret_cast<P*>(slice_words);
  P* g_slice = y_slice + slice_packs;
  const ClusterSlice c = cluster_slice(y, ys, cols, slice_packs, size);
  const RowSplit& s = c.s;
  const T* yr = y + c.row * ys;
  const T* gr = g + c.row * gs;
  T* gxr = gx + c.row * gxs;
  const int tid = threadIdx.x;
  stage_slice<true>(yr + s.head, y_slice, c.p0, c.p1);
  stage_slice(gr + s.head, same_phase(yr, gr), g_slice, c.p0, c.p1);
  const float edge_y = c.has_edge ? to_float(yr[c.edge_col]) : 0.0f;
  const float edge_g = c.has_edge ? to_float(gr[c.edge_col]) : 0.0f;
  __syncthreads();
  float acc = c.has_edge ? f.term(edge_y, edge_g) : 0.0f;
  for (int64_t p = c.p0 + tid; p < c.p1; p += kClusterBlock) {
    const P yv = y_slice[p - c.p0], gv = g_slice[p - c.p0];
#pragma unroll
    for (int j = 0; j < V; ++j) acc += f.term(to_float(yv.v[j]), to_float(gv.v[j]));
  }
  const float partial = row_sum<kClusterBlock>(acc, sm);
  if (tid == 0) mine[0] = partial;
  cluster_gather(mine, dots, size, true);
  float dot = 0.0f;
  for (int q = 0; q < size; ++q) dot += dots[q];
  const bool vec = same_phase(yr, gxr);
  for (int64_t p = c.p0 + tid; p < c.p1; p += kClusterBlock) {
    const P yv = y_slice[p - c.p0], gv = g_slice[p - c.p0];
    P o;
#pragma unroll
    for (int j = 0; j < V; ++j) o.v[j] = from_float<T>(f.grad(to_float(yv.v[j]), to_float(gv.v[j]), dot));
    put_pack(gxr + s.head, p, o, vec);
  }
  if (c.has_edge) gxr[c.edge_col] = from_float<T>(f.grad(edge_y, edge_g, dot));
  sm90::cluster_wait();  // every CTA has fetched this one's dot: its shared memory may go
}

template <typename T, typename L>
__global__ void __launch_bounds__(L::BLOCK, 1)
    backward_kernel(const T* __restrict__ g, int64_t gs, const T* __restrict__ y, int64_t ys, GradTerms f,
                    T* __restrict__ gx, int64_t gxs, int64_t rows, int64_t cols) {
  FASTLM_SHARED(float, sm, [L::BLOCK / 32]);
  bool live;
  const int64_t r = layout_row<L>(rows, live);
  const T* yr = y + r * ys;
  const T* gr = g + r * gs;
  T* gxr = gx + r * gxs;
  const RowSplit s = split_row(yr, cols);
  const bool g_vec = same_phase(yr, gr), gx_vec = same_phase(yr, gxr);
  const int lane = threadIdx.x % L::TPR;
  if constexpr (L::kHeld) {
    const auto slots = whole_row<T, L::TPR, L::K>(s, lane);
    const auto hy = slots.load(yr, true);
    const auto hg = slots.load(gr, g_vec);
    float acc = 0.0f;
    slots.for_each([&](int slot, int64_t) { acc += f.term(hy.at(slot), hg.at(slot)); });
    const float dot = row_sum<L::TPR>(acc, sm);
    if (live) slots.store(gxr, gx_vec, [&](int slot, int64_t) { return f.grad(hy.at(slot), hg.at(slot), dot); });
  } else {
    float acc = 0.0f;
    stream_row<T, L::TPR, L::K>(s, lane, [&](const auto& slots) {
      const auto hy = slots.load(yr, true);
      const auto hg = slots.load(gr, g_vec);
      slots.for_each([&](int slot, int64_t) { acc += f.term(hy.at(slot), hg.at(slot)); });
    });
    const float dot = row_sum<L::TPR>(acc, sm);
    stream_row<T, L::TPR, L::K>(s, lane, [&](const auto& slots) {
      const auto hy = slots.load(yr, true);
      const auto hg = slots.load(gr, g_vec);
      slots.store(gxr, gx_vec, [&](int slot, int64_t) { return f.grad(hy.at(slot), hg.at(slot), dot); });
    });
  }
}

// Packs of a long row kept in shared memory: all of them if the device's opt-in limit allows.
template <typename T, typename L>
int64_t stash_packs_for(int64_t cols) {
  int dev = 0, optin = 48 * 1024;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess)
    optin = 48 * 1024;
  const int64_t fit = (int64_t(optin) - int64_t(sizeof(MaxSum)) * (L::BLOCK / 32)) / 16;
  return std::min<int64_t>(fit, cols / kVec<T> + 1);
}

template <typename T>
int forward_t(bool log, int64_t rows, int64_t cols, const void* x, int64_t xs, const MaskArgs& ma, void* y,
              int64_t ys, cudaStream_t stream) {
  return launch_rows<T, 8>(rows, cols, [&](auto layout, unsigned grid) {
    using L = decltype(layout);
    if constexpr (L::kHeld) {
      launch_kernel(forward_held<T, L>, grid, L::BLOCK, 0, stream, static_cast<const T*>(x), xs, ma, log,
                    static_cast<T*>(y), ys, rows, cols);
    } else if (!rows_on_cluster<T>(forward_cluster<T>, 1, rows, cols, stream, static_cast<const T*>(x), xs, ma, log,
                                   static_cast<T*>(y), ys)) {
      const int64_t stash = stash_packs_for<T, L>(cols);
      const size_t bytes = size_t(stash) * 16;
      if (cudaFuncSetAttribute(forward_long<T, L>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)) !=
          cudaSuccess)
        return;  // launch_rows returns the error
      launch_kernel(forward_long<T, L>, grid, L::BLOCK, bytes, stream, static_cast<const T*>(x), xs, ma, log,
                    static_cast<T*>(y), ys, cols, stash);
    }
  });
}

template <typename T>
int backward_t(bool log, int64_t rows, int64_t cols, const void* g, int64_t gs, const void* y, int64_t ys,
               float scale, void* gx, int64_t gxs, cudaStream_t stream) {
  const GradTerms f{scale, log};
  return launch_rows<T, 4>(rows, cols, [&](auto layout, unsigned grid) {
    using L = decltype(layout);
    if constexpr (!L::kHeld) {
      if (rows_on_cluster<T>(backward_cluster<T>, 2, rows, cols, stream, static_cast<const T*>(g), gs,
                             static_cast<const T*>(y), ys, f, static_cast<T*>(gx), gxs))
        return;
    }
    launch_kernel(backward_kernel<T, L>, grid, L::BLOCK, 0, stream, static_cast<const T*>(g), gs,
                  static_cast<const T*>(y), ys, f, static_cast<T*>(gx), gxs, rows, cols);
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
  if (rows > INT32_MAX || mask_rows > INT32_MAX || causal_rows > INT32_MAX) return int(cudaErrorInvalidValue);
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
