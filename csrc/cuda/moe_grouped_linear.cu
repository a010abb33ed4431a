// grouped_linear on CUDA: one GEMM launch over all experts of unequal sizes, on the tensor-core
// GEMM core (gemm_core.cuh: 128 x 128 x 64 tiles, 3-stage cp.async, the fused epilogue).
//   forward  out[rows of e] = act(x_e @ weight[e]^T + bias[e])      grouped_rows_kernel, A = x, B = w[e]
//   dX       grad_x[rows of e] = grad_p_e @ weight[e]               grouped_rows_kernel, B = w[e] MN-major
//   dW       grad_weight[e] = grad_p_e^T @ x_e                      grouped_reduce_kernel, K = e's rows
//            (in the weight's layout: a transposed weight gets x_e^T @ grad_p_e, A and B swapped)
// A transposed weight (GPT-OSS's (E, in, out) storage seen as (E, out, in), weight_transposed) is
// read in place by the other orientation of B: MN-major in the forward (gated: the gate and up
// halves are column ranges, a run-time flag of the same kernel), K-major for dX (the forward's
// plain kernel); dW never reads the weight. Kernels: per dtype grouped_rows <B K-major, plain>,
// <K-major, gated>, <MN-major, plain or gated>, grouped_reduce: 4, as before the transposed path.
// The grid is static (cdiv(N, 128) + E m-slots x n-tiles): each CTA scans the device offsets for
// its (expert, m-tile), so nothing waits on a host copy of the routing. Waste: at most one partial
// m-tile per expert, on average half a tile of zero-filled rows each (Mixtral, 4096 tokens x
// top-2 over 8 experts: 8 x 64 of 8192 rows, ~6% of the MMA), plus up to E spare slot CTAs per
// column that exit after the search (a scan of E offsets, before any load). The dropped tail
// (rows past offsets[E]) is zeroed by the slots after the last expert: they run no K tile, and
// act(0) = 0 for every activation.
// Gated (swiglu / geglu): a CTA's 128 B rows are 64 gate rows j.. and the 64 matching up rows
// I + j.. (one extra pointer step per K tile in the loader), so act(gate) * up is formed in the
// same epilogue: 64 outputs per CTA column, pre (gate, up) saved with 16-byte stores.
// Backward: grad_p = grad_out * act'(pre) (gated: d gate = g up act'(gate), d up = g act(gate))
// is written once by grad_p_kernel (8 columns per thread, 16-byte accesses) rather than fused
// into both GEMMs' loads (see linear.cu for that arithmetic); grad_bias[e] = column sums of
// grad_p over e's rows by grad_bias_kernel, one thread per 8 columns looping over the rows in
// order: fp32, deterministic, no atomics.
#include <cuda_runtime.h>

#include <cstdint>

#include "fastlm/moe.h"
#include "gemm_core.cuh"

