// layer_norm / rms_norm on CUDA with the optional pre-norm residual add. A row belongs to a
// group of tx threads, tx the power of two (up to 512) that leaves each thread at most 32
// elements, so narrow rows share a warp (xor shuffles stay inside the aligned lane group) and
// wide rows get up to 16 warps; blockDim.y rows per block.
//
// Forward: each thread holds its slice of h = x + residual in registers through row_io.cuh
// (16-byte packs for any width, stride and offset: a scalar head up to x's 16-byte boundary,
// then packs, then a scalar tail; tx >= 8 so one head and one tail element per thread), so the
// row is read once and written once (h, y): two-pass fp32 statistics (mean, then centered
// variance) from registers with shuffles + shared memory, no atomics. All of a thread's loads
// of x and residual are issued before the first add: 128-thread blocks at 122-126 registers
// (no spills) = 4 blocks, 512 threads an SM, with up to 4 packs of x and 4 of residual each =
// up to 64 KB in flight per SM; a 768-wide bf16 row (3 packs a thread) keeps 24 KB (48 KB with
// a residual) in flight, above the ~14 KB Little's law asks of an H100 SM (~3 TB/s x ~600 ns /
// 132 SMs). The scalar edges cost at most 2 x 7 two-byte accesses a row.
//
// Backward: one persistent 512-thread block per SM (tx threads a row, 512 / tx rows at a time).
// grad_h is written per row; grad_weight / grad_bias are summed in registers over every row a
// thread visits, folded over the block's row groups in shared memory and written as ONE fp32
// partial row per block and gradient (132 SMs x 2 x 4096 cols x 4 B = 4.3 MB: L2-resident,
// written in full, so no memset, and none at all when neither gradient is wanted), then
// column_sum.cuh adds the partials in a fixed order (deterministic). The first pass issues its
// 2 x 4 pack loads per thread together (512 x 8 x 16 B = 64 KB in flight per SM); the second
// pass re-reads the same slice from L1. Widths or strides that are not pack multiples take
// scalar accesses here (the accumulators are per column, so every row must split alike). The
// phase walk of bias_act.cu (row_io's phase_period: a block takes rows of one 16-byte phase)
// would keep packs here too, but its 2 x 34 accumulators (head and tail slots added) next to
// the held rows spilled 0.1-1 KB a thread under the 128 registers of 512 threads; until that
// fits, these cases stay scalar. The partial rows are padded to 16 bytes for column_sum. Before: a read-modify-write of a global fp32 workspace row per row and
// gradient (16 B of extra traffic per element) into a memset 69 MB buffer at 4096 columns.
#include <cuda_runtime.h>

#include <algorithm>

#include "activations.cuh"
#include "column_sum.cuh"
#include "launch.cuh"
#include "row_io.cuh"
#include "fastlm/norms.h"

