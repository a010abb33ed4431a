// The MoE router on CUDA, forward and backward (semantics: csrc/cpu/moe_router.cpp and
// fastlm/ops/moe_router.py). A warp owns a token row: its lanes stride over the E experts
// (expert e lives with lane e % 32, in a per-warp shared row), so scores, softmax statistics and
// the k top-k rounds never need a barrier: each round is one pass over a lane's E/32 scores plus
// a 5-step shuffle argmax (ties to the lower expert, NaN first, as the CPU's ordering). The row is
// read from global memory once (any strides, fp32/fp16/bf16; the sigmoid backward reads it twice),
// everything after is fp32 in shared memory: (4 + k) E/32 shared reads per lane and 10 + 10 k
// shuffles per row, 24 and 90 for E=64, k=8; 2E bytes in (bf16), 8k bytes out per token.
//
// What needs all rows (aux loss's counts and mean probabilities, z loss, GShard capacity) is
// reduced without float atomics, so results are the same run to run:
//   1. route_rows: per chunk of 128 rows, the selections; integer atomics count (slot, expert)
//      picks per chunk; the chunk's probability sums and z sum are reduced in a fixed order.
//   2. scan_columns: a warp per column of the per-chunk table: an exclusive scan of each
//      (slot, expert) count over the chunks (where a chunk's ranks start), totals, and the
//      fixed-order sums of the probability and z partials.
//   3. finish: a block per chunk ranks each assignment slot-major (earlier slots' totals + the
//      chunk's start + earlier rows of this chunk, found in shared memory) and drops it iff its
//      rank reaches the capacity, which is the CPU's sequential scan done in parallel; block 0
//      writes counts and the losses (forward) or d aux / d p (backward).
// The backward runs 1-3 again on the logits (nothing saved) and then a warp per row applies the
// chain rule of moe_spec.md in fp32. No step reads device values on the host: 3-4 launches and
// one memset per call, whatever the routing.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "activations.cuh"
#include "fastlm/moe.h"
#include "launch.cuh"

