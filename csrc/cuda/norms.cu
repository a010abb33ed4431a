// layer_norm / rms_norm on CUDA with the optional pre-norm residual add. A row belongs to a
// group of blockDim.x threads (one warp for rows up to 1024 elements, a whole block above
// that; blockDim.y rows per block). Each thread keeps its slice of the row in registers
// as 16-byte packs (8 halves or 4 floats; scalar when cols is not a pack multiple), so h =
// x + residual is read and written once and normalized from registers: two-pass fp32
// statistics (mean, then centered variance) with warp shuffles + shared memory, no atomics.
// Backward: the same row groups write grad_h and accumulate grad_weight / grad_bias for
// their rows into a per-group fp32 workspace row (owned by the group: no atomics), then a
// second kernel sums the group rows in a fixed order (deterministic).
#include <cuda_runtime.h>

#include <algorithm>

#include "activations.cuh"
#include "launch.cuh"
#include "fastlm/norms.h"

namespace fastlm::cuda {
namespace {

constexpr int kMaxThreads = 512;  // per block; __launch_bounds__ leaves 128 registers a thread
constexpr int kMaxElems = 32;    // row elements per thread (registers): cols <= 32 * 512

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

__host__ __device__ __forceinline__ int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int sm_count() {
  int dev = 0, n = 0;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev);
  return std::max(n, 1);
}

// Sum over the blockDim.x threads of one row group (warp shuffles, then shared memory; smem
// holds one slot per warp of the block, kMaxThreads / 32).
__device__ __forceinline__ float group_sum(float v, float* smem) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if (blockDim.x <= 32) return v;
  const int warps = blockDim.x / 32, lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  float* mine = smem + threadIdx.y * warps;  // each row group of the block has its own slots
  __syncthreads();  // smem reuse across calls
  if (lane == 0) mine[warp] = v;
  __syncthreads();
  float s = 0.0f;
  for (int i = 0; i < warps; ++i) s += mine[i];  // fixed order
  return s;
}

template <typename T, int VEC>
__device__ __forceinline__ void load_pack(const T* p, float (&v)[VEC]) {
  const Pack<T, VEC> pk = *reinterpret_cast<const Pack<T, VEC>*>(p);
#pragma unroll
  for (int i = 0; i < VEC; ++i) v[i] = to_float(pk.v[i]);
}
template <typename T, int VEC>
__device__ __forceinline__ void store_pack(T* p, const float (&v)[VEC]) {
  Pack<T, VEC> pk;
#pragma unroll
  for (int i = 0; i < VEC; ++i) pk.v[i] = from_float<T>(v[i]);
  *reinterpret_cast<Pack<T, VEC>*>(p) = pk;
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kMaxThreads, 1) forward_kernel(NormForwardArgs a) {
  FASTLM_SHARED(float, smem, [kMaxThreads / 32]);
  const int64_t r = int64_t(blockIdx.x) * blockDim.y + threadIdx.y;
  const bool live = r < a.rows;  // no early return: group_sum may sync the block
  const int64_t cols = a.cols, stride = int64_t(blockDim.x) * VEC;
  constexpr int kMaxPacks = kMaxElems / VEC;
  float v[kMaxPacks][VEC];
  float sum = 0.0f;
#pragma unroll
  for (int k = 0; k < kMaxPacks; ++k) {
    const int64_t c = threadIdx.x * VEC + k * stride;
    if (live && c < cols) {
      load_pack<T, VEC>(static_cast<const T*>(a.x) + r * a.x_stride + c, v[k]);
      if (a.residual) {
        float res[VEC];
        load_pack<T, VEC>(static_cast<const T*>(a.residual) + r * a.residual_stride + c, res);
#pragma unroll
        for (int i = 0; i < VEC; ++i) v[k][i] = to_float(from_float<T>(v[k][i] + res[i]));  // h in T, as eager
        store_pack<T, VEC>(static_cast<T*>(a.h) + r * cols + c, v[k]);
      }
    } else {
#pragma unroll
      for (int i = 0; i < VEC; ++i) v[k][i] = 0.0f;
    }
#pragma unroll
    for (int i = 0; i < VEC; ++i) sum += v[k][i];
  }
  const float mean = a.rms ? 0.0f : group_sum(sum, smem) / float(cols);
  float sq = 0.0f;
#pragma unroll
  for (int k = 0; k < kMaxPacks; ++k) {
    const bool in = threadIdx.x * VEC + k * stride < cols;
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      const float d = in ? v[k][i] - mean : 0.0f;
      sq += d * d;
    }
  }
  const float rstd = rsqrtf(group_sum(sq, smem) / float(cols) + a.eps);
  if (!live) return;
  if (threadIdx.x == 0) {
    if (a.mean) a.mean[r] = mean;
    a.rstd[r] = rstd;
  }