namespace fastlm::cuda {
namespace {

constexpr int kMaxThreads = 512;       // per row group: cols <= kMaxElems * 512
constexpr int kMaxElems = 32;          // row elements per thread (registers)
constexpr int kForwardThreads = 128;   // forward block: 128 / tx rows when a row takes < 128 threads
constexpr int kBackwardThreads = 512;  // backward block (one per SM): 512 / tx rows at a time

__host__ __device__ __forceinline__ int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Sum over the blockDim.x threads of one row group: xor shuffles within the group (a group of
// fewer than 32 threads is an aligned slice of its warp), then shared memory across warps
// (smem holds one slot per warp of the block, kMaxThreads / 32).
__device__ __forceinline__ float group_sum(float v, float* smem) {
  const int width = blockDim.x < 32 ? int(blockDim.x) : 32;
  for (int o = width / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
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

// acc += the same thread slot's acc of row groups 1..ty-1, in that order, into row group 0
// (folded: blockDim.x * blockDim.y * VEC floats). Uniform across the block.
template <int VEC>
__device__ __forceinline__ void fold_row_groups(float (&acc)[VEC], float* folded) {
  if (blockDim.y == 1) return;
  __syncthreads();  // the previous fold's reads are done
#pragma unroll
  for (int i = 0; i < VEC; ++i) folded[(threadIdx.y * blockDim.x + threadIdx.x) * VEC + i] = acc[i];
  __syncthreads();
  if (threadIdx.y != 0) return;
  for (int j = 1; j < int(blockDim.y); ++j) {
#pragma unroll
    for (int i = 0; i < VEC; ++i) acc[i] += folded[(j * blockDim.x + threadIdx.x) * VEC + i];
  }
}

template <int VEC>
__device__ __forceinline__ void store_floats(float* p, const float (&v)[VEC]) {
  Pack<float, VEC> pk;
#pragma unroll
  for (int i = 0; i < VEC; ++i) pk.v[i] = v[i];
  *reinterpret_cast<Pack<float, VEC>*>(p) = pk;
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

// One row group of TPR threads holds its row through row_io.cuh: K packs per thread plus one
// head and one tail element, so any width, stride and offset keeps 16-byte accesses for x and
// for every operand in phase with x (residual, h, y, weight, bias; scalars for one that isn't).
template <typename T, int TPR>
__global__ void __launch_bounds__(kMaxThreads, 1) forward_kernel(NormForwardArgs a) {
  FASTLM_SHARED(float, smem, [kMaxThreads / 32]);
  constexpr int K = kMaxElems / kVec<T>;
  using Row = Slots<T, TPR, K>;
  using Regs = Held<T, K>;
  const int64_t r = int64_t(blockIdx.x) * blockDim.y + threadIdx.y;
  const bool live = r < a.rows;  // no early return: group_sum may sync the block
  const int64_t cols = a.cols;
  const T* x_row = static_cast<const T*>(a.x) + (live ? r : 0) * a.x_stride;
  const Row row = whole_row<T, TPR, K>(split_row(x_row, live ? cols : 0), int(threadIdx.x));  // dead: holds nothing
  float v[Regs::kSlots];
  const Regs xs = row.load(x_row, true);
  if (a.residual) {
    const T* res_row = static_cast<const T*>(a.residual) + r * a.residual_stride;
    const Regs rs = row.load(res_row, same_phase(res_row, x_row));  // in flight with x
    row.for_each([&](int slot, int64_t) { v[slot] = to_float(from_float<T>(xs.at(slot) + rs.at(slot))); });  // h in T, as eager
    T* h_row = static_cast<T*>(a.h) + r * cols;
    if (live) row.store(h_row, same_phase(h_row, x_row), [&](int slot, int64_t) { return v[slot]; });
  } else {
    row.for_each([&](int slot, int64_t) { v[slot] = xs.at(slot); });
  }
  float sum = 0.0f;
  row.for_each([&](int slot, int64_t) { sum += v[slot]; });
  const float mean = a.rms ? 0.0f : group_sum(sum, smem) / float(cols);
  float sq = 0.0f;
  row.for_each([&](int slot, int64_t) { sq += (v[slot] - mean) * (v[slot] - mean); });
  const float rstd = rsqrtf(group_sum(sq, smem) / float(cols) + a.eps);
  if (!live) return;
  if (threadIdx.x == 0) {
    if (a.mean) a.mean[r] = mean;
    a.rstd[r] = rstd;
  }
  const T* weight = static_cast<const T*>(a.weight);
  const T* bias = a.rms ? nullptr : static_cast<const T*>(a.bias);
  Regs ws, bs;
  if (weight) ws = row.load(weight, same_phase(weight, x_row));
  if (bias) bs = row.load(bias, same_phase(bias, x_row));
  T* y_row = static_cast<T*>(a.y) + r * cols;
  row.store(y_row, same_phase(y_row, x_row), [&](int slot, int64_t) {
    float o = (v[slot] - mean) * rstd;
    if (weight) o *= ws.at(slot);
    if (bias) o += bs.at(slot);
    return o;
  });
}

// One block of kBackwardThreads per SM, persistent: row group y of block b handles rows
// (b + i gridDim.x) ty + y. grad_h is written per row; grad_weight / grad_bias are summed in
// registers over every row the thread visits (kAccs: 0 none wanted, 1 weight only, 2 weight
// and bias), folded over the block's row groups in shared memory, and written as one fp32
// partial row per block: partial (gridDim.x, kAccs, cols), every element written, so no memset.
template <typename T, int VEC, int kAccs>
__global__ void __launch_bounds__(kBackwardThreads, 1) backward_kernel(NormBackwardArgs a, float* partial, int64_t ld) {
  FASTLM_SHARED(float, smem, [kMaxThreads / 32]);
  FASTLM_SHARED(float, folded, [kBackwardThreads * 8]);
  constexpr int kPacks = kMaxElems / VEC;
  const int64_t cols = a.cols, stride = int64_t(blockDim.x) * VEC;
  const T* weight = static_cast<const T*>(a.weight);
  float acc_w[kPacks][VEC], acc_b[kPacks][VEC];
#pragma unroll
  for (int k = 0; k < kPacks; ++k) {
#pragma unroll
    for (int i = 0; i < VEC; ++i) acc_w[k][i] = acc_b[k][i] = 0.0f;
  }
  const int64_t row_blocks = ceil_div(a.rows, blockDim.y);
  for (int64_t rb = blockIdx.x; rb < row_blocks; rb += gridDim.x) {  // uniform per block: syncs line up
    const int64_t r = rb * blockDim.y + threadIdx.y;
    const bool live = r < a.rows;
    const float mean = (live && !a.rms) ? a.mean[r] : 0.0f, rstd = live ? a.rstd[r] : 0.0f;
    const T* gy_row = static_cast<const T*>(a.grad_y) + r * a.grad_y_stride;
    const T* h_row = static_cast<const T*>(a.h) + r * a.h_stride;
    float s1 = 0.0f, s2 = 0.0f;
#pragma unroll
    for (int k = 0; k < kPacks; ++k) {  // unrolled: the 2 kPacks loads of a row issue together
      const int64_t c = threadIdx.x * VEC + k * stride;
      if (!live || c >= cols) continue;
      float gy[VEC], h[VEC], w[VEC];
      load_pack<T, VEC>(gy_row + c, gy);
      load_pack<T, VEC>(h_row + c, h);
      if (weight) load_pack<T, VEC>(weight + c, w);
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        const float xhat = (h[i] - mean) * rstd;
        if (kAccs >= 1) acc_w[k][i] += gy[i] * xhat;
        if (kAccs == 2) acc_b[k][i] += gy[i];
        const float gw = weight ? gy[i] * w[i] : gy[i];
        s1 += xhat * gw;
        s2 += gw;
      }
    }
    const float c1 = group_sum(s1, smem) / float(cols);
    const float c2 = a.rms ? 0.0f : group_sum(s2, smem) / float(cols);
    // Second pass over the same addresses: the thread read them a moment ago, so they come
    // from L1 (a row group's slice is <= 64 KB), not DRAM. Not unrolled for scalars, where 32
    // in-flight elements next to the 64 accumulators would spill.
#pragma unroll(VEC == 1 ? 1 : kPacks)
    for (int k = 0; k < kPacks; ++k) {
      const int64_t c = threadIdx.x * VEC + k * stride;
      if (!live || c >= cols) continue;
      float gy[VEC], h[VEC], w[VEC], gs[VEC], d[VEC];
      load_pack<T, VEC>(gy_row + c, gy);
      load_pack<T, VEC>(h_row + c, h);
      if (weight) load_pack<T, VEC>(weight + c, w);
      if (a.grad_sum) load_pack<T, VEC>(static_cast<const T*>(a.grad_sum) + r * a.grad_sum_stride + c, gs);
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        const float xhat = (h[i] - mean) * rstd;
        const float gw = weight ? gy[i] * w[i] : gy[i];
        d[i] = rstd * (gw - xhat * c1 - c2) + (a.grad_sum ? gs[i] : 0.0f);
      }
      store_pack<T, VEC>(static_cast<T*>(a.grad_h) + r * cols + c, d);
    }
  }
  if (kAccs == 0) return;
  float* mine = partial + int64_t(blockIdx.x) * kAccs * ld;
#pragma unroll
  for (int k = 0; k < kPacks; ++k) {
    const int64_t c = threadIdx.x * VEC + k * stride;
    fold_row_groups<VEC>(acc_w[k], folded);
    if (threadIdx.y == 0 && c < cols) store_floats<VEC>(mine + c, acc_w[k]);
    if (kAccs == 2) {
      fold_row_groups<VEC>(acc_b[k], folded);
      if (threadIdx.y == 0 && c < cols) store_floats<VEC>(mine + ld + c, acc_b[k]);
    }
  }
}

struct Plan {
  int vec, tx, ty;
};

// 16-byte packs when every row start stays aligned, else scalars; threads per row (a power of
// two, 1..512) so each holds at most kMaxElems elements; rows per block to fill block_threads.
// tx depends on cols only, so the backward's grid and workspace are known from (rows, cols).
Plan make_plan(int64_t cols, int elem_bytes, bool aligned, int block_threads) {
  const int full = 16 / elem_bytes;
  const int vec = (aligned && cols % full == 0) ? full : 1;
  int tx = 1;
  while (tx < kMaxThreads && cols > int64_t(tx) * kMaxElems) tx *= 2;
  return Plan{vec, tx, std::max(1, block_threads / tx)};
}

bool aligned16(const void* p, int64_t stride_elems, int elem_bytes) {
  return p == nullptr || (reinterpret_cast<uintptr_t>(p) % 16 == 0 && (stride_elems * elem_bytes) % 16 == 0);
}

int elem_bytes(DType d) { return d == DType::kFloat32 ? 4 : 2; }

template <template <typename, int> class K, typename F>
void with_type_vec(DType dtype, int vec, F&& f) {
  auto go = [&](auto tag) {
    using T = decltype(tag);
    if (vec == kVec<T>) f(K<T, kVec<T>>{});
    else f(K<T, 1>{});
  };
  if (dtype == DType::kFloat32) go(float{});
  else if (dtype == DType::kFloat16) go(__half{});
  else go(__nv_bfloat16{});
}

// forward_kernel<T, tx> for the runtime (dtype, tx); tx >= 8 (row_io: one head and one tail
// element per thread).
template <typename T>
void launch_forward(const NormForwardArgs& a, int tx, dim3 grid, dim3 block, cudaStream_t s) {
  switch (tx) {
    case 8: return launch_kernel(forward_kernel<T, 8>, grid, block, 0, s, a);
    case 16: return launch_kernel(forward_kernel<T, 16>, grid, block, 0, s, a);
    case 32: return launch_kernel(forward_kernel<T, 32>, grid, block, 0, s, a);
    case 64: return launch_kernel(forward_kernel<T, 64>, grid, block, 0, s, a);
    case 128: return launch_kernel(forward_kernel<T, 128>, grid, block, 0, s, a);
    case 256: return launch_kernel(forward_kernel<T, 256>, grid, block, 0, s, a);
    default: return launch_kernel(forward_kernel<T, 512>, grid, block, 0, s, a);
  }
}

// Gradients summed over rows: 0 (none wanted), 1 (weight only), 2 (weight and/or bias).
int accumulated_grads(const NormBackwardArgs& a) { return a.grad_bias ? 2 : a.grad_weight ? 1 : 0; }

// fp32 partial rows padded to whole 16-byte packs (column_sum.cuh reads them 4 floats at a time).
int64_t partial_ld(int64_t cols) { return ceil_div(std::max<int64_t>(cols, 1), 4) * 4; }

template <typename T, int VEC>
struct Bwd {
  void launch(const NormBackwardArgs& a, float* partial, dim3 grid, dim3 block, cudaStream_t s) const {
    const int accs = accumulated_grads(a);
    const int64_t ld = partial_ld(a.cols);
    if (accs == 0) launch_kernel(backward_kernel<T, VEC, 0>, grid, block, 0, s, a, partial, ld);
    if (accs == 1) launch_kernel(backward_kernel<T, VEC, 1>, grid, block, 0, s, a, partial, ld);
    if (accs == 2) launch_kernel(backward_kernel<T, VEC, 2>, grid, block, 0, s, a, partial, ld);
    const int64_t parts = grid.x;
    if (a.grad_weight) launch_column_sum(partial, parts, accs * ld, a.cols, static_cast<T*>(a.grad_weight), s);
    if (a.grad_bias) launch_column_sum(partial + ld, parts, accs * ld, a.cols, static_cast<T*>(a.grad_bias), s);
  }
};

// Persistent backward grid: one kBackwardThreads block per SM (launch bounds allow no more),
// never more blocks than row blocks.
int64_t backward_blocks(int64_t rows, int64_t cols) {
  const Plan p = make_plan(cols, 4, false, kBackwardThreads);
  return std::max<int64_t>(1, std::min<int64_t>(ceil_div(rows, p.ty), sm_count()));
}

}  // namespace
}  // namespace fastlm::cuda

namespace fastlm {

int norm_forward_cuda(const NormForwardArgs& a, cudaStream_t stream) {
  using namespace cuda;
  Plan p = make_plan(a.cols, elem_bytes(a.dtype), true, kForwardThreads);  // p.vec unused: row_io splits each row
  if (a.cols > int64_t(p.tx) * kMaxElems) return int(cudaErrorInvalidValue);
  p.tx = std::max(p.tx, 8);
  p.ty = std::max(1, kForwardThreads / p.tx);
  const dim3 grid(unsigned(ceil_div(a.rows, p.ty))), block(unsigned(p.tx), unsigned(p.ty));
  if (a.dtype == DType::kFloat32) launch_forward<float>(a, p.tx, grid, block, stream);
  else if (a.dtype == DType::kFloat16) launch_forward<__half>(a, p.tx, grid, block, stream);
  else launch_forward<__nv_bfloat16>(a, p.tx, grid, block, stream);
  return int(cudaGetLastError());
}

int64_t norm_backward_cuda_workspace(int64_t rows, int64_t cols) {
  return cuda::backward_blocks(rows, cols) * 2 * cuda::partial_ld(cols);
}

int norm_backward_cuda(const NormBackwardArgs& a, float* workspace, cudaStream_t stream) {
  using namespace cuda;
  const int eb = elem_bytes(a.dtype);
  const bool aligned = aligned16(a.grad_y, a.grad_y_stride, eb) && aligned16(a.grad_sum, a.grad_sum_stride, eb) &&
                       aligned16(a.h, a.h_stride, eb) && aligned16(a.weight, 0, eb) && aligned16(a.grad_h, a.cols, eb);
  const Plan p = make_plan(a.cols, eb, aligned, kBackwardThreads);
  if (a.cols > int64_t(p.tx) * kMaxElems) return int(cudaErrorInvalidValue);
  if (accumulated_grads(a) > 0 && workspace == nullptr) return int(cudaErrorInvalidValue);
  const dim3 grid(unsigned(backward_blocks(a.rows, a.cols))), block(unsigned(p.tx), unsigned(p.ty));
  with_type_vec<Bwd>(a.dtype, p.vec, [&](auto k) { k.launch(a, workspace, grid, block, stream); });
  return int(cudaGetLastError());
}

}  // namespace fastlm