namespace fastlm::cuda {
namespace {

constexpr int kWarps = 4, kThreads = kWarps * 32;
constexpr int kRowsPerChunk = 128;  // rows per block of route_rows and finish (one per finish thread)
constexpr int kNoExpert = 0x7fffffff;
constexpr float kTaken = -1.0f;  // marks a chosen score: real scores are >= 0 or NaN

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}

// The top-k order: NaN before everything, then descending score, then ascending expert.
__device__ __forceinline__ bool ranks_before(float a, int ai, float b, int bi) {
  const bool an = a != a, bn = b != b;
  if (an || bn) return an != bn ? an : ai < bi;
  return a != b ? a > b : ai < bi;
}

// Where the per-chunk tables live in the workspace (sizes in elements; each part 16-byte aligned).
struct Workspace {
  int32_t* picks;      // [k * E][chunks]: (slot, expert) picks per chunk, then each chunk's start
  int32_t* totals;     // [k * E]: picks per (slot, expert) over all rows
  float* prob;         // [E][chunks]: the chunk's sum of p over its rows
  float* z;            // [chunks]: the chunk's sum of lse^2
  float* prob_sum;     // [E]
  float* z_sum;        // [1]
  int32_t* selected;   // [T * k]: the selection before capacity
  int32_t* routed;     // [T * k]: backward: after capacity, a dropped expert e as ~e
  float* dp;           // [E]: backward: d loss / d p_te (the same for every row)
};

inline size_t align16(size_t bytes) { return (bytes + 15) & ~size_t(15); }

struct Layout {
  size_t offsets[9];
  size_t bytes;
  explicit Layout(const MoeRouterArgs& a) {
    const size_t T = size_t(a.tokens), E = size_t(a.experts), k = size_t(a.top_k);
    const size_t chunks = (T + kRowsPerChunk - 1) / kRowsPerChunk;
    const size_t sizes[9] = {4 * k * E * chunks, 4 * k * E, 4 * E * chunks, 4 * chunks, 4 * E, 4, 4 * T * k,
                             4 * T * k, 4 * E};
    bytes = 0;
    for (int i = 0; i < 9; ++i) {
      offsets[i] = bytes;
      bytes += align16(sizes[i]);
    }
  }
  Workspace carve(void* base) const {
    char* b = static_cast<char*>(base);
    return Workspace{reinterpret_cast<int32_t*>(b + offsets[0]), reinterpret_cast<int32_t*>(b + offsets[1]),
                     reinterpret_cast<float*>(b + offsets[2]),   reinterpret_cast<float*>(b + offsets[3]),
                     reinterpret_cast<float*>(b + offsets[4]),   reinterpret_cast<float*>(b + offsets[5]),
                     reinterpret_cast<int32_t*>(b + offsets[6]), reinterpret_cast<int32_t*>(b + offsets[7]),
                     reinterpret_cast<float*>(b + offsets[8])};
  }
};

struct Shape {
  int64_t tokens;
  int experts, top_k, chunks;
  bool sigmoid, normalize;
  int64_t capacity;
};

struct RowStats {
  float m, inv_sum, lse;  // max logit, 1 / sum exp(l - m), logsumexp
};

// Fills this lane's entries of s (the warp's shared row) with the scores; returns the softmax
// statistics. NaN propagates: fmaxf skips it, exp brings it back into the sum.
template <typename T>
__device__ __forceinline__ RowStats score_row(const T* __restrict__ row, int64_t stride, int E, bool sigmoid,
                                              float* s) {
  const int lane = threadIdx.x % 32;
  float m = -INFINITY;
  for (int e = lane; e < E; e += 32) {
    const float l = to_float(row[e * stride]);
    s[e] = l;
    m = fmaxf(m, l);
  }
  m = warp_max(m);
  float sum = 0.0f;
  for (int e = lane; e < E; e += 32) sum += expf(s[e] - m);
  sum = warp_sum(sum);
  const float inv = 1.0f / sum;
  for (int e = lane; e < E; e += 32) {
    const float l = s[e];
    s[e] = sigmoid ? 1.0f / (1.0f + expf(-l)) : expf(l - m) * inv;
  }
  return RowStats{m, inv, m + logf(sum)};
}

// Forward pass 1. A warp per row, 32 rows per warp, one chunk of 128 rows per block. Writes the
// selection (selected), weights (normalized, before capacity; null in the backward), counts picks
// per chunk, and the chunk's probability and z sums. Dynamic shared memory: 2 * kWarps * E floats.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    route_rows_kernel(Shape sh, const T* __restrict__ logits, int64_t ls0, int64_t ls1, Workspace ws,
                      float* __restrict__ weights) {
  FASTLM_DYNAMIC_SHARED(float, smem);
  FASTLM_SHARED(float, z_of_warp, [kWarps]);
  const int E = sh.experts, k = sh.top_k, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int chunk = blockIdx.x;
  float* s = smem + warp * E;                  // this warp's row of scores
  float* acc = smem + (kWarps + warp) * E;     // this warp's running sum of p per expert
  for (int e = lane; e < E; e += 32) acc[e] = 0.0f;
  float z = 0.0f;
  const int64_t first = int64_t(chunk) * kRowsPerChunk;
  for (int i = warp; i < kRowsPerChunk; i += kWarps) {
    const int64_t t = first + i;
    if (t >= sh.tokens) break;
    const RowStats st = score_row(logits + t * ls0, ls1, E, sh.sigmoid, s);
    z += st.lse * st.lse;
    // p: the softmax itself, or the sigmoid scores normalized over the row.
    if (sh.sigmoid) {
      float v = 0.0f;
      for (int e = lane; e < E; e += 32) v += s[e];
      const float total = warp_sum(v);
      for (int e = lane; e < E; e += 32) acc[e] += s[e] / total;
    } else {
      for (int e = lane; e < E; e += 32) acc[e] += s[e];
    }
    // k rounds of warp argmax; a chosen score is marked taken by its owner lane.
    float sum = 0.0f;
    for (int r = 0; r < k; ++r) {
      float bv = kTaken;
      int bi = kNoExpert;
      for (int e = lane; e < E; e += 32) {
        const float v = s[e];
        if (!(v < 0.0f) && ranks_before(v, e, bv, bi)) {
          bv = v;
          bi = e;
        }
      }
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, bv, off);
        const int oi = __shfl_xor_sync(0xffffffffu, bi, off);
        if (ranks_before(ov, oi, bv, bi)) {
          bv = ov;
          bi = oi;
        }
      }
      sum += bv;  // the CPU's order: selection order
      if (bi % 32 == lane) s[bi] = kTaken;
      if (r % 32 == lane) {
        ws.selected[t * k + r] = bi;
        if (weights) weights[t * k + r] = bv;
        atomicAdd(&ws.picks[(int64_t(r) * E + bi) * sh.chunks + chunk], 1);  // integers: order-free
      }
    }
    if (weights && sh.normalize)
      for (int r = lane; r < k; r += 32) weights[t * k + r] /= sum;  // this lane wrote them above
  }
  if (lane == 0) z_of_warp[warp] = z;
  __syncthreads();
  for (int e = threadIdx.x; e < E; e += kThreads) {
    float p = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) p += smem[(kWarps + w) * E + e];
    ws.prob[int64_t(e) * sh.chunks + chunk] = p;
  }
  if (threadIdx.x == 0) {
    float zc = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) zc += z_of_warp[w];
    ws.z[chunk] = zc;
  }
}