namespace fastlm::cuda {
namespace {

using gemm::Bytes16;

__device__ __forceinline__ float act_derivative_runtime(Activation a, float z) {
  switch (a) {
    case Activation::kGelu: return act_derivative<Activation::kGelu>(z);
    case Activation::kGeluTanh: return act_derivative<Activation::kGeluTanh>(z);
    case Activation::kRelu: return act_derivative<Activation::kRelu>(z);
    default: return act_derivative<Activation::kSilu>(z);
  }
}

__device__ __forceinline__ int64_t used_rows(const int32_t* offsets, int64_t experts, int64_t rows) {
  const int64_t used = offsets[experts];
  return used < 0 ? 0 : used > rows ? rows : used;
}

// One thread per 8 output columns of a row below offsets[E] (the rest no GEMM reads).
template <typename T>
__global__ void __launch_bounds__(256) grad_p_kernel(const GroupedLinearGradCudaArgs a) {
  const int64_t chunks = a.width / 8, idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t r = idx / chunks, c = (idx % chunks) * 8;
  if (r >= used_rows(a.offsets, a.experts, a.rows)) return;
  const Bytes16 g_raw = *reinterpret_cast<const Bytes16*>(static_cast<const T*>(a.grad_out) + r * a.grad_out_stride + c);
  const T* pre = static_cast<const T*>(a.pre) + r * a.pre_stride + c;
  const Bytes16 z_raw = *reinterpret_cast<const Bytes16*>(pre);
  const T* g = reinterpret_cast<const T*>(&g_raw);
  const T* z = reinterpret_cast<const T*>(&z_raw);
  T* out = static_cast<T*>(a.grad_p) + r * a.grad_p_stride + c;
  Bytes16 d_raw, up_raw;
  T* d = reinterpret_cast<T*>(&d_raw);
  if (a.mode == GroupedAct::kGated) {
    const Bytes16 u_raw = *reinterpret_cast<const Bytes16*>(pre + a.width);
    const T* u = reinterpret_cast<const T*>(&u_raw);
    T* du = reinterpret_cast<T*>(&up_raw);
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      const float gv = to_float(g[e]), zv = to_float(z[e]);
      d[e] = from_float<T>(gv * to_float(u[e]) * act_derivative_runtime(a.act, zv));
      du[e] = from_float<T>(gv * gemm::act_runtime(a.act, zv));
    }
    *reinterpret_cast<Bytes16*>(out + a.width) = up_raw;
  } else {
#pragma unroll
    for (int e = 0; e < 8; ++e) d[e] = from_float<T>(to_float(g[e]) * act_derivative_runtime(a.act, to_float(z[e])));
  }
  *reinterpret_cast<Bytes16*>(out) = d_raw;
}

// grad_bias[e, c..c + 7] = sum of grad_p over e's rows, in row order (0 for an empty expert).
template <typename T>
__global__ void __launch_bounds__(128) grad_bias_kernel(const GroupedLinearGradCudaArgs a, const void* grad_p,
                                                        int64_t grad_p_stride, int64_t cols) {
  const int64_t e = blockIdx.y, c = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * 8;
  if (c >= cols) return;
  int64_t lo = a.offsets[e], hi = a.offsets[e + 1];
  lo = lo < 0 ? 0 : lo > a.rows ? a.rows : lo;
  hi = hi < lo ? lo : hi > a.rows ? a.rows : hi;
  float sum[8] = {0, 0, 0, 0, 0, 0, 0, 0};
#pragma unroll 4  // four rows' loads in flight; the sums still add in row order
  for (int64_t r = lo; r < hi; ++r) {
    const Bytes16 raw = *reinterpret_cast<const Bytes16*>(static_cast<const T*>(grad_p) + r * grad_p_stride + c);
    const T* v = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int i = 0; i < 8; ++i) sum[i] += to_float(v[i]);
  }
  Bytes16 out_raw;
  T* out = reinterpret_cast<T*>(&out_raw);
#pragma unroll
  for (int i = 0; i < 8; ++i) out[i] = from_float<T>(sum[i]);
  *reinterpret_cast<Bytes16*>(static_cast<T*>(a.grad_bias) + e * cols + c) = out_raw;
}

template <typename T>
int forward(const GroupedLinearCudaArgs& a, cudaStream_t stream) {
  const bool gated = a.mode == GroupedAct::kGated;
  gemm::GemmArgs p{};
  p.m = a.rows, p.n = a.width, p.k = a.k, p.k_split = a.k;
  p.a = a.x, p.lda = a.x_stride, p.b = a.weight, p.ldb = a.weight_stride;
  p.ep.has_act = a.mode == GroupedAct::kElementwise, p.ep.act = a.act;  // gated: the Halves epilogue
  p.ep.bias = a.bias, p.ep.y = a.out, p.ep.y_ld = a.out_stride, p.ep.preact = a.pre, p.ep.preact_ld = a.pre_stride;
  const gemm::GroupedArgs g{a.offsets, a.experts, a.rows, 0, a.weight_expert_stride,
                            gated ? 2 * a.width : a.width, 0, gated};
  return a.weight_transposed ? gemm::launch_grouped_rows<T, false>(p, g, stream)
                             : gemm::launch_grouped_rows<T, true>(p, g, stream);
}

