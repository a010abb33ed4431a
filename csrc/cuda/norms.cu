// layer_norm / rms_norm on CUDA with the optional pre-norm residual add, for rows of any width,
// row stride and storage offset, with 16-byte accesses everywhere (row_io.cuh: a scalar head up
// to the anchor operand's 16-byte boundary, packs, a scalar tail; an operand out of phase with the
// anchor takes element accesses at its pack positions).
//
// Forward, rows <= 16384 (forward_kernel): a row belongs to a group of tx threads, tx the power of
// two (8..512) that leaves each thread at most 32 elements, so narrow rows share a warp (xor
// shuffles stay inside the aligned lane group) and wide rows get up to 16 warps; blockDim.y rows
// per block. Each thread holds its slice of h = x + residual in registers, so the row is read once
// and written once (h, y): two-pass fp32 statistics (mean, then centered variance) from registers
// with shuffles + shared memory, no atomics. All of a thread's loads of x and residual are issued
// before the first add: 128-thread blocks at 122-126 registers (no spills) = 4 blocks, 512 threads
// an SM, with up to 4 packs of x and 4 of residual each = up to 64 KB in flight per SM; a 768-wide
// bf16 row (3 packs a thread) keeps 24 KB (48 KB with a residual) in flight, above the ~14 KB
// Little's law asks of an H100 SM (~3 TB/s x ~600 ns / 132 SMs).
//
// Forward, rows > 16384 (long_forward_kernel): one 512-thread block a row, persistent over rows,
// the row streamed in chunks of 512 x K packs (K = 2 16-bit / 4 fp32: 16 elements a thread; at 32
// both passes spilled under the 128 registers of 512 threads). Pass 1 reads x (+ residual) from
// DRAM, writes h, and sums v - s, (v - s)^2 with s the row's first element (no E[v^2] - mean^2
// cancellation; see the kernel); pass 2 re-reads h (or x) and writes y. The re-read comes from
// L2 because the grid is capped at 24 MB / row bytes concurrent rows (L2: A100 40 MB, H100/H200
// 50 MB): DRAM traffic is the register kernel's (x [+ residual] read once, [h +] y written once)
// plus one L2 read of the row. In flight: 512 x K x 16 B = 16 KB a block for 16-bit, 32 KB for
// fp32 (twice that with a residual), one block an SM (116-123 registers). bf16 131072 (256 KB
// rows): 96 blocks x 16 KB = 1.5 MB in flight, fp32 131072: 48 x 32 KB = 1.5 MB, against the
// ~1.8 MB (H100) / ~2.9 MB (H200) Little's law asks: ~85 % (H100) estimated; at 262144 columns
// only 0.8 MB (~40 %): past ~128K columns the L2 cap, not the kernel, bounds the estimate
// (uncapped, pass 2 would read DRAM again: 1.5x the bytes). Not measured on a GPU.
//
// Forward, rows > 16384 on sm_90a (forward_cluster; cluster_launch.cuh, as softmax's): one
// cluster of S = max(2, ceil(row bytes / 128 KB)) <= 8 CTAs a row (rows up to 262144 fp32 /
// 524288 16-bit columns), 512 threads a CTA, each holding its slice of h (x + residual, in T) in
// shared memory, staged with 4 x 16-byte loads in flight per thread (x, then the residual): 32 KB
// in flight per SM at one 128 KB CTA an SM. The sum, then the centered squares from shared memory
// (two-pass), cross the cluster through DSMEM in rank order (deterministic); y is written from
// shared memory. DRAM: x (+ residual) read once, (h +) y written once, with no L2 re-read and no
// L2 cap on the rows in flight: 132 SMs x 32 KB = 4.2 MB in flight against the ~1.8 MB (H100) /
// ~2.9 MB (H200) Little's law asks, so the estimate is DRAM-bound at every width up to 8 slices
// (long_forward_kernel: ~40 % at 262144 columns). ptxas sm_90a: 70 registers (fp32), 86 (16-bit),
// no spills. Not measured on a GPU. Where no cluster fits (cudaOccupancyMaxActiveClusters) or the
// launch is refused, long_forward_kernel takes the rows.
//
// Backward, rows > 16384 on sm_90a whose every operand is 16-byte aligned in pointer and row
// stride and cols % VEC == 0 (backward_cluster): C = min(rows, cudaOccupancyMaxActiveClusters)
// persistent clusters of S = max(2, ceil(cols / 16384), ceil(2 x row bytes / 128 KB)) <= 8 CTAs
// (rows up to 131072 columns: 32 a thread), cluster k taking rows k, k + C, ...; rank q owns the
// same body packs of every row, so a thread sums grad_weight / grad_bias over its rows in
// registers (as backward_kernel) and each CTA writes its columns of the cluster's ONE fp32 partial
// row (C x 2 x cols x 4 B: 16 clusters of 8 at 131072 columns = 16 MB, L2-resident), which
// column_sum.cuh adds in a fixed order. A row: grad_y and h staged into shared memory (4 x 16-byte
// loads in flight per thread: 32 KB an SM), c1 and c2 summed from there and crossed through DSMEM
// (rank order), grad_h (+ grad_sum) written from shared memory. DRAM: grad_y, h (+ grad_sum) read
// once, grad_h written once, 3 (4) row-sized streams against the split pair's 5 (6): 0.6x the
// bytes. ptxas sm_90a: 90-122 registers (fp32), 91-126 (16-bit; at 2 + 2 packs staged into
// registers the bf16 both-gradient case spilled), no spills. Not measured on a GPU. Other layouts,
// no fitting cluster, or a refused launch take the split pair below (its workspace is planned
// alongside the cluster's, so a refusal at launch still fits).
//
// Backward, aligned rows <= 16384 (backward_kernel): one persistent 512-thread block per SM (tx
// threads a row, 512 / tx rows at a time). grad_h is written per row; grad_weight / grad_bias are
// summed in registers over every row a thread visits, folded over the block's row groups in
// shared memory and written as ONE fp32 partial row per block and gradient (132 SMs x 2 x 4096
// cols x 4 B = 4.3 MB: L2-resident, written in full, so no memset, and none at all when neither
// gradient is wanted), then column_sum.cuh adds the partials in a fixed order (deterministic).
// The first pass issues its 2 x 4 pack loads per thread together (512 x 8 x 16 B = 64 KB in
// flight per SM); the second pass re-reads the same slice from L1. It takes rows whose every
// operand (grad_y, grad_sum, h, weight, grad_h) is 16-byte aligned in pointer and row stride,
// since its per-column accumulators need every row to split alike.
//
// Backward, everything else (wider than 16384 without a cluster, or any width, stride or pointer
// off 16 bytes): a split pair, 16-byte accesses for every layout. row_sums_kernel streams each row
// (its own split, no per-column state) for c1 = mean(xhat gw), c2 = mean(gw) and writes 2 floats a
// row; column_tile_backward_kernel gives block (x, y) column tile x (128 threads x 2 packs of h's
// split; tile 0 also owns the head and tail elements) of the rows of one 16-byte phase q = y mod P
// (row_io's phase_period over every operand's row stride, P <= 8: those rows split alike, so a
// thread's slots are the same columns in every row), writes grad_h, and sums grad_weight /
// grad_bias per slot in registers into block row y's fp32 partial (each column written by exactly
// one tile: no memset); column_sum.cuh then adds the ~3 x SMs / tiles + P partial rows in a fixed
// order. Traffic: grad_y and h are read twice from DRAM (row sums, then tiles), so the pair moves 5
// (6 with grad_sum) element-bytes per element against the one-pass 3 (4): ~1.6x the bytes, at
// 16-byte accesses (before: element accesses for every unaligned case, ~20-30 % of copy bandwidth).
// In flight: row sums 512 threads x (grad_y, h, weight) x 4 packs x 16 B = 96 KB a block, one block
// an SM; tiles 3 blocks x 128 threads x (grad_y, h, grad_sum) x 2 packs x 16 B = 36 KB an SM (168
// registers: 2 x 18 sums next to 4 held operands; at 4 blocks, 128 registers, 16-bit spilled).
// Partials for 131072 bf16 columns: 64 tiles, 7 row parts x 2 x 512 KB = 7.3 MB.
#include <cuda_runtime.h>