#pragma unroll
  for (int k = 0; k < kMaxPacks; ++k) {
    const int64_t c = threadIdx.x * VEC + k * stride;
    if (c >= cols) break;
    float w[VEC], b[VEC], o[VEC];
    if (a.weight) load_pack<T, VEC>(static_cast<const T*>(a.weight) + c, w);
    if (a.bias && !a.rms) load_pack<T, VEC>(static_cast<const T*>(a.bias) + c, b);
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      o[i] = (v[k][i] - mean) * rstd;
      if (a.weight) o[i] *= w[i];
      if (a.bias && !a.rms) o[i] += b[i];
    }
    store_pack<T, VEC>(static_cast<T*>(a.y) + r * cols + c, o);
  }
}

// workspace: (groups, 2, cols) fp32 zeroed; group g = blockIdx.x * blockDim.y + threadIdx.y
// handles rows g, g + groups, ...
template <typename T, int VEC>
__global__ void __launch_bounds__(kMaxThreads, 1) backward_kernel(NormBackwardArgs a, float* ws, int64_t groups) {
  FASTLM_SHARED(float, smem, [kMaxThreads / 32]);
  const int64_t g = int64_t(blockIdx.x) * blockDim.y + threadIdx.y;
  const int64_t cols = a.cols, stride = int64_t(blockDim.x) * VEC;
  const int64_t iters = ceil_div(a.rows, groups);  // uniform per block: syncs line up
  constexpr int kMaxPacks = kMaxElems / VEC;
  float* pw = ws + g * 2 * cols;
  float* pb = pw + cols;
  for (int64_t it = 0; it < iters; ++it) {
    const int64_t r = g + it * groups;
    const bool live = r < a.rows;
    const float mean = (live && !a.rms) ? a.mean[r] : 0.0f, rstd = live ? a.rstd[r] : 0.0f;
    float s1 = 0.0f, s2 = 0.0f;
#pragma unroll 1
    for (int k = 0; k < kMaxPacks; ++k) {
      const int64_t c = threadIdx.x * VEC + k * stride;
      if (!live || c >= cols) break;
      float gy[VEC], h[VEC], w[VEC];
      load_pack<T, VEC>(static_cast<const T*>(a.grad_y) + r * a.grad_y_stride + c, gy);
      load_pack<T, VEC>(static_cast<const T*>(a.h) + r * a.h_stride + c, h);
      if (a.weight) load_pack<T, VEC>(static_cast<const T*>(a.weight) + c, w);
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        const float xhat = (h[i] - mean) * rstd;
        if (a.grad_weight) pw[c + i] += gy[i] * xhat;
        if (a.grad_bias) pb[c + i] += gy[i];
        const float gw = a.weight ? gy[i] * w[i] : gy[i];
        s1 += xhat * gw;
        s2 += gw;
      }
    }
    const float c1 = group_sum(s1, smem) / float(cols);
    const float c2 = a.rms ? 0.0f : group_sum(s2, smem) / float(cols);
#pragma unroll 1
    for (int k = 0; k < kMaxPacks; ++k) {
      const int64_t c = threadIdx.x * VEC + k * stride;
      if (!live || c >= cols) break;
      float gy[VEC], h[VEC], w[VEC], gs[VEC], d[VEC];
      load_pack<T, VEC>(static_cast<const T*>(a.grad_y) + r * a.grad_y_stride + c, gy);
      load_pack<T, VEC>(static_cast<const T*>(a.h) + r * a.h_stride + c, h);
      if (a.weight) load_pack<T, VEC>(static_cast<const T*>(a.weight) + c, w);
      if (a.grad_sum) load_pack<T, VEC>(static_cast<const T*>(a.grad_sum) + r * a.grad_sum_stride + c, gs);
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        const float xhat = (h[i] - mean) * rstd;
        const float gw = a.weight ? gy[i] * w[i] : gy[i];
        d[i] = rstd * (gw - xhat * c1 - c2) + (a.grad_sum ? gs[i] : 0.0f);
      }
      store_pack<T, VEC>(static_cast<T*>(a.grad_h) + r * cols + c, d);
    }
  }
}

template <typename T>
__global__ void reduce_partials(const float* ws, int64_t groups, int64_t cols, T* gw, T* gb) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= cols) return;
  float sw = 0.0f, sb = 0.0f;
  for (int64_t g = 0; g < groups; ++g) {
    sw += ws[g * 2 * cols + c];
    sb += ws[g * 2 * cols + cols + c];
  }
  if (gw) gw[c] = from_float<T>(sw);
  if (gb) gb[c] = from_float<T>(sb);
}

struct Plan {
  int vec, tx, ty;
};

