// Launchers for the mixture-of-experts CPU kernels (csrc/cpu/moe_*.cpp): the router, the token
// permutation to expert-sorted rows and back, and the grouped linear's epilogues; the router and
// the permutations also on CUDA (csrc/cuda/moe_router.cu, moe_permute.cu; their section below).
// Semantics are those of the ops in fastlm/ops/moe_router.py, moe_permute.py and grouped_linear.py
// (their references are the oracle; torch.ops.fastlm.moe_*, grouped_linear_*); the bindings
// (csrc/bindings/moe_*.cpp) validate shapes and dtypes and allocate, the launchers read raw
// pointers with strides in elements. T tokens, E experts, k = top_k.
#pragma once
#include <cstddef>

#include "fastlm/common.h"

namespace fastlm {

// ---------------------------------------------------------------- router
struct MoeRouterArgs {
  DType dtype;                  // of logits: kFloat32 or kBFloat16
  int64_t tokens, experts;      // T, E
  const void* logits; int64_t logits_stride0, logits_stride1;
  int64_t top_k;                // 1 <= k <= E
  bool sigmoid, normalize;
  int64_t capacity;             // -1: none, else >= 0 kept assignments per expert
};

// expert_ids (T, k) int32 and weights (T, k) fp32 contiguous; counts (E,) int32; aux_loss and
// z_loss single floats. Deterministic for any thread count.
void moe_router_forward_cpu(const MoeRouterArgs& a, int32_t* expert_ids, float* weights, int32_t* counts,
                            float* aux_loss, float* z_loss);

// grad_logits (T, E) contiguous in a.dtype. grad_weights (T, k) fp32 with the given strides.
void moe_router_backward_cpu(const MoeRouterArgs& a, const float* grad_weights, int64_t gw_stride0,
                             int64_t gw_stride1, float grad_aux, float grad_z, void* grad_logits);

// ---------------------------------------------------------------- permute / unpermute
// The permutation copies rows as bytes (row_bytes each, x's row stride in bytes, x_sorted
// contiguous); the reductions take DType and strides in elements.

// Validates expert_ids (T, k) (strides given) against [-1, E): returns the flat index t*k+slot
// of the first bad value, or -1 when all are good. Then, only when all are good, fills
// row_index (T, k) contiguous, offsets (E+1,) and x_sorted (T*k rows, the tail zero-filled).
int64_t moe_permute_forward_cpu(int64_t tokens, int64_t top_k, int64_t experts, const int32_t* expert_ids,
                                int64_t ids_stride0, int64_t ids_stride1, const void* x, int64_t x_stride_bytes,
                                int64_t row_bytes, void* x_sorted, int32_t* row_index, int32_t* offsets);

// Validates row_index (T, k) against [-1, rows); with `unique`, also that no row appears twice.
// Returns -1 when good, else the flat index of the first offending entry (*duplicate tells which).
int64_t moe_check_row_index_cpu(int64_t tokens, int64_t top_k, const int32_t* row_index, int64_t ri_stride0,
                                int64_t ri_stride1, int64_t rows, bool unique, bool* duplicate);

// grad_x (T, H) = sum over slots of grad_sorted[row_index[t, s]] (-1 skipped), fp32 accumulation.
void moe_permute_backward_cpu(DType dtype, int64_t tokens, int64_t top_k, int64_t hidden, const void* grad_sorted,
                              int64_t gs_stride, const int32_t* row_index, int64_t ri_stride0, int64_t ri_stride1,
                              void* grad_x, int64_t gx_stride);

// out (T, H) = sum over slots of weights[t, s] * y_sorted[row_index[t, s]] (-1 skipped), fp32;
// weights nullptr: unit weights (the permute backward).
void moe_unpermute_forward_cpu(DType dtype, int64_t tokens, int64_t top_k, int64_t hidden, const void* y_sorted,
                               int64_t y_stride, const int32_t* row_index, int64_t ri_stride0, int64_t ri_stride1,
                               const float* weights, int64_t w_stride0, int64_t w_stride1, void* out,
                               int64_t out_stride);

// grad_y_sorted (rows, H): row_index[t, s]'s row = weights[t, s] * grad_out[t], unreferenced rows
// 0 (each row referenced at most once: check first); grad_weights (T, k) contiguous fp32 =
// dot(y_sorted[row], grad_out[t]), 0 for dropped slots.
void moe_unpermute_backward_cpu(DType dtype, int64_t tokens, int64_t top_k, int64_t hidden, int64_t rows,
                                const void* grad_out, int64_t go_stride, const void* y_sorted, int64_t y_stride,
                                const int32_t* row_index, int64_t ri_stride0, int64_t ri_stride1,
                                const float* weights, int64_t w_stride0, int64_t w_stride1, void* grad_y_sorted,
                                int64_t gy_stride, float* grad_weights);

// ---------------------------------------------------------------- CUDA (router and permutations)
// csrc/cuda/moe_router.cu, moe_permute.cu: the semantics above, on device pointers, also fp16.
// Launchers return the launch status and never synchronize or read device values on the host;
// `workspace` is device memory of the size the matching *_workspace_bytes_cuda gives (no
// initialization needed). Outputs are the same run to run (no float atomics).

// A warp holds a row of E fp32 scores and E partial sums in shared memory (2 * 4 warps * E floats).
constexpr int64_t kMoeRouterMaxExpertsCuda = 1024;
size_t moe_router_workspace_bytes_cuda(const MoeRouterArgs& a);
// a.logits on the device; outputs as moe_router_forward_cpu's, on the device.
int moe_router_forward_cuda(const MoeRouterArgs& a, void* workspace, int32_t* expert_ids, float* weights,
                            int32_t* counts, float* aux_loss, float* z_loss, cudaStream_t stream);
// grad_aux, grad_z: one fp32 each, read on the device.
int moe_router_backward_cuda(const MoeRouterArgs& a, void* workspace, const float* grad_weights,
                             int64_t gw_stride0, int64_t gw_stride1, const float* grad_aux, const float* grad_z,
                             void* grad_logits, cudaStream_t stream);

// Ids outside [-1, E) are treated as dropped (row_index -1, no row taken): the device never
// reads or writes out of bounds; the bindings reject them first wherever the ids live on the host.
size_t moe_permute_workspace_bytes_cuda(int64_t tokens, int64_t top_k, int64_t experts);
int moe_permute_forward_cuda(int64_t tokens, int64_t top_k, int64_t experts, const int32_t* expert_ids,
                             int64_t ids_stride0, int64_t ids_stride1, const void* x, int64_t x_stride_bytes,
                             int64_t row_bytes, void* x_sorted, int32_t* row_index, int32_t* offsets,
                             void* workspace, cudaStream_t stream);

// Row indices outside [0, rows) count as dropped (memory-safe on the device).
// out (T, H) = sum over slots of weights[t, s] * y_sorted[row_index[t, s]], fp32; weights null:
// unit weights (the permute backward).
int moe_unpermute_forward_cuda(DType dtype, int64_t tokens, int64_t top_k, int64_t hidden, int64_t rows,
                               const void* y_sorted, int64_t y_stride, const int32_t* row_index, int64_t ri_stride0,
                               int64_t ri_stride1, const float* weights, int64_t w_stride0, int64_t w_stride1,
                               void* out, int64_t out_stride, cudaStream_t stream);
// As moe_unpermute_backward_cpu; `referenced` is device scratch of `rows` bytes. A row referenced
// twice (not a permutation's row_index) is written by both: one of them wins.
int moe_unpermute_backward_cuda(DType dtype, int64_t tokens, int64_t top_k, int64_t hidden, int64_t rows,
                                const void* grad_out, int64_t go_stride, const void* y_sorted, int64_t y_stride,
                                const int32_t* row_index, int64_t ri_stride0, int64_t ri_stride1,
                                const float* weights, int64_t w_stride0, int64_t w_stride1, void* grad_y_sorted,
                                int64_t gy_stride, float* grad_weights, uint8_t* referenced, cudaStream_t stream);

// ---------------------------------------------------------------- BASE balanced assignment
// fastlm/ops/base_assignment.py's auction (its reference is the oracle): each expert e receives
// exactly capacity[e] tokens, the total score eps-optimal. The CPU (csrc/cpu/moe_base_assignment.cpp)
// and CUDA (csrc/cuda/moe_base_assignment.cu) kernels follow the same steps in float64 with the
// same tie rules, so they return the same ids and prices. Outputs: expert_ids (T,) int32, prices
// (E,) float64 (each expert's cheapest slot price, 0 for an expert without slots). Non-finite
// scores, a capacity that is not E values >= 0 summing to T, or more than max_rounds auction rounds
// give the invalid result instead: every id -1, every price NaN.
struct BaseAssignmentArgs {
  DType dtype;                  // of scores
  int64_t tokens, experts;      // T, E >= 1
  const void* scores; int64_t scores_stride0, scores_stride1;
  const int64_t* capacity;      // (E,) where the kernel runs; nullptr: T / E each, the first T % E one more
  double eps;                   // > 0, or 0: 1e-4 * (max - min score) / E, found by the kernel
  int64_t max_rounds;           // cap on bidding rounds over all eps phases
};
constexpr int kBaseDualSweeps = 5;         // coordinate-descent sweeps of the dual warm start
constexpr double kBaseFirstStepDivisor = 64.0;  // the first eps phase bids at spread / 64 ...
constexpr double kBaseStepDivisor = 8.0;        // ... each next one at a step 8 times finer, down to eps
constexpr double kBaseDefaultEpsFactor = 1e-4;  // default eps = factor * spread / E

void moe_base_assignment_cpu(const BaseAssignmentArgs& a, int32_t* expert_ids, double* prices);

// The same on the device in one launch of one CTA (a.capacity a device pointer or null); no host
// synchronization. `workspace`: moe_base_assignment_workspace_bytes_cuda(T, E) bytes, uninitialized.
constexpr int64_t kBaseMaxExpertsCuda = 1024;
size_t moe_base_assignment_workspace_bytes_cuda(int64_t tokens, int64_t experts);
int moe_base_assignment_cuda(const BaseAssignmentArgs& a, void* workspace, int32_t* expert_ids, double* prices,
                             cudaStream_t stream);

// ---------------------------------------------------------------- grouped linear
enum class GroupedAct : int { kNone = 0, kElementwise = 1, kGated = 2 };

// The forward epilogue over one expert's block of GEMM output z (rows, cols = Nw):
//   kNone:        out = z + bias                          (out may alias z; cols outputs)
//   kElementwise: v = z + bias, pre = v, out = act(v)     (cols outputs)
//   kGated:       gate = z[:, :I] + bias[:I], up = z[:, I:] + bias[I:], pre = (gate, up),
//                 out = act(gate) * up                     (I = cols / 2 outputs)
// bias (cols,) may be null; pre may be null or alias z; the activation reads pre's rounded value.
struct GroupedEpilogueArgs {
  DType dtype;
  GroupedAct mode;
  Activation act;  // ignored for kNone
  int64_t rows, cols;
  const void* z; int64_t z_stride;
  const void* bias;
  void* pre; int64_t pre_stride;
  void* out; int64_t out_stride;
};
void grouped_linear_epilogue_cpu(const GroupedEpilogueArgs& a);

// The backward's one pass over rows [0, offsets[E]): grad_p = grad_out * act'(pre) (gated:
// d gate = g * up * act'(gate), d up = g * act(gate)), written to grad_p unless mode is kNone
// (then grad_p is grad_out itself); grad_bias (E, cols) contiguous in dtype, when non-null,
// receives the per-expert column sums of grad_p in fp32 (0 for empty experts), deterministically.
struct GroupedGradArgs {
  DType dtype;
  GroupedAct mode;
  Activation act;
  int64_t experts, cols;  // cols = Nw
  const int32_t* offsets; // (E+1,), validated
  const void* grad_out; int64_t grad_out_stride;
  const void* pre; int64_t pre_stride;
  void* grad_p; int64_t grad_p_stride;
  void* grad_bias;
};
void grouped_linear_grad_cpu(const GroupedGradArgs& a);

// ---------------------------------------------------------------- grouped linear on CUDA
// csrc/cuda/moe_grouped_linear.cu, on the GEMM core. fp16/bf16, device pointers; offsets (E+1,)
// are read on the device only (clamped into [0, rows]). Every width, K and row stride is a
// multiple of 8 elements and every base 16-byte aligned (the binding pads odd shapes with zeros).
// Gated: weight rows [0, width) are the gate, [width, 2 width) the up projection (the binding
// spreads an unpadded I into these halves). The weight (E, cols, k) is read in place either way
// round: element (e, c, i) at e weight_expert_stride + c weight_stride + i, or, weight_transposed
// (an (E, k, cols) buffer seen as (E, cols, k), as GPT-OSS stores its experts), at
// e weight_expert_stride + c + i weight_stride.
struct GroupedLinearCudaArgs {
  DType dtype;
  GroupedAct mode;
  Activation act;           // ignored for kNone; gated: the gate's activation
  int64_t rows, experts, k, width;  // x (rows, k); out (rows, width); cols = width or 2 width (gated)
  const int32_t* offsets;
  const void* x; int64_t x_stride;
  const void* weight; int64_t weight_expert_stride, weight_stride;  // (E, cols, k)
  bool weight_transposed;
  const void* bias;         // (E, cols) contiguous, or null
  void* out; int64_t out_stride;
  void* pre; int64_t pre_stride;  // (rows, cols), or null; rows past offsets[E] get 0 like out
};
int grouped_linear_forward_cuda(const GroupedLinearCudaArgs& a, cudaStream_t stream);

// grad_p = grad_out * act'(pre) into grad_p (kNone: grad_p is grad_out), grad_bias = its per-expert
// column sums, grad_x = grad_p @ weight[e] by expert (tail rows 0), grad_weight[e] = grad_p_e^T x_e.
struct GroupedLinearGradCudaArgs {
  DType dtype;
  GroupedAct mode;
  Activation act;
  int64_t rows, experts, k, width;  // as in the forward
  const int32_t* offsets;
  const void* grad_out; int64_t grad_out_stride;  // (rows, width)
  const void* pre; int64_t pre_stride;            // (rows, cols) unless kNone
  const void* x; int64_t x_stride;
  const void* weight; int64_t weight_expert_stride, weight_stride;  // as in the forward
  bool weight_transposed;
  void* grad_p; int64_t grad_p_stride;            // (rows, cols) scratch unless kNone
  void* grad_x;                                   // (rows, k) contiguous
  void* grad_weight;                              // (E, cols, k) contiguous, or its transpose:
  bool grad_weight_transposed;                    // (E, k, cols) contiguous seen as (E, cols, k)
  void* grad_bias;                                // (E, cols) contiguous, or null
};
int grouped_linear_backward_cuda(const GroupedLinearGradCudaArgs& a, cudaStream_t stream);

}  // namespace fastlm