#include <algorithm>

#include "activations.cuh"
#include "cluster_launch.cuh"
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

// The per-column gradient sums of the row-persistent backward kernels, zeroed.
template <int K, int VEC>
__device__ __forceinline__ void zero_sums(float (&w)[K][VEC], float (&b)[K][VEC]) {
#pragma unroll
  for (int k = 0; k < K; ++k) {
#pragma unroll
    for (int i = 0; i < VEC; ++i) w[k][i] = b[k][i] = 0.0f;
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
// VEC = kVec<T> only (16-byte packs): other layouts take the split pair below.
template <typename T, int VEC, int kAccs>
__global__ void __launch_bounds__(kBackwardThreads, 1) backward_kernel(NormBackwardArgs a, float* partial, int64_t ld) {
  FASTLM_SHARED(float, smem, [kMaxThreads / 32]);
  FASTLM_SHARED(float, folded, [kBackwardThreads * 8]);
  constexpr int kPacks = kMaxElems / VEC;
  const int64_t cols = a.cols, stride = int64_t(blockDim.x) * VEC;
  const T* weight = static_cast<const T*>(a.weight);
  float acc_w[kPacks][VEC], acc_b[kPacks][VEC];
  zero_sums(acc_w, acc_b);
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
    // from L1 (a row group's slice is <= 64 KB), not DRAM.
#pragma unroll
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

// ---------------------------------------------------------------- long rows: forward
// One kLongThreads block per row, persistent over rows r = blockIdx.x + i gridDim.x, the row
// streamed in chunks of kLongThreads x K packs (row_io's Slots; any width, stride and offset).
// Pass 1 reads x (+ residual), writes h, and sums v - s and (v - s)^2 with s the row's first
// element (a broadcast load): var = E[(v - s)^2] - E[v - s]^2 loses ~(mean - s)^2 / var ulps, a
// few for any s within a few standard deviations of the mean, where the unshifted E[v^2] -
// mean^2 loses mean^2 / var (a row at 1000 x its spread: 1e6 ulps). Pass 2 re-reads the row (h,
// or x without a residual) and writes y.
constexpr int kLongThreads = 512;
constexpr int kLongRowElems = kMaxElems / 2;  // per thread and chunk; at 32 both passes spilled

template <typename T>
__global__ void __launch_bounds__(kLongThreads, 1) long_forward_kernel(NormForwardArgs a) {
  FASTLM_SHARED(float, smem, [kMaxThreads / 32]);
  constexpr int K = kLongRowElems / kVec<T>;
  using Chunk = Slots<T, kLongThreads, K>;
  using Regs = Held<T, K>;
  constexpr int64_t kChunkPacks = int64_t(kLongThreads) * K;
  const int64_t cols = a.cols;
  const int lane = int(threadIdx.x);
  for (int64_t r = blockIdx.x; r < a.rows; r += gridDim.x) {  // uniform per block: syncs line up
    const T* x_row = static_cast<const T*>(a.x) + r * a.x_stride;
    const T* res_row = a.residual ? static_cast<const T*>(a.residual) + r * a.residual_stride : nullptr;
    T* h_row = a.residual ? static_cast<T*>(a.h) + r * cols : nullptr;
    const RowSplit split = split_row(x_row, cols);
    float shift = 0.0f;  // rms: none, its statistic is E[v^2] itself
    if (!a.rms) shift = res_row ? to_float(from_float<T>(to_float(x_row[0]) + to_float(res_row[0]))) : to_float(x_row[0]);
    float s1 = 0.0f, s2 = 0.0f;
    // One loop body per pass, not stream_row's peeled first chunk: two inlined copies of these
    // bodies spilled under the 128 registers of 512 threads.
#pragma unroll 1
    for (int64_t p0 = 0; p0 == 0 || p0 < split.packs; p0 += kChunkPacks) {
      const Chunk chunk{split, lane, p0, p0 == 0};
      const Regs xs = chunk.load(x_row, true);
      auto add = [&](float v) {
        s1 += v - shift;
        s2 += (v - shift) * (v - shift);
        return v;
      };
      if (res_row) {
        const Regs rs = chunk.load(res_row, same_phase(res_row, x_row));  // in flight with x
        chunk.store(h_row, same_phase(h_row, x_row), [&](int slot, int64_t) {
          return add(to_float(from_float<T>(xs.at(slot) + rs.at(slot))));  // h in T, as eager
        });
      } else {
        chunk.for_each([&](int slot, int64_t) { add(xs.at(slot)); });
      }
    }
    const float d = a.rms ? 0.0f : group_sum(s1, smem) / float(cols);  // mean - shift
    const float mean = shift + d;
    const float rstd = rsqrtf(fmaxf(group_sum(s2, smem) / float(cols) - d * d, 0.0f) + a.eps);
    if (lane == 0) {
      if (a.mean) a.mean[r] = mean;
      a.rstd[r] = rstd;
    }
    const T* src = res_row ? h_row : x_row;  // pass 2 re-reads the row this block just touched (L2)
    const T* weight = static_cast<const T*>(a.weight);
    const T* bias = a.rms ? nullptr : static_cast<const T*>(a.bias);
    T* y_row = static_cast<T*>(a.y) + r * cols;
#pragma unroll 1
    for (int64_t p0 = 0; p0 == 0 || p0 < split.packs; p0 += kChunkPacks) {
      const Chunk chunk{split, lane, p0, p0 == 0};
      const Regs vs = chunk.load(src, same_phase(src, x_row));
      Regs ws, bs;
      if (weight) ws = chunk.load(weight, same_phase(weight, x_row));
      if (bias) bs = chunk.load(bias, same_phase(bias, x_row));
      chunk.store(y_row, same_phase(y_row, x_row), [&](int slot, int64_t) {
        float o = (vs.at(slot) - mean) * rstd;
        if (weight) o *= ws.at(slot);
        if (bias) o += bs.at(slot);
        return o;
      });
    }
  }
}

// ---------------------------------------------------------------- sm_90a: long rows on a cluster
// forward_cluster: one cluster of S CTAs a row (cluster_launch.cuh's ClusterSlice of x's split:
// any width, stride and offset). Each CTA stages its slice of x into shared memory (16-byte loads,
// kStageLoads in flight a thread), adds the residual's (in x's phase: 16-byte loads, else
// elements) into h in T, as eager, and writes h; then its sum of h crosses the cluster (rank
// order), the centered squares are summed from shared memory (two-pass: no E[v^2] - mean^2
// cancellation; rms: the plain squares) and cross again, and y is written from shared memory.
template <typename T>
__global__ void __launch_bounds__(kClusterBlock, 1)
    forward_cluster(NormForwardArgs a, int64_t cols, int64_t slice_packs, int size) {
  using P = Pack<T, kVec<T>>;
  constexpr int V = kVec<T>;
  FASTLM_SHARED(float, smem, [kMaxThreads / 32]);
  FASTLM_SHARED(float, mine, [2]);                // this CTA's sum, then its centered squares
  FASTLM_SHARED(float, all, [2][kMaxCluster]);    // every rank's, fetched
  FASTLM_DYNAMIC_SHARED(float, slice_words);
  P* slice = reinterpret_cast<P*>(slice_words);
  const T* x = static_cast<const T*>(a.x);
  const ClusterSlice c = cluster_slice(x, a.x_stride, cols, slice_packs, size);
  const RowSplit& s = c.s;
  const int64_t r = c.row;
  const T* xr = x + r * a.x_stride;
  const int tid = threadIdx.x;
  stage_slice<true>(xr + s.head, slice, c.p0, c.p1);
  float edge = c.has_edge ? to_float(xr[c.edge_col]) : 0.0f;
  if (a.residual) {  // the thread adds to the packs it staged itself: no barrier
    const T* rr = static_cast<const T*>(a.residual) + r * a.residual_stride;
    T* hr = static_cast<T*>(a.h) + r * cols;
    const bool h_vec = same_phase(hr, xr);
    stage_packs(rr + s.head, same_phase(rr, xr), c.p0, c.p1, [&](int64_t p, const P& rv) {
      P hv = slice[p - c.p0];
#pragma unroll
      for (int j = 0; j < V; ++j) hv.v[j] = from_float<T>(to_float(hv.v[j]) + to_float(rv.v[j]));
      slice[p - c.p0] = hv;
      put_pack(hr + s.head, p, hv, h_vec);
    });
    if (c.has_edge) {
      const T he = from_float<T>(edge + to_float(rr[c.edge_col]));
      hr[c.edge_col] = he;
      edge = to_float(he);
    }
  }
  auto for_each = [&](auto&& f) {  // f(h) over this thread's elements
    if (c.has_edge) f(edge);
    for (int64_t p = c.p0 + tid; p < c.p1; p += kClusterBlock) {
      const P v = slice[p - c.p0];
#pragma unroll
      for (int j = 0; j < V; ++j) f(to_float(v.v[j]));
    }
  };
  float mean = 0.0f;  // rms: none
  if (!a.rms) {
    float sum = 0.0f;
    for_each([&](float v) { sum += v; });
    sum = group_sum(sum, smem);
    if (tid == 0) mine[0] = sum;
    cluster_gather(&mine[0], all[0], size, false);
    float total = 0.0f;
    for (int q = 0; q < size; ++q) total += all[0][q];
    mean = total / float(cols);
  }
  float sq = 0.0f;
  for_each([&](float v) { sq += (v - mean) * (v - mean); });
  sq = group_sum(sq, smem);
  if (tid == 0) mine[1] = sq;
  cluster_gather(&mine[1], all[1], size, true);
  float total = 0.0f;
  for (int q = 0; q < size; ++q) total += all[1][q];
  const float rstd = rsqrtf(total / float(cols) + a.eps);
  if (c.rank == 0 && tid == 0) {
    if (a.mean) a.mean[r] = mean;
    a.rstd[r] = rstd;
  }
  const T* weight = static_cast<const T*>(a.weight);
  const T* bias = a.rms ? nullptr : static_cast<const T*>(a.bias);
  T* yr = static_cast<T*>(a.y) + r * cols;
  const bool y_vec = same_phase(yr, xr), w_vec = same_phase(weight, xr), b_vec = same_phase(bias, xr);
#pragma unroll 2
  for (int64_t p = c.p0 + tid; p < c.p1; p += kClusterBlock) {
    const P v = slice[p - c.p0];
    P w, b, o;
    if (weight) w = get_pack(weight + s.head, p, w_vec);  // at pack p of x's split
    if (bias) b = get_pack(bias + s.head, p, b_vec);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      float f = (to_float(v.v[j]) - mean) * rstd;
      if (weight) f *= to_float(w.v[j]);
      if (bias) f += to_float(b.v[j]);
      o.v[j] = from_float<T>(f);
    }
    put_pack(yr + s.head, p, o, y_vec);
  }
  if (c.has_edge) {
    float f = (edge - mean) * rstd;
    if (weight) f *= to_float(weight[c.edge_col]);
    if (bias) f += to_float(bias[c.edge_col]);
    yr[c.edge_col] = from_float<T>(f);
  }
  sm90::cluster_wait();  // every CTA has fetched this one's sums: its shared memory may go
}

// backward_cluster: persistent clusters of S CTAs over rows (cluster k takes rows k, k + C, ...
// of C clusters), for rows whose every operand is 16-byte aligned in pointer and row stride and
// cols % VEC == 0 (no head or tail: every row splits alike). Rank q owns body packs
// [q P, (q + 1) P) (P <= kClusterBlock x K) of every row, thread t the packs p0 + t + k
// kClusterBlock, k < K: the same columns in every row, so grad_weight / grad_bias are summed in
// registers (K x VEC floats each, as backward_kernel's), and each CTA writes its columns of the
// cluster's ONE fp32 partial row at the end (no memset; column_sum.cuh adds the C rows in order).
// A row: grad_y and h staged into shared memory (read from DRAM once), the accumulators and the
// row sums c1, c2 taken from there, the (c1, c2) pairs crossing the cluster through DSMEM (rank
// order; the slot alternates by row parity), grad_h (+ grad_sum) written from shared memory.
template <typename T, int kAccs>
__global__ void __launch_bounds__(kClusterBlock, 1)
    backward_cluster(NormBackwardArgs a, float* partial, int64_t ld, int64_t slice_packs, int size) {
  using P = Pack<T, kVec<T>>;
  constexpr int V = kVec<T>, K = kMaxElems / V;
  FASTLM_SHARED(float, smem, [kMaxThreads / 32]);
  FASTLM_SHARED(float2, mine, [2]);             // this CTA's (s1, s2), by row parity
  FASTLM_SHARED(float2, all, [kMaxCluster]);    // every rank's, fetched
  FASTLM_DYNAMIC_SHARED(float, slice_words);
  P* gy_slice = reinterpret_cast<P*>(slice_words);
  P* h_slice = gy_slice + slice_packs;
  const int rank = int(blockIdx.x % unsigned(size)), tid = threadIdx.x;
  const int64_t cluster = blockIdx.x / unsigned(size), clusters = gridDim.x / unsigned(size);
  const int64_t cols = a.cols, p0 = int64_t(rank) * slice_packs, p1 = min(cols / V, p0 + slice_packs);
  const P* weight = static_cast<const P*>(a.weight);
  float acc_w[K][V], acc_b[K][V];
  zero_sums(acc_w, acc_b);
  int parity = 0;
  for (int64_t r = cluster; r < a.rows; r += clusters, parity ^= 1) {  // uniform per cluster: barriers line up
    const float mean = a.rms ? 0.0f : a.mean[r], rstd = a.rstd[r];
    // The thread's packs (p0 + t + k kClusterBlock, as stage_slice walks them) into shared
    // memory, kStageLoads in flight, then the sums over them from there: staged into registers
    // 2 + 2 packs at a time instead, the bf16 both-gradient case spilled.
    stage_slice<true>(static_cast<const T*>(a.grad_y) + r * a.grad_y_stride, gy_slice, p0, p1);
    stage_slice<true>(static_cast<const T*>(a.h) + r * a.h_stride, h_slice, p0, p1);
    float s1 = 0.0f, s2 = 0.0f;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int64_t p = p0 + tid + int64_t(k) * kClusterBlock;
      if (p >= p1) continue;
      const P gy = gy_slice[p - p0], hv = h_slice[p - p0];
      P w;
      if (weight) w = weight[p];
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const float g = to_float(gy.v[j]), xhat = (to_float(hv.v[j]) - mean) * rstd;
        if (kAccs >= 1) acc_w[k][j] += g * xhat;
        if (kAccs == 2) acc_b[k][j] += g;
        const float gw = weight ? g * to_float(w.v[j]) : g;
        s1 += xhat * gw;
        s2 += gw;
      }
    }
    s1 = group_sum(s1, smem);
    s2 = a.rms ? 0.0f : group_sum(s2, smem);
    if (tid == 0) mine[parity] = make_float2(s1, s2);
    cluster_gather(&mine[parity], all, size, false);
    float c1 = 0.0f, c2 = 0.0f;
    for (int q = 0; q < size; ++q) c1 += all[q].x, c2 += all[q].y;
    c1 /= float(cols);
    c2 /= float(cols);
    const P* gs_row = a.grad_sum ? reinterpret_cast<const P*>(static_cast<const T*>(a.grad_sum) + r * a.grad_sum_stride)
                                 : nullptr;
    P* gh_row = reinterpret_cast<P*>(static_cast<T*>(a.grad_h) + r * cols);
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int64_t p = p0 + tid + int64_t(k) * kClusterBlock;
      if (p >= p1) continue;
      const P gy = gy_slice[p - p0], hv = h_slice[p - p0];
      P w, gs, d;
      if (weight) w = weight[p];
      if (gs_row) gs = gs_row[p];
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const float g = to_float(gy.v[j]), xhat = (to_float(hv.v[j]) - mean) * rstd;
        const float gw = weight ? g * to_float(w.v[j]) : g;
        d.v[j] = from_float<T>(rstd * (gw - xhat * c1 - c2) + (gs_row ? to_float(gs.v[j]) : 0.0f));
      }
      gh_row[p] = d;
    }
  }
  sm90::cluster_sync();  // every CTA has fetched this one's last pair: its shared memory may go
  if (kAccs == 0) return;
  float* mine_w = partial + cluster * kAccs * ld;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const int64_t p = p0 + tid + int64_t(k) * kClusterBlock;
    if (p >= p1) continue;
    store_floats<V>(mine_w + p * V, acc_w[k]);
    if (kAccs == 2) store_floats<V>(mine_w + ld + p * V, acc_b[k]);
  }
}

