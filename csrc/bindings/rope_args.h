// Argument checks for rope, shared by the CPU and CUDA bindings: they validate the op's inputs
// and fill the launchers' RopeProblem (raw pointers, sizes, element strides).
#pragma once
#include <ATen/core/Tensor.h>

#include <optional>

#include "common.h"
#include "fastlm/rope.h"

namespace fastlm::bind {

inline DType rope_table_dtype(const char* op, const char* arg, const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: break;
  }
  TORCH_CHECK_TYPE(false, op, ": ", arg, " must be float32, float16 or bfloat16, got ", t.scalar_type());
  return DType::kFloat32;
}

// q (B, Hq, T, D), k (B, Hk, T, D); tables cos, sin (Bc, T, R/2) with Bc in {1, B}; or positions
// (Bp, T) int64 with Bp in {1, B} and inv_freq (R/2,) float32. Outputs: q_out, k_out.
inline RopeProblem rope_args(const char* op, const at::Tensor& q, const at::Tensor& k,
                             const std::optional<at::Tensor>& cos, const std::optional<at::Tensor>& sin,
                             const std::optional<at::Tensor>& positions, const std::optional<at::Tensor>& inv_freq,
                             double scale, bool interleaved, bool inverse, DType dtype) {
  TORCH_CHECK_VALUE(q.dim() == 4, op, ": q must be 4-D (B, Hq, T, D), got shape ", q.sizes());
  TORCH_CHECK_VALUE(k.dim() == 4, op, ": k must be 4-D (B, Hk, T, D), got shape ", k.sizes());
  TORCH_CHECK_VALUE(k.device() == q.device(), op, ": k is on ", k.device().str(), " but q is on ", q.device().str());
  TORCH_CHECK_TYPE(k.scalar_type() == q.scalar_type(), op, ": k has dtype ", k.scalar_type(), " but q has dtype ",
                   q.scalar_type());
  TORCH_CHECK_VALUE(k.size(0) == q.size(0) && k.size(2) == q.size(2) && k.size(3) == q.size(3), op,
                    ": k must match q in B, T and D, got q ", q.sizes(), " and k ", k.sizes());
  const int64_t B = q.size(0), T = q.size(2), D = q.size(3);
  const bool tables = cos.has_value() || sin.has_value();
  const bool computed = positions.has_value() || inv_freq.has_value();
  TORCH_CHECK_VALUE(tables != computed && (tables ? cos && sin : positions && inv_freq), op,
                    ": give either cos and sin, or positions and inv_freq");
  RopeProblem p{};
  p.dtype = dtype;
  p.table_dtype = DType::kFloat32;
  p.batch = B;
  p.q_heads = q.size(1);
  p.k_heads = k.size(1);
  p.seq = T;
  p.head_dim = D;
  p.interleaved = interleaved;
  p.inverse = inverse;
  p.scale = float(scale);
  if (tables) {
    for (const auto* t : {&*cos, &*sin}) {
      const char* name = t == &*cos ? "cos" : "sin";
      TORCH_CHECK_VALUE(t->device() == q.device(), op, ": ", name, " is on ", t->device().str(), " but q is on ",
                        q.device().str());
      TORCH_CHECK_VALUE(t->dim() == 3 && (t->size(0) == 1 || t->size(0) == B) && t->size(1) == T &&
                            2 * t->size(2) <= D,
                        op, ": ", name, " must be (1 or ", B, ", ", T, ", R/2) with R <= ", D, ", got ", t->sizes());
    }
    TORCH_CHECK_VALUE(sin->sizes() == cos->sizes(), op, ": sin has shape ", sin->sizes(), " but cos has shape ",
                      cos->sizes());
    TORCH_CHECK_TYPE(sin->scalar_type() == cos->scalar_type(), op, ": sin has dtype ", sin->scalar_type(),
                     " but cos has dtype ", cos->scalar_type());
    p.table_dtype = rope_table_dtype(op, "cos", *cos);
    p.half_rotary = cos->size(2);
    p.cos = cos->data_ptr();
    p.sin = sin->data_ptr();
    for (int i = 0; i < 3; ++i) {
      p.cos_s[i] = cos->size(i) == 1 ? 0 : cos->stride(i);
      p.sin_s[i] = sin->size(i) == 1 ? 0 : sin->stride(i);
    }
  } else {
    TORCH_CHECK_VALUE(positions->device() == q.device() && inv_freq->device() == q.device(), op,
                      ": positions and inv_freq must be on q's device ", q.device().str(), ", got ",
                      positions->device().str(), " and ", inv_freq->device().str());
    TORCH_CHECK_TYPE(positions->scalar_type() == at::kLong, op, ": positions must be int64, got ",
                     positions->scalar_type());
    TORCH_CHECK_VALUE(positions->dim() == 2 && (positions->size(0) == 1 || positions->size(0) == B) &&
                          positions->size(1) == T,
                      op, ": positions must be (1 or ", B, ", ", T, "), got ", positions->sizes());
    TORCH_CHECK_TYPE(inv_freq->scalar_type() == at::kFloat, op, ": inv_freq must be float32, got ",
                     inv_freq->scalar_type());
    TORCH_CHECK_VALUE(inv_freq->dim() == 1 && 2 * inv_freq->size(0) <= D && inv_freq->is_contiguous(), op,
                      ": inv_freq must be a contiguous (R/2,) tensor with R <= ", D, ", got ", inv_freq->sizes());
    p.half_rotary = inv_freq->size(0);
    p.positions = positions->data_ptr<int64_t>();
    p.positions_s[0] = positions->size(0) == 1 ? 0 : positions->stride(0);
    p.positions_s[1] = positions->stride(1);
    p.inv_freq = inv_freq->data_ptr<float>();
  }
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  for (int i = 0; i < 4; ++i) {
    p.q_s[i] = q.stride(i);
    p.k_s[i] = k.stride(i);
  }
  return p;
}

inline void rope_outputs(RopeProblem& p, const at::Tensor& q_out, const at::Tensor& k_out) {
  p.q_out = q_out.data_ptr();
  p.k_out = k_out.data_ptr();
  for (int i = 0; i < 4; ++i) {
    p.q_out_s[i] = q_out.stride(i);
    p.k_out_s[i] = k_out.stride(i);
  }
}

}  // namespace fastlm::bind