// Pass 2: a warp per column. Columns [0, k*E): exclusive scan of picks over the chunks (in place)
// and its total; [k*E, k*E + E): the sum of prob over chunks; k*E + E: the sum of z. Float sums
// go lane-strided then through a fixed shuffle tree: the same order every run.
__global__ void __launch_bounds__(kThreads) scan_columns_kernel(Shape sh, Workspace ws) {
  const int lane = threadIdx.x % 32;
  const int64_t column = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int64_t count_columns = int64_t(sh.top_k) * sh.experts, n = sh.chunks;
  if (column < count_columns) {
    int32_t* c = ws.picks + column * n;
    int32_t carry = 0;
    for (int64_t base = 0; base < n; base += 32) {
      const int64_t i = base + lane;
      const int32_t v = i < n ? c[i] : 0;
      int32_t inclusive = v;
#pragma unroll
      for (int off = 1; off < 32; off <<= 1) {
        const int32_t o = __shfl_up_sync(0xffffffffu, inclusive, off);
        if (lane >= off) inclusive += o;
      }
      if (i < n) c[i] = carry + inclusive - v;
      carry += __shfl_sync(0xffffffffu, inclusive, 31);
    }
    if (lane == 0) ws.totals[column] = carry;
  } else if (column <= count_columns + sh.experts) {
    const bool is_z = column == count_columns + sh.experts;
    const float* c = is_z ? ws.z : ws.prob + (column - count_columns) * n;
    float v = 0.0f;
    for (int64_t i = lane; i < n; i += 32) v += c[i];
    v = warp_sum(v);
    if (lane == 0) *(is_z ? ws.z_sum : ws.prob_sum + (column - count_columns)) = v;
  }
}

// Pass 3. Block b ranks chunk b's assignments slot-major and applies the capacity: routed gets
// the expert, or -1 (forward; its weight becomes 0) / ~expert (backward) when dropped. With no
// capacity only block 0 runs. Block 0 also writes counts and the losses (forward, non-null) or
// dp (backward, non-null; grad_aux read on the device).
__global__ void __launch_bounds__(kRowsPerChunk)
    finish_kernel(Shape sh, Workspace ws, int32_t* __restrict__ routed, bool mark_dropped_expert,
                  float* __restrict__ weights, int32_t* __restrict__ counts, float* __restrict__ aux_loss,
                  float* __restrict__ z_loss, const float* __restrict__ grad_aux) {
  FASTLM_SHARED(int32_t, column, [kRowsPerChunk]);
  FASTLM_SHARED(float, aux_of_warp, [kRowsPerChunk / 32]);
  const int E = sh.experts, k = sh.top_k, i = threadIdx.x, lane = i % 32, warp = i / 32;
  const int64_t T = sh.tokens, t = int64_t(blockIdx.x) * kRowsPerChunk + i;
  if (sh.capacity >= 0) {
    for (int slot = 0; slot < k; ++slot) {
      const int32_t e = t < T ? ws.selected[t * k + slot] : -1;
      column[i] = e;
      __syncthreads();
      if (t < T) {
        int64_t rank = ws.picks[(int64_t(slot) * E + e) * sh.chunks + blockIdx.x];  // earlier chunks
        for (int s = 0; s < slot; ++s) rank += ws.totals[int64_t(s) * E + e];    // earlier slots
        for (int j = 0; j < i; ++j) rank += column[j] == e;                       // earlier rows here
        const bool kept = rank < sh.capacity;
        routed[t * k + slot] = kept ? e : (mark_dropped_expert ? ~e : -1);
        if (!kept && weights) weights[t * k + slot] = 0.0f;
      }
      __syncthreads();  // column is rewritten for the next slot
    }
  }
  if (blockIdx.x != 0) return;
  const float inv_t = 1.0f / float(T);
  float aux = 0.0f;
  for (int e = i; e < E; e += kRowsPerChunk) {
    int64_t picked = 0;
    for (int s = 0; s < k; ++s) picked += ws.totals[int64_t(s) * E + e];
    const float f = float(picked) * inv_t;
    if (counts) counts[e] = int32_t(sh.capacity >= 0 && picked > sh.capacity ? sh.capacity : picked);
    if (grad_aux) ws.dp[e] = *grad_aux * float(E) * f * inv_t;
    aux += f * (ws.prob_sum[e] * inv_t);
  }
  if (!aux_loss) return;
  aux = warp_sum(aux);
  if (lane == 0) aux_of_warp[warp] = aux;
  __syncthreads();
  if (i == 0) {
    float total = 0.0f;
#pragma unroll
    for (int w = 0; w < kRowsPerChunk / 32; ++w) total += aux_of_warp[w];
    *aux_loss = float(E) * total;
    *z_loss = *ws.z_sum * inv_t;
  }
}