// ---------------------------------------------------------------- split backward
// For rows the register backward can't take (wider than 16384, or any operand's width, stride or
// pointer off 16 bytes): a pair of kernels that keeps 16-byte accesses for every layout.
//
// row_sums_kernel: per row, c1 = mean(xhat gw) and c2 = mean(gw) (gw = grad_y weight), the
// row streamed by tx threads in chunks (any phase; no per-column state), written as 2 floats a
// row. tx threads a row as the forward plans them, blockDim.y rows a block.
constexpr int kRowSumThreads = 512;
constexpr int kRowSumPacks = 4;  // per chunk and operand: grad_y, h, weight = 12 x 16 B in flight a thread

template <typename T, int TPR>
__global__ void __launch_bounds__(kRowSumThreads, 1) row_sums_kernel(NormBackwardArgs a, float* row_sums) {
  FASTLM_SHARED(float, smem, [kMaxThreads / 32]);
  using Chunk = Slots<T, TPR, kRowSumPacks>;
  using Regs = Held<T, kRowSumPacks>;
  const int64_t r = int64_t(blockIdx.x) * blockDim.y + threadIdx.y;
  const bool live = r < a.rows;  // no early return: group_sum may sync the block
  const T* h_row = static_cast<const T*>(a.h) + (live ? r : 0) * a.h_stride;
  const T* gy_row = static_cast<const T*>(a.grad_y) + (live ? r : 0) * a.grad_y_stride;
  const T* weight = static_cast<const T*>(a.weight);
  const float mean = (live && !a.rms) ? a.mean[r] : 0.0f, rstd = live ? a.rstd[r] : 0.0f;
  float s1 = 0.0f, s2 = 0.0f;
  stream_row<T, TPR, kRowSumPacks>(split_row(h_row, live ? a.cols : 0), int(threadIdx.x), [&](const Chunk& chunk) {
    const Regs hs = chunk.load(h_row, true), gys = chunk.load(gy_row, same_phase(gy_row, h_row));
    Regs ws;
    if (weight) ws = chunk.load(weight, same_phase(weight, h_row));
    chunk.for_each([&](int slot, int64_t) {
      const float gw = weight ? gys.at(slot) * ws.at(slot) : gys.at(slot);
      s1 += (hs.at(slot) - mean) * rstd * gw;
      s2 += gw;
    });
  });
  const float c1 = group_sum(s1, smem) / float(a.cols);
  const float c2 = a.rms ? 0.0f : group_sum(s2, smem) / float(a.cols);
  if (live && threadIdx.x == 0) {
    row_sums[2 * r] = c1;
    row_sums[2 * r + 1] = c2;
  }
}