// 16-byte packs when every row start stays aligned, else scalars; threads per row so each
// holds at most kMaxElems elements; rows per block to fill 128+ threads.
Plan make_plan(int64_t cols, int elem_bytes, bool aligned) {
  const int full = 16 / elem_bytes;
  const int vec = (aligned && cols % full == 0) ? full : 1;
  const int64_t packs = ceil_div(cols, vec);
  int tx = 32;
  while (tx < kMaxThreads && packs * vec > int64_t(tx) * kMaxElems) tx *= 2;
  const int ty = std::max(1, 128 / tx);
  return Plan{vec, tx, ty};
}

bool aligned16(const void* p, int64_t stride_elems, int elem_bytes) {
  return p == nullptr || (reinterpret_cast<uintptr_t>(p) % 16 == 0 && (stride_elems * elem_bytes) % 16 == 0);
}

int elem_bytes(DType d) { return d == DType::kFloat32 ? 4 : 2; }

template <template <typename, int> class K, typename F>
void with_type_vec(DType dtype, int vec, F&& f) {
  auto go = [&](auto tag) {
    using T = decltype(tag);
    constexpr int kFull = 16 / sizeof(T);
    if (vec == kFull) f(K<T, kFull>{});
    else f(K<T, 1>{});
  };
  if (dtype == DType::kFloat32) go(float{});
  else if (dtype == DType::kFloat16) go(__half{});
  else go(__nv_bfloat16{});
}

template <typename T, int VEC>
struct Fwd {
  void launch(const NormForwardArgs& a, dim3 grid, dim3 block, cudaStream_t s) const {
    launch_kernel(forward_kernel<T, VEC>, grid, block, 0, s, a);
  }
};
template <typename T, int VEC>
struct Bwd {
  void launch(const NormBackwardArgs& a, float* ws, int64_t groups, dim3 grid, dim3 block, cudaStream_t s) const {
    launch_kernel(backward_kernel<T, VEC>, grid, block, 0, s, a, ws, groups);
    if (a.grad_weight || a.grad_bias)
      launch_kernel(reduce_partials<T>, unsigned(ceil_div(a.cols, 256)), 256, 0, s, ws, groups, a.cols,
                    static_cast<T*>(a.grad_weight), static_cast<T*>(a.grad_bias));
  }
};

// Row groups for the backward: ~16 per SM; a block rounds up by at most ty - 1 < 4 more.
int64_t backward_groups(int64_t rows) { return std::max<int64_t>(1, std::min<int64_t>(rows, int64_t(sm_count()) * 16)); }

}  // namespace
}  // namespace fastlm::cuda

namespace fastlm {

int norm_forward_cuda(const NormForwardArgs& a, cudaStream_t stream) {
  using namespace cuda;
  const int eb = elem_bytes(a.dtype);
  const bool aligned = aligned16(a.x, a.x_stride, eb) && aligned16(a.residual, a.residual_stride, eb) &&
                       aligned16(a.weight, 0, eb) && aligned16(a.bias, 0, eb) && aligned16(a.h, a.cols, eb) &&
                       aligned16(a.y, a.cols, eb);
  const Plan p = make_plan(a.cols, eb, aligned);
  if (a.cols > int64_t(p.tx) * kMaxElems) return int(cudaErrorInvalidValue);
  const dim3 grid(unsigned(ceil_div(a.rows, p.ty))), block(unsigned(p.tx), unsigned(p.ty));
  with_type_vec<Fwd>(a.dtype, p.vec, [&](auto k) { k.launch(a, grid, block, stream); });
  return int(cudaGetLastError());
}

int64_t norm_backward_cuda_workspace(int64_t rows, int64_t cols) {
  return (cuda::backward_groups(rows) + 4) * 2 * std::max<int64_t>(cols, 1);
}

int norm_backward_cuda(const NormBackwardArgs& a, float* workspace, cudaStream_t stream) {
  using namespace cuda;
  const int eb = elem_bytes(a.dtype);
  const bool aligned = aligned16(a.grad_y, a.grad_y_stride, eb) && aligned16(a.grad_sum, a.grad_sum_stride, eb) &&
                       aligned16(a.h, a.h_stride, eb) && aligned16(a.weight, 0, eb) && aligned16(a.grad_h, a.cols, eb);
  const Plan p = make_plan(a.cols, eb, aligned);
  if (a.cols > int64_t(p.tx) * kMaxElems) return int(cudaErrorInvalidValue);
  const int64_t blocks = ceil_div(backward_groups(a.rows), p.ty);
  const int64_t used = blocks * p.ty;  // every group a block spawns owns a workspace row (<= groups + 3)
  cudaError_t e = cudaMemsetAsync(workspace, 0, size_t(used) * 2 * size_t(a.cols) * sizeof(float), stream);
  if (e != cudaSuccess) return int(e);
  with_type_vec<Bwd>(a.dtype, p.vec, [&](auto k) { k.launch(a, workspace, used, dim3(unsigned(blocks)), dim3(unsigned(p.tx), unsigned(p.ty)), stream); });
  return int(cudaGetLastError());
}

}  // namespace fastlm