// Backward: a warp per row. s and ds live in the warp's shared rows; routed holds the selection
// with drops as ~e (a dropped expert still takes part in the normalization).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    backward_rows_kernel(Shape sh, const T* __restrict__ logits, int64_t ls0, int64_t ls1,
                         const int32_t* __restrict__ routed, const float* __restrict__ grad_weights, int64_t gs0,
                         int64_t gs1, const float* __restrict__ dp, const float* __restrict__ grad_z,
                         T* __restrict__ grad_logits) {
  FASTLM_DYNAMIC_SHARED(float, smem);
  const int E = sh.experts, k = sh.top_k, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float* s = smem + warp * E;
  float* ds = smem + (kWarps + warp) * E;
  const int64_t t = int64_t(blockIdx.x) * kWarps + warp;
  if (t >= sh.tokens) return;
  const T* row = logits + t * ls0;
  const RowStats st = score_row(row, ls1, E, sh.sigmoid, s);
  for (int e = lane; e < E; e += 32) ds[e] = 0.0f;
  __syncwarp();  // every lane reads the selected experts' scores below
  const int32_t* sel = routed + t * k;
  float S = 0.0f, gw = 0.0f;  // sum of selected scores; sum_j g_j w_j over kept j
  for (int i = 0; i < k; ++i) S += s[sel[i] < 0 ? ~sel[i] : sel[i]];
  if (sh.normalize)
    for (int i = 0; i < k; ++i)
      if (sel[i] >= 0) gw += grad_weights[t * gs0 + i * gs1] * (s[sel[i]] / S);
  for (int i = 0; i < k; ++i) {
    const int32_t e = sel[i] < 0 ? ~sel[i] : sel[i];
    if (e % 32 != lane) continue;
    const float g = sel[i] >= 0 ? grad_weights[t * gs0 + i * gs1] : 0.0f;
    ds[e] = sh.normalize ? (g - gw) / S : g;
  }
  float total = 1.0f, dot = 0.0f;
  if (sh.sigmoid) {
    float v = 0.0f;
    for (int e = lane; e < E; e += 32) v += s[e];
    total = warp_sum(v);
    for (int e = lane; e < E; e += 32) dot += dp[e] * (s[e] / total);
  } else {
    for (int e = lane; e < E; e += 32) dot += s[e] * (ds[e] + dp[e]);
  }
  dot = warp_sum(dot);
  const float zc = 2.0f * *grad_z / float(sh.tokens) * st.lse;
  T* out = grad_logits + t * E;
  for (int e = lane; e < E; e += 32) {
    const float se = s[e];
    float dl;
    float q = se;
    if (sh.sigmoid) {
      dl = (ds[e] + (dp[e] - dot) / total) * se * (1.0f - se);
      q = expf(to_float(row[e * ls1]) - st.m) * st.inv_sum;
    } else {
      dl = se * (ds[e] + dp[e] - dot);
    }
    out[e] = from_float<T>(dl + zc * q);
  }
}

inline unsigned blocks_for(int64_t n, int64_t per_block) { return unsigned((n + per_block - 1) / per_block); }

Shape shape_of(const MoeRouterArgs& a) {
  return Shape{a.tokens,   int(a.experts), int(a.top_k), int((a.tokens + kRowsPerChunk - 1) / kRowsPerChunk),
               a.sigmoid, a.normalize,    a.capacity};
}