// column_tile_backward_kernel: block (x, y) owns the column tile x (kTileThreads x kTilePacks
// packs of h's split, tile 0 also the head and tail elements) of the rows of phase
// q = y % period (row_io's phase_period over every operand's row stride: those rows split alike,
// so a thread's slots are the same columns in every row it visits), rows q + period (part + i
// parts). It writes grad_h and sums grad_weight / grad_bias per slot in registers, then writes
// them as the block row y's partial (every column of a partial row is written by exactly one
// tile: no memset). Operands out of phase with h take element accesses at h's pack positions.
constexpr int kTileThreads = 128;
constexpr int kTilePacks = 2;  // grad_y, h, grad_sum: 6 x 16 B in flight a thread
constexpr int kTileBlocksPerSm = 3;  // 168 registers: 2 x 18 sums + 4 held operands (at 4 blocks, 128, 16-bit spilled)

template <typename T, int kAccs>
__global__ void __launch_bounds__(kTileThreads, kTileBlocksPerSm) column_tile_backward_kernel(NormBackwardArgs a, const float* row_sums,
                                                                               float* partial, int64_t ld, int period) {
  using Tile = Slots<T, kTileThreads, kTilePacks>;
  using Regs = Held<T, kTilePacks>;
  const int64_t cols = a.cols, q = blockIdx.y % period, parts = gridDim.y / period;
  const T* h_q = static_cast<const T*>(a.h) + q * a.h_stride;  // phase q's first row (maybe past the end: address only)
  const T* gy_q = static_cast<const T*>(a.grad_y) + q * a.grad_y_stride;
  const T* gs_q = a.grad_sum ? static_cast<const T*>(a.grad_sum) + q * a.grad_sum_stride : nullptr;
  T* gh_q = static_cast<T*>(a.grad_h) + q * cols;
  const bool gy_vec = same_phase(gy_q, h_q), gs_vec = gs_q && same_phase(gs_q, h_q), gh_vec = same_phase(gh_q, h_q);
  const Tile tile{split_row(h_q, cols), int(threadIdx.x), int64_t(blockIdx.x) * kTileThreads * kTilePacks,
                  blockIdx.x == 0};
  const T* weight = static_cast<const T*>(a.weight);
  Regs ws;
  if (weight) ws = tile.load(weight, same_phase(weight, h_q));  // once, for every row
  float acc_w[Regs::kSlots], acc_b[Regs::kSlots];
#pragma unroll
  for (int i = 0; i < Regs::kSlots; ++i) acc_w[i] = acc_b[i] = 0.0f;
  for (int64_t r = q + period * int64_t(blockIdx.y / period); r < a.rows; r += period * parts) {
    const int64_t dr = r - q;  // the row's offset from phase q's first row
    const float mean = a.rms ? 0.0f : a.mean[r], rstd = a.rstd[r];
    const float c1 = row_sums[2 * r], c2 = row_sums[2 * r + 1];
    const Regs hs = tile.load(h_q + dr * a.h_stride, true), gys = tile.load(gy_q + dr * a.grad_y_stride, gy_vec);
    Regs gss;
    if (gs_q) gss = tile.load(gs_q + dr * a.grad_sum_stride, gs_vec);
    tile.store(gh_q + dr * cols, gh_vec, [&](int slot, int64_t) {
      const float gy = gys.at(slot), xhat = (hs.at(slot) - mean) * rstd;
      const float gw = weight ? gy * ws.at(slot) : gy;
      if (kAccs >= 1) acc_w[slot] += gy * xhat;
      if (kAccs == 2) acc_b[slot] += gy;
      return rstd * (gw - xhat * c1 - c2) + (gs_q ? gss.at(slot) : 0.0f);
    });
  }
  if (kAccs == 0) return;
  float* mine = partial + int64_t(blockIdx.y) * kAccs * ld;
  tile.for_each([&](int slot, int64_t c) {
    mine[c] = acc_w[slot];
    if (kAccs == 2) mine[ld + c] = acc_b[slot];
  });
}

