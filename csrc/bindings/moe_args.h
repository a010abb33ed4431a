// Argument checks shared by the MoE bindings (moe_router.cpp, moe_permute.cpp,
// moe_grouped_linear.cpp). Messages name the op, the argument and the offending value.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <utility>
#include <vector>

#include "common.h"
#include "fastlm/moe.h"

namespace fastlm::bind {

// `t` lives on the device type the binding serves (CPU for the cpu kernels; CUDA, or CPU in the
// emulator build, for the cuda ones).
inline void device_arg(const char* op, const char* arg, const at::Tensor& t, c10::DeviceType device) {
  TORCH_CHECK_VALUE(t.device().type() == device, op, ": ", arg, " must be a ",
                    device == c10::DeviceType::CUDA ? "CUDA" : "CPU", " tensor here, got ", t.device().str());
}

inline void cpu_arg(const char* op, const char* arg, const at::Tensor& t) {
  device_arg(op, arg, t, c10::DeviceType::CPU);
}

// `t` sits on the very device of `ref` (ref_name names it), e.g. the same GPU.
inline void same_device_arg(const char* op, const char* arg, const at::Tensor& t, const char* ref_name,
                            const at::Tensor& ref) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), op, ": ", arg, " is on ", t.device().str(), " but ", ref_name,
                    " is on ", ref.device().str());
}

// A 2-D int32 index tensor (expert_ids, row_index) with `rows` rows (-1: any).
inline void index_arg(const char* op, const char* arg, const at::Tensor& t, int64_t rows,
                      c10::DeviceType device = c10::DeviceType::CPU) {
  device_arg(op, arg, t, device);
  TORCH_CHECK_TYPE(t.scalar_type() == at::kInt, op, ": ", arg, " must be int32, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 2, op, ": ", arg, " must be 2-D (T, top_k), got shape ", t.sizes());
  TORCH_CHECK_VALUE(rows < 0 || t.size(0) == rows, op, ": ", arg, " must have ", rows, " rows (T), got shape ",
                    t.sizes());
  TORCH_CHECK_VALUE(t.numel() <= INT32_MAX, op, ": ", arg, " has ", t.numel(),
                    " assignments, past the int32 row indices");
}

// weights (T, k) fp32, shaped like `like`.
inline void weights_arg(const char* op, const char* arg, const at::Tensor& w, const at::Tensor& like,
                        c10::DeviceType device = c10::DeviceType::CPU) {
  device_arg(op, arg, w, device);
  TORCH_CHECK_TYPE(w.scalar_type() == at::kFloat, op, ": ", arg, " must be float32, got ", w.scalar_type());
  TORCH_CHECK_VALUE(w.sizes() == like.sizes(), op, ": ", arg, " must have shape ", like.sizes(), ", got ",
                    w.sizes());
}

// A 2-D float tensor of rows in a dtype the device's kernels take (CPU: fp32, bf16; CUDA also
// fp16); returns its dtype.
inline DType rows_arg(const char* op, const char* arg, const at::Tensor& t,
                      c10::DeviceType device = c10::DeviceType::CPU) {
  const DType dtype = kernel_input_arg(op, arg, t, device, half_kernels(device));
  TORCH_CHECK_VALUE(t.dim() == 2, op, ": ", arg, " must be 2-D, got shape ", t.sizes());
  return dtype;
}

// `t` has `ref`'s dtype (ref_name names it in the message).
inline void same_dtype_arg(const char* op, const char* arg, const at::Tensor& t, const char* ref_name,
                           const at::Tensor& ref) {
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), op, ": ", arg, " has dtype ", t.scalar_type(), " but ",
                   ref_name, " has dtype ", ref.scalar_type());
}

// Host-side value checks for the kernels that cannot report bad indices themselves (the CUDA
// ones, whose CPU-tensor twins run under the emulator): only for tensors in host memory.
// The first entry of a CPU int32 (T, k) tensor outside [lo, hi), or with `unique` repeating an
// earlier value >= 0: flat index t*k + slot (-1: none), and whether it is a repeat.
inline std::pair<int64_t, bool> first_bad_index(const at::Tensor& t, int64_t lo, int64_t hi, bool unique) {
  const int64_t T = t.size(0), k = t.size(1);
  const int32_t* p = t.data_ptr<int32_t>();
  std::vector<uint8_t> seen(unique ? size_t(hi) : 0, 0);
  for (int64_t i = 0; i < T; ++i)
    for (int64_t s = 0; s < k; ++s) {
      const int32_t v = p[i * t.stride(0) + s * t.stride(1)];
      if (v < lo || v >= hi) return {i * k + s, false};
      if (!unique || v < 0) continue;
      if (seen[v]) return {i * k + s, true};
      seen[v] = 1;
    }
  return {-1, false};
}

