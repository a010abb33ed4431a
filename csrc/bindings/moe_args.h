// Argument checks shared by the MoE bindings (moe_router.cpp, moe_permute.cpp,
// moe_grouped_linear.cpp). Messages name the op, the argument and the offending value.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>

#include "common.h"

namespace fastlm::bind {

inline void cpu_arg(const char* op, const char* arg, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), op, ": ", arg, " must be a CPU tensor here, got ", t.device().str());
}

// A 2-D int32 CPU index tensor (expert_ids, row_index) with `rows` rows (-1: any).
inline void index_arg(const char* op, const char* arg, const at::Tensor& t, int64_t rows) {
  cpu_arg(op, arg, t);
  TORCH_CHECK_TYPE(t.scalar_type() == at::kInt, op, ": ", arg, " must be int32, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 2, op, ": ", arg, " must be 2-D (T, top_k), got shape ", t.sizes());
  TORCH_CHECK_VALUE(rows < 0 || t.size(0) == rows, op, ": ", arg, " must have ", rows, " rows (T), got shape ",
                    t.sizes());
  TORCH_CHECK_VALUE(t.numel() <= INT32_MAX, op, ": ", arg, " has ", t.numel(),
                    " assignments, past the int32 row indices");
}

// weights (T, k) fp32 on the CPU, shaped like `like`.
inline void weights_arg(const char* op, const char* arg, const at::Tensor& w, const at::Tensor& like) {
  cpu_arg(op, arg, w);
  TORCH_CHECK_TYPE(w.scalar_type() == at::kFloat, op, ": ", arg, " must be float32, got ", w.scalar_type());
  TORCH_CHECK_VALUE(w.sizes() == like.sizes(), op, ": ", arg, " must have shape ", like.sizes(), ", got ",
                    w.sizes());
}

// A float tensor of rows (fp32 or bf16, 2-D, CPU); returns its dtype.
inline DType rows_arg(const char* op, const char* arg, const at::Tensor& t) {
  const DType dtype = kernel_input_arg(op, arg, t, c10::DeviceType::CPU, /*allow_half=*/false);
  TORCH_CHECK_VALUE(t.dim() == 2, op, ": ", arg, " must be 2-D, got shape ", t.sizes());
  return dtype;
}

// `t` has `ref`'s dtype (ref_name names it in the message).
inline void same_dtype_arg(const char* op, const char* arg, const at::Tensor& t, const char* ref_name,
                           const at::Tensor& ref) {
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), op, ": ", arg, " has dtype ", t.scalar_type(), " but ",
                   ref_name, " has dtype ", ref.scalar_type());
}

// A view with unit column stride (copies only when there is none).
inline at::Tensor unit_cols(const at::Tensor& t) {
  return t.dim() == 2 && t.size(1) > 1 && t.stride(1) != 1 ? t.contiguous() : t;
}

}  // namespace fastlm::bind