struct Plan {
  int tx, ty;
};

// Threads per row (a power of two, min_tx..512) so each holds at most kMaxElems elements; rows per
// block to fill block_threads. Kernels on row_io's Slots take min_tx = 8 (one head and one tail
// element per thread); the register backward's packs need no edges, so narrow rows take 1 thread.
Plan make_plan(int64_t cols, int block_threads, int min_tx) {
  int tx = min_tx;
  while (tx < kMaxThreads && cols > int64_t(tx) * kMaxElems) tx *= 2;
  return Plan{tx, std::max(1, block_threads / tx)};
}

bool aligned16(const void* p, int64_t stride_elems, int elem_bytes) {
  return p == nullptr || (reinterpret_cast<uintptr_t>(p) % 16 == 0 && (stride_elems * elem_bytes) % 16 == 0);
}

int elem_bytes(DType d) { return d == DType::kFloat32 ? 4 : 2; }

template <typename F>
void with_type(DType dtype, F&& f) {
  if (dtype == DType::kFloat32) f(float{});
  else if (dtype == DType::kFloat16) f(__half{});
  else f(__nv_bfloat16{});
}

// kernel<T, tx> for the runtime tx (a power of two, 8..512).
#define FASTLM_NORMS_BY_TX(kernel, T, tx, ...)                                              \
  switch (tx) {                                                                               \
    case 8: return launch_kernel(kernel<T, 8>, __VA_ARGS__);                                  \
    case 16: return launch_kernel(kernel<T, 16>, __VA_ARGS__);                                \
    case 32: return launch_kernel(kernel<T, 32>, __VA_ARGS__);                                \
    case 64: return launch_kernel(kernel<T, 64>, __VA_ARGS__);                                \
    case 128: return launch_kernel(kernel<T, 128>, __VA_ARGS__);                              \
    case 256: return launch_kernel(kernel<T, 256>, __VA_ARGS__);                              \
    default: return launch_kernel(kernel<T, 512>, __VA_ARGS__);                               \
  }