template <typename T>
int backward(const GroupedLinearGradCudaArgs& a, cudaStream_t stream) {
  const int64_t cols = a.mode == GroupedAct::kGated ? 2 * a.width : a.width;
  const void* grad_p = a.mode == GroupedAct::kNone ? a.grad_out : a.grad_p;
  const int64_t gp_stride = a.mode == GroupedAct::kNone ? a.grad_out_stride : a.grad_p_stride;
  if (a.mode != GroupedAct::kNone && a.rows > 0 && a.width > 0) {
    const int64_t threads = a.rows * (a.width / 8);
    launch_kernel(grad_p_kernel<T>, dim3(unsigned((threads + 255) / 256)), 256, 0, stream, a);
  }
  if (a.grad_bias && a.experts > 0 && cols > 0)
    launch_kernel(grad_bias_kernel<T>, dim3(unsigned((cols / 8 + 127) / 128), unsigned(a.experts)), 128, 0, stream,
                  a, grad_p, gp_stride, cols);
  if (a.k == 0) return int(cudaGetLastError());  // grad_x and grad_weight are empty
  gemm::GemmArgs dx{};  // (rows, K) = grad_p @ w[e]: GEMM extents (rows, K, cols)
  dx.m = a.rows, dx.n = a.k, dx.k = cols, dx.k_split = cols;
  dx.a = grad_p, dx.lda = gp_stride, dx.b = a.weight, dx.ldb = a.weight_stride;
  dx.ep.y = a.grad_x, dx.ep.y_ld = a.k;
  const gemm::GroupedArgs gx{a.offsets, a.experts, a.rows, 0, a.weight_expert_stride, 0, 0, false};
  // B = w[e] read as (K, cols): MN-major from (E, cols, K) rows, K-major from the transposed storage
  int err = a.weight_transposed ? gemm::launch_grouped_rows<T, true>(dx, gx, stream)
                                : gemm::launch_grouped_rows<T, false>(dx, gx, stream);
  if (err || cols == 0) return err;
  // (cols, K) = grad_p_e^T @ x_e: GEMM extents (cols, K, rows of e); or stored transposed,
  // (K, cols) = x_e^T @ grad_p_e: both operands are MN-major over the rows, so that is the same
  // kernel with A and B swapped (every product and its order of addition unchanged)
  gemm::GemmArgs dw{};
  const bool t = a.grad_weight_transposed;
  dw.m = t ? a.k : cols, dw.n = t ? cols : a.k;
  dw.a = t ? a.x : grad_p, dw.lda = t ? a.x_stride : gp_stride;
  dw.b = t ? grad_p : a.x, dw.ldb = t ? gp_stride : a.x_stride;
  dw.ep.y = a.grad_weight, dw.ep.y_ld = dw.n;
  const gemm::GroupedArgs gw{a.offsets, a.experts, a.rows, 0, 0, 0, cols * a.k, false};
  return gemm::launch_grouped_reduce<T>(dw, gw, stream);
}

}  // namespace
}  // namespace fastlm::cuda

namespace fastlm {

int grouped_linear_forward_cuda(const GroupedLinearCudaArgs& a, cudaStream_t stream) {
  using cuda::gemm::aligned;
  const bool ok = a.width % 8 == 0 && a.k % 8 == 0 && aligned(a.x, a.x_stride) && aligned(a.weight, a.weight_stride) &&
                  a.weight_expert_stride % 8 == 0 && (!a.bias || aligned(a.bias, 0)) &&
                  aligned(a.out, a.out_stride) && (!a.pre || aligned(a.pre, a.pre_stride));
  if (!ok) return int(cudaErrorInvalidValue);
  if (a.rows == 0 || a.width == 0) return 0;
  if (a.dtype == DType::kFloat16) return cuda::forward<__half>(a, stream);
  if (a.dtype == DType::kBFloat16) return cuda::forward<__nv_bfloat16>(a, stream);
  return int(cudaErrorInvalidValue);
}

int grouped_linear_backward_cuda(const GroupedLinearGradCudaArgs& a, cudaStream_t stream) {
  using cuda::gemm::aligned;
  const bool act = a.mode != GroupedAct::kNone;
  const bool ok = a.width % 8 == 0 && a.k % 8 == 0 && aligned(a.grad_out, a.grad_out_stride) &&
                  aligned(a.x, a.x_stride) && aligned(a.weight, a.weight_stride) && a.weight_expert_stride % 8 == 0 &&
                  (!act || (aligned(a.pre, a.pre_stride) && aligned(a.grad_p, a.grad_p_stride)));
  if (!ok) return int(cudaErrorInvalidValue);
  if (a.dtype == DType::kFloat16) return cuda::backward<__half>(a, stream);
  if (a.dtype == DType::kBFloat16) return cuda::backward<__nv_bfloat16>(a, stream);
  return int(cudaErrorInvalidValue);
}

}  // namespace fastlm