inline void check_expert_ids_on_host(const char* op, const at::Tensor& ids, int64_t experts) {
  const int64_t bad = first_bad_index(ids, -1, experts, false).first, k = ids.size(1);
  TORCH_CHECK_VALUE(bad < 0, op, ": expert_ids must be in [-1, num_experts) = [-1, ", experts, "), got ",
                    bad < 0 ? 0 : ids[bad / k][bad % k].item<int32_t>(), " at [", bad / k, ", ", bad % k, "]");
}

inline void check_row_index_on_host(const char* op, const at::Tensor& row_index, int64_t rows, bool unique) {
  const auto [bad, duplicate] = first_bad_index(row_index, -1, rows, unique);
  if (bad < 0) return;
  const int64_t k = row_index.size(1), t = bad / k, s = bad % k;
  const int32_t value = row_index[t][s].item<int32_t>();
  TORCH_CHECK_VALUE(!duplicate, op, ": row_index must reference each row at most once, got ", value,
                    " twice (again at [", t, ", ", s, "])");
  TORCH_CHECK_VALUE(false, op, ": row_index must be in [-1, ", rows, ") (rows of the sorted tensor), got ", value,
                    " at [", t, ", ", s, "]");
}

// moe_base_assignment's arguments: scores (T, E) on `device` in a kernel dtype, capacity E ints
// >= 0 summing to T (host values), eps >= 0 (0: the default), max_rounds >= 0. args.capacity is
// left null (the default split, found by the kernel); `custom` says whether `capacity` differs
// from it, in which case the binding points args.capacity at a copy of `capacity` where it runs.
struct BaseAssignmentCall {
  BaseAssignmentArgs args;
  std::vector<int64_t> capacity;
  bool custom;
};

inline BaseAssignmentCall base_assignment_call(const at::Tensor& scores, at::IntArrayRef capacity, double eps,
                                               int64_t max_rounds, c10::DeviceType device) {
  constexpr const char* op = "moe_base_assignment";
  const DType dtype = kernel_input_arg(op, "scores", scores, device, half_kernels(device));
  TORCH_CHECK_VALUE(scores.dim() == 2 && scores.size(1) >= 1, op, ": scores must be 2-D (T, E) with E >= 1, got shape ",
                    scores.sizes());
  const int64_t T = scores.size(0), E = scores.size(1);
  TORCH_CHECK_VALUE(T <= INT32_MAX, op, ": scores has ", T, " tokens, past the int32 expert ids");
  int64_t total = 0;
  bool ok = int64_t(capacity.size()) == E, custom = false;
  for (size_t e = 0; ok && e < capacity.size(); ++e) {
    ok = capacity[e] >= 0;
    total += capacity[e];
    custom = custom || capacity[e] != T / E + (int64_t(e) < T % E);
  }
  TORCH_CHECK_VALUE(ok && total == T, op, ": capacity must be ", E, " ints >= 0 summing to the ", T, " tokens, got ",
                    capacity);
  TORCH_CHECK_VALUE(eps >= 0 && std::isfinite(eps), op, ": eps must be >= 0 (0: the default), got ", eps);
  TORCH_CHECK_VALUE(max_rounds >= 0, op, ": max_rounds must be >= 0, got ", max_rounds);
  return {BaseAssignmentArgs{dtype, T, E, scores.data_ptr(), scores.stride(0), scores.stride(1), nullptr, eps,
                             max_rounds},
          capacity.vec(), custom};
}

// A view with unit column stride (copies only when there is none).
inline at::Tensor unit_cols(const at::Tensor& t) {
  return t.dim() == 2 && t.size(1) > 1 && t.stride(1) != 1 ? t.contiguous() : t;
}

}  // namespace fastlm::bind