template <typename T>
void launch_forward(const NormForwardArgs& a, int tx, dim3 grid, dim3 block, cudaStream_t s) {
  FASTLM_NORMS_BY_TX(forward_kernel, T, tx, grid, block, 0, s, a)
}

template <typename T>
void launch_row_sums(const NormBackwardArgs& a, float* row_sums, int tx, dim3 grid, dim3 block, cudaStream_t s) {
  FASTLM_NORMS_BY_TX(row_sums_kernel, T, tx, grid, block, 0, s, a, row_sums)
}

// Rows of up to kMaxElems x kMaxThreads elements are held in registers; longer ones stream.
bool held_in_registers(int64_t cols) { return cols <= int64_t(kMaxElems) * kMaxThreads; }

// Concurrent long rows are capped so the rows the blocks re-read in pass 2 stay in L2 (A100 40 MB,
// H100/H200 50 MB; the rest of L2 takes the streaming writes).
constexpr int64_t kLongRowL2Bytes = int64_t(24) << 20;

int64_t long_forward_blocks(int64_t rows, int64_t cols, int elem_bytes) {
  const int64_t by_l2 = std::max<int64_t>(1, kLongRowL2Bytes / (cols * elem_bytes));
  return std::max<int64_t>(1, std::min({rows, int64_t(sm_count()), by_l2}));
}