// Passes 1-3 (the forward; the backward's first half with weights, counts and losses null).
template <typename T>
void route(const MoeRouterArgs& a, const Shape& sh, const Workspace& ws, float* weights, int32_t* routed,
           bool mark_dropped_expert, int32_t* counts, float* aux, float* z, const float* grad_aux,
           cudaStream_t stream) {
  const size_t smem = sizeof(float) * 2 * kWarps * size_t(sh.experts);
  cudaMemsetAsync(ws.picks, 0, sizeof(int32_t) * size_t(sh.top_k) * sh.experts * sh.chunks, stream);
  launch_kernel(route_rows_kernel<T>, sh.chunks, kThreads, smem, stream, sh, static_cast<const T*>(a.logits),
                a.logits_stride0, a.logits_stride1, ws, weights);
  const int64_t columns = int64_t(sh.top_k) * sh.experts + sh.experts + 1;
  launch_kernel(scan_columns_kernel, blocks_for(columns, kWarps), kThreads, 0, stream, sh, ws);
  launch_kernel(finish_kernel, sh.capacity >= 0 ? unsigned(sh.chunks) : 1u, kRowsPerChunk, 0, stream, sh, ws,
                routed, mark_dropped_expert, weights, counts, aux, z, grad_aux);
}

template <typename T>
int forward_t(const MoeRouterArgs& a, void* workspace, int32_t* ids, float* weights, int32_t* counts, float* aux,
              float* z, cudaStream_t stream) {
  const Shape sh = shape_of(a);
  Workspace ws = Layout(a).carve(workspace);
  // Without capacity the selection is the answer: route_rows writes the ids in place.
  if (a.capacity < 0) ws.selected = ids;
  route<T>(a, sh, ws, weights, ids, false, counts, aux, z, nullptr, stream);
  return int(cudaGetLastError());
}

template <typename T>
int backward_t(const MoeRouterArgs& a, void* workspace, const float* gw, int64_t gs0, int64_t gs1,
               const float* grad_aux, const float* grad_z, void* grad_logits, cudaStream_t stream) {
  const Shape sh = shape_of(a);
  const Workspace ws = Layout(a).carve(workspace);
  int32_t* routed = a.capacity >= 0 ? ws.routed : ws.selected;
  route<T>(a, sh, ws, nullptr, routed, true, nullptr, nullptr, nullptr, grad_aux, stream);
  const size_t smem = sizeof(float) * 2 * kWarps * size_t(sh.experts);
  launch_kernel(backward_rows_kernel<T>, blocks_for(a.tokens, kWarps), kThreads, smem, stream, sh,
                static_cast<const T*>(a.logits), a.logits_stride0, a.logits_stride1, routed, gw, gs0, gs1,
                static_cast<const float*>(ws.dp), grad_z, static_cast<T*>(grad_logits));
  return int(cudaGetLastError());
}

}  // namespace
}  // namespace fastlm::cuda

namespace fastlm {

size_t moe_router_workspace_bytes_cuda(const MoeRouterArgs& a) { return cuda::Layout(a).bytes; }

int moe_router_forward_cuda(const MoeRouterArgs& a, void* workspace, int32_t* expert_ids, float* weights,
                            int32_t* counts, float* aux_loss, float* z_loss, cudaStream_t stream) {
  if (a.tokens == 0) {  // nothing routed: zero counts and losses (no kernel reads an empty table)
    cudaMemsetAsync(counts, 0, sizeof(int32_t) * size_t(a.experts), stream);
    cudaMemsetAsync(aux_loss, 0, sizeof(float), stream);
    cudaMemsetAsync(z_loss, 0, sizeof(float), stream);
    return int(cudaGetLastError());
  }
  auto forward = [&](auto zero) {
    return cuda::forward_t<decltype(zero)>(a, workspace, expert_ids, weights, counts, aux_loss, z_loss, stream);
  };
  switch (a.dtype) {
    case DType::kFloat32: return forward(float{});
    case DType::kFloat16: return forward(__half{});
    case DType::kBFloat16: return forward(__nv_bfloat16{});
  }
  return int(cudaErrorInvalidValue);
}

int moe_router_backward_cuda(const MoeRouterArgs& a, void* workspace, const float* grad_weights,
                             int64_t gw_stride0, int64_t gw_stride1, const float* grad_aux, const float* grad_z,
                             void* grad_logits, cudaStream_t stream) {
  if (a.tokens == 0) return 0;
  auto backward = [&](auto zero) {
    return cuda::backward_t<decltype(zero)>(a, workspace, grad_weights, gw_stride0, gw_stride1, grad_aux, grad_z,
                                            grad_logits, stream);
  };
  switch (a.dtype) {
    case DType::kFloat32: return backward(float{});
    case DType::kFloat16: return backward(__half{});
    case DType::kBFloat16: return backward(__nv_bfloat16{});
  }
  return int(cudaErrorInvalidValue);
}

}  // namespace fastlm
