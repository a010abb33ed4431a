// Argument checks shared by the MoE bindings (moe_router.cpp, moe_permute.cpp,
// moe_grouped_linear.cpp and their _cuda twins). Messages name the op, the argument and the
// offending value.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
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

// grouped_linear's activation by name: none, elementwise (gelu, gelu_tanh, relu, silu) or gated
// (swiglu, geglu: the weight's Nw outputs are gate and up halves).
struct GroupedActivation {
  GroupedAct mode = GroupedAct::kNone;
  Activation act = Activation::kGelu;
};
inline GroupedActivation grouped_activation_arg(const char* op, c10::string_view name) {
  const std::string s(name);
  GroupedActivation g;
  if (s == "none") return g;
  if (s == "swiglu" || s == "geglu") {
    g.mode = GroupedAct::kGated;
    g.act = s == "swiglu" ? Activation::kSilu : Activation::kGelu;
    return g;
  }
  TORCH_CHECK_VALUE(parse_activation(s, &g.act), op, ": unknown activation '", s,
                    "'; expected one of none, gelu, gelu_tanh, relu, silu, swiglu, geglu");
  g.mode = GroupedAct::kElementwise;
  return g;
}

// grouped_linear's operands past x's own device and dtype (each binding's): x (N, K), weight (E,
// Nw, K) beside x, gated: Nw even; offsets (E + 1,) int32 on x's device, whose values (0 first,
// nondecreasing, last <= N) are checked where they live on the host (on a GPU the kernels clamp
// them); bias (forward), if any, (E, Nw) beside x. The activation parsed, offsets contiguous.
struct GroupedArgs {
  GroupedActivation g;
  at::Tensor offsets;
  int64_t E, N, Nw, width;  // width: the outputs per row (Nw, or Nw / 2 gated)
};
inline GroupedArgs grouped_args(const char* op, const at::Tensor& x, const at::Tensor& weight,
                                const at::Tensor& offsets, c10::string_view activation,
                                const std::optional<at::Tensor>& bias = std::nullopt) {
  const GroupedActivation g = grouped_activation_arg(op, activation);
  TORCH_CHECK_VALUE(x.dim() == 2, op, ": x must be 2-D (N, K), got shape ", x.sizes());
  same_place_arg(op, "weight", weight, x);
  TORCH_CHECK_VALUE(weight.dim() == 3 && weight.size(2) == x.size(1), op, ": weight must have shape (E, Nw, ",
                    x.size(1), ") to match x's K, got ", weight.sizes());
  const int64_t E = weight.size(0), N = x.size(0), Nw = weight.size(1);
  TORCH_CHECK_VALUE(g.mode != GroupedAct::kGated || Nw % 2 == 0, op,
                    ": a gated activation needs an even Nw (gate and up halves) in weight (E, Nw, K), got Nw = ", Nw);
  TORCH_CHECK_TYPE(offsets.scalar_type() == at::kInt, op, ": offsets must be int32, got ", offsets.scalar_type());
  same_device_arg(op, "offsets", offsets, "x", x);
  TORCH_CHECK_VALUE(offsets.dim() == 1 && offsets.size(0) == E + 1, op, ": offsets must have shape (E + 1,) = (",
                    E + 1, ",), got ", offsets.sizes());
  TORCH_CHECK_VALUE(N <= INT32_MAX, op, ": x has ", N, " rows, past the int32 offsets");
  if (bias) {
    same_place_arg(op, "bias", *bias, x);
    TORCH_CHECK_VALUE(bias->dim() == 2 && bias->size(0) == E && bias->size(1) == Nw, op, ": bias must have shape (",
                      E, ", ", Nw, "), got ", bias->sizes());
  }
  const at::Tensor o = offsets.contiguous();
  if (o.device().is_cpu()) {
    const int32_t* p = o.data_ptr<int32_t>();
    TORCH_CHECK_VALUE(p[0] == 0, op, ": offsets[0] must be 0, got ", p[0]);
    for (int64_t e = 0; e < E; ++e)
      TORCH_CHECK_VALUE(p[e + 1] >= p[e], op, ": offsets must be nondecreasing, got offsets[", e + 1, "] = ",
                        p[e + 1], " < offsets[", e, "] = ", p[e]);
    TORCH_CHECK_VALUE(p[E] <= N, op, ": offsets[", E, "] = ", p[E], " exceeds the ", N, " rows of x");
  }
  return {g, o, E, N, Nw, g.mode == GroupedAct::kGated ? Nw / 2 : Nw};
}

// The backward's grad_out (N, width) and, with an activation, its saved pre-activation (N, Nw).
inline void grouped_grad_args(const char* op, const GroupedArgs& a, const at::Tensor& x, const at::Tensor& grad_out,
                              const at::Tensor& pre, c10::string_view activation) {
  same_place_arg(op, "grad_out", grad_out, x);
  TORCH_CHECK_VALUE(grad_out.dim() == 2 && grad_out.size(0) == a.N && grad_out.size(1) == a.width, op,
                    ": grad_out must have shape (", a.N, ", ", a.width, "), got ", grad_out.sizes());
  if (a.g.mode == GroupedAct::kNone) return;
  same_place_arg(op, "pre", pre, x);
  TORCH_CHECK_VALUE(pre.dim() == 2 && pre.size(0) == a.N && pre.size(1) == a.Nw, op, ": pre must have shape (", a.N,
                    ", ", a.Nw, ") for activation '", std::string(activation), "', got ", pre.sizes());
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