// Gradients summed over rows: 0 (none wanted), 1 (weight only), 2 (weight and/or bias).
int accumulated_grads(const NormBackwardArgs& a) { return a.grad_bias ? 2 : a.grad_weight ? 1 : 0; }

// fp32 partial rows padded to whole 16-byte packs (column_sum.cuh reads them 4 floats at a time).
int64_t partial_ld(int64_t cols) { return ceil_div(std::max<int64_t>(cols, 1), 4) * 4; }

// The cluster backward's kernel for these gradients.
using BackwardClusterKernel = void (*)(NormBackwardArgs, float*, int64_t, int64_t, int);
template <typename T>
BackwardClusterKernel backward_cluster_for(int64_t accs) {
  return accs == 0 ? backward_cluster<T, 0> : accs == 1 ? backward_cluster<T, 1> : backward_cluster<T, 2>;
}

// Which backward serves a call, its grid, and the workspace it needs (the binding allocates
// exactly this, so the two can't disagree): the register kernel takes rows it can hold whose
// every operand is 16-byte aligned in pointer and row stride; longer rows of that layout (with
// cols % VEC == 0) take a cluster on sm_90a where one fits; the split pair takes the rest, and
// the cluster's rows too should the device refuse it at launch (the workspace fits either).
struct BackwardPlan {
  bool split;
  int64_t blocks;         // register kernel: persistent blocks; split: row parts (period x per phase)
  int64_t tiles, period;  // split: column tiles, rows between two rows of one 16-byte phase
  int64_t row_sum_floats; // split: 2 floats a row, padded to 16 bytes (the partials follow)
  int64_t ld, accs;
  BackwardClusterKernel cluster_kernel;
  int cluster_size;       // 0: no cluster
  int64_t clusters, slice_packs;
  int64_t workspace() const {
    const int64_t own = row_sum_floats + blocks * accs * ld;
    return cluster_size ? std::max(own, clusters * accs * ld) : own;
  }
};

// Persistent clusters for the backward: grad_y and h held (2 operands), and at most kMaxElems
// columns a thread (the register accumulators), as many clusters as the device holds at once.
void plan_backward_cluster(const NormBackwardArgs& a, BackwardPlan& b) {
  const int vec = 16 / elem_bytes(a.dtype);
  with_type(a.dtype, [&](auto t) { b.cluster_kernel = backward_cluster_for<decltype(t)>(b.accs); });
  const int64_t packs = a.cols / vec;
  const int size = cluster_size_for(b.cluster_kernel, 2 * packs * 16, 1, ceil_div(a.cols, int64_t(kClusterBlock) * kMaxElems));
  if (size == 0 || !cluster_fits(b.cluster_kernel, size)) return;
  b.slice_packs = ceil_div(packs, size);
  const int held = clusters_held(b.cluster_kernel, size, size_t(2 * b.slice_packs * 16));
  b.clusters = std::min<int64_t>(a.rows, held);
  if (b.clusters > 0 && b.clusters * size <= INT32_MAX) b.cluster_size = size;
}

