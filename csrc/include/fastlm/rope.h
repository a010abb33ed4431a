// Launchers for rotary position embedding applied to q and k in one pass.
// q (B, Hq, T, D) and k (B, Hk, T, D) are read through element strides and the rotated copies are
// written through their outputs' strides. Per token (b, t) there are R/2 angles; pair i is
// (x[i], x[i + R/2]) in the rotate-half layout (GPT-NeoX, LLaMA) or (x[2i], x[2i + 1]) in the
// interleaved one (GPT-J), and becomes
//   y1 = x1 c - x2 s,   y2 = x2 c + x1 s        (inverse: s -> -s, the backward)
// Dims R..D-1 are copied unchanged (partial rotary). c, s are scale times either the tables
// cos/sin (Bc, T, R/2) of any float dtype (batch stride 0 broadcasts), or cos/sin of angles
// computed in fp32 from positions (Bp, T) int64 and inv_freq (R/2,) fp32:
// angle = float(pos) * inv_freq[i]. All arithmetic is fp32.
#pragma once
#include "fastlm/common.h"

namespace fastlm {

struct RopeProblem {
  DType dtype;        // q, k and both outputs
  DType table_dtype;  // cos and sin (table mode)
  int64_t batch, q_heads, k_heads, seq, head_dim;
  int64_t half_rotary;  // R / 2 pairs per head (0: a plain copy)
  bool interleaved, inverse;
  float scale;  // multiplies cos and sin (yarn's attention factor; 1 otherwise)
  const void* q;
  int64_t q_s[4];
  const void* k;
  int64_t k_s[4];
  void* q_out;
  int64_t q_out_s[4];
  void* k_out;
  int64_t k_out_s[4];
  // table mode: cos, sin with strides of (Bc, T, R/2); null in computed mode
  const void* cos;
  int64_t cos_s[3];
  const void* sin;
  int64_t sin_s[3];
  // computed mode: positions with strides of (Bp, T), inv_freq contiguous; null in table mode
  const int64_t* positions;
  int64_t positions_s[2];
  const float* inv_freq;
};

void rope_cpu(const RopeProblem& p);

// Largest R / 2 the CUDA kernels take (their per-token cos/sin live in shared memory).
constexpr int64_t kRopeCudaMaxHalfRotary = 4096;

// Returns the launch status; never synchronizes.
int rope_cuda(const RopeProblem& p, cudaStream_t stream);

}  // namespace fastlm