BackwardPlan plan_backward(const NormBackwardArgs& a) {
  const int eb = elem_bytes(a.dtype);
  const bool aligned = aligned16(a.grad_y, a.grad_y_stride, eb) && aligned16(a.grad_sum, a.grad_sum_stride, eb) &&
                       aligned16(a.h, a.h_stride, eb) && aligned16(a.weight, 0, eb) && aligned16(a.grad_h, a.cols, eb);
  BackwardPlan b{};
  b.ld = partial_ld(a.cols);
  b.accs = accumulated_grads(a);
  b.split = !(aligned && a.cols % (16 / eb) == 0 && held_in_registers(a.cols));
  if (!b.split) {
    b.blocks = std::max<int64_t>(1, std::min<int64_t>(ceil_div(a.rows, make_plan(a.cols, kBackwardThreads, 1).ty), sm_count()));
    return b;
  }
  if (aligned && a.cols % (16 / eb) == 0) plan_backward_cluster(a, b);
  b.period = phase_period(eb, {a.grad_y_stride, a.h_stride, a.grad_sum ? a.grad_sum_stride : 0, a.cols});
  b.tiles = std::max<int64_t>(1, ceil_div(a.cols / (16 / eb), int64_t(kTileThreads) * kTilePacks));
  // a wave of blocks in all, never more parts than a phase has rows
  const int64_t per_phase = std::min(ceil_div(ceil_div(int64_t(sm_count()) * kTileBlocksPerSm, b.tiles), b.period),
                                     ceil_div(a.rows, b.period));
  b.blocks = b.period * std::max<int64_t>(1, per_phase);
  b.row_sum_floats = ceil_div(2 * a.rows, 4) * 4;
  return b;
}

template <typename T>
void launch_backward(const NormBackwardArgs& a, const BackwardPlan& b, float* ws, cudaStream_t s) {
  const int64_t ld = b.ld, step = b.accs * ld;
  if (b.cluster_size && launch_on_cluster(b.cluster_kernel, b.clusters, b.cluster_size, size_t(2 * b.slice_packs * 16), s,
                                          a, ws, ld, b.slice_packs, b.cluster_size)) {
    if (a.grad_weight) launch_column_sum(ws, b.clusters, step, a.cols, static_cast<T*>(a.grad_weight), s);
    if (a.grad_bias) launch_column_sum(ws + ld, b.clusters, step, a.cols, static_cast<T*>(a.grad_bias), s);
    return;
  }
  float* partial = ws + b.row_sum_floats;
  if (!b.split) {
    constexpr int V = kVec<T>;
    const Plan p = make_plan(a.cols, kBackwardThreads, 1);
    const dim3 grid(unsigned(b.blocks)), block(unsigned(p.tx), unsigned(p.ty));
    if (b.accs == 0) launch_kernel(backward_kernel<T, V, 0>, grid, block, 0, s, a, partial, ld);
    if (b.accs == 1) launch_kernel(backward_kernel<T, V, 1>, grid, block, 0, s, a, partial, ld);
    if (b.accs == 2) launch_kernel(backward_kernel<T, V, 2>, grid, block, 0, s, a, partial, ld);
  } else {
    const Plan p = make_plan(std::min<int64_t>(a.cols, int64_t(kMaxElems) * kMaxThreads), kRowSumThreads, 8);
    launch_row_sums<T>(a, ws, p.tx, dim3(unsigned(ceil_div(a.rows, p.ty))), dim3(p.tx, p.ty), s);
    const dim3 grid(unsigned(b.tiles), unsigned(b.blocks)), block(kTileThreads);
    const int period = int(b.period);
    if (b.accs == 0) launch_kernel(column_tile_backward_kernel<T, 0>, grid, block, 0, s, a, ws, partial, ld, period);
    if (b.accs == 1) launch_kernel(column_tile_backward_kernel<T, 1>, grid, block, 0, s, a, ws, partial, ld, period);
    if (b.accs == 2) launch_kernel(column_tile_backward_kernel<T, 2>, grid, block, 0, s, a, ws, partial, ld, period);
  }
  if (a.grad_weight) launch_column_sum(partial, b.blocks, step, a.cols, static_cast<T*>(a.grad_weight), s);
  if (a.grad_bias) launch_column_sum(partial + ld, b.blocks, step, a.cols, static_cast<T*>(a.grad_bias), s);
}

}  // namespace
}  // namespace fastlm::cuda

namespace fastlm {

int norm_forward_cuda(const NormForwardArgs& a, cudaStream_t stream) {
  using namespace cuda;
  const int eb = elem_bytes(a.dtype);
  if (!held_in_registers(a.cols)) {  // on a cluster (sm_90a, where one fits), else streamed
    const dim3 grid(unsigned(long_forward_blocks(a.rows, a.cols, eb))), block(kLongThreads);
    with_type(a.dtype, [&](auto t) {
      using T = decltype(t);
      if (!rows_on_cluster<T>(forward_cluster<T>, 1, a.rows, a.cols, stream, a))
        launch_kernel(long_forward_kernel<T>, grid, block, 0, stream, a);
    });
    return int(cudaGetLastError());
  }
  const Plan p = make_plan(a.cols, kForwardThreads, 8);
  const dim3 grid(unsigned(ceil_div(a.rows, p.ty))), block(unsigned(p.tx), unsigned(p.ty));
  with_type(a.dtype, [&](auto t) { launch_forward<decltype(t)>(a, p.tx, grid, block, stream); });
  return int(cudaGetLastError());
}

int64_t norm_backward_cuda_workspace(const NormBackwardArgs& a) { return cuda::plan_backward(a).workspace(); }

int norm_backward_cuda(const NormBackwardArgs& a, float* workspace, cudaStream_t stream) {
  using namespace cuda;
  const BackwardPlan b = plan_backward(a);
  if (b.workspace() > 0 && workspace == nullptr) return int(cudaErrorInvalidValue);
  with_type(a.dtype, [&](auto t) { launch_backward<decltype(t)>(a, b, workspace, stream); });
  return int(cudaGetLastError());
}

}  // namespace fastlm
