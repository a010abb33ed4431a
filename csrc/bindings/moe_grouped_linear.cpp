// grouped_linear: CPU implementations of grouped_linear_fwd / grouped_linear_bwd, one call over
// all experts. The GEMMs are torch's (MKL / oneDNN) on each expert's row slice, as linear.cpp
// does for one matrix; the epilogue (bias, saved pre-activation, activation or gated halves) is
// one fused pass over each expert's block right after its GEMM (csrc/cpu/moe_grouped_linear.cpp).
// The backward computes grad_p (and grad_bias) for all experts in one pass, then per-expert GEMMs.
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include <algorithm>
#include <string>

#include "cpu_output.h"
#include "fastlm/moe.h"
#include "moe_args.h"

namespace fastlm::bind {
namespace {

struct GroupedActivation {
  GroupedAct mode = GroupedAct::kNone;
  Activation act = Activation::kGelu;
};

GroupedActivation grouped_activation_arg(const char* op, c10::string_view name) {
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

// x (N, K), weight (E, Nw, K), offsets (E+1,) int32: 0 first, nondecreasing, last <= N; gated: Nw even.
// Returns offsets as a contiguous CPU tensor.
at::Tensor grouped_args(const char* op, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& offsets,
                        const GroupedActivation& g) {
  TORCH_CHECK_VALUE(x.dim() == 2, op, ": x must be 2-D (N, K), got shape ", x.sizes());
  same_place_arg(op, "weight", weight, x);
  TORCH_CHECK_VALUE(weight.dim() == 3 && weight.size(2) == x.size(1), op, ": weight must have shape (E, Nw, ",
                    x.size(1), ") to match x's K, got ", weight.sizes());
  const int64_t E = weight.size(0), N = x.size(0), Nw = weight.size(1);
  TORCH_CHECK_VALUE(g.mode != GroupedAct::kGated || Nw % 2 == 0, op,
                    ": a gated activation needs an even Nw (gate and up halves) in weight (E, Nw, K), got Nw = ", Nw);
  cpu_arg(op, "offsets", offsets);
  TORCH_CHECK_TYPE(offsets.scalar_type() == at::kInt, op, ": offsets must be int32, got ", offsets.scalar_type());
  TORCH_CHECK_VALUE(offsets.dim() == 1 && offsets.size(0) == E + 1, op, ": offsets must have shape (E + 1,) = (",
                    E + 1, ",), got ", offsets.sizes());
  TORCH_CHECK_VALUE(N <= INT32_MAX, op, ": x has ", N, " rows, past the int32 offsets");
  const at::Tensor o = offsets.contiguous();
  const int32_t* p = o.data_ptr<int32_t>();
  TORCH_CHECK_VALUE(p[0] == 0, op, ": offsets[0] must be 0, got ", p[0]);
  for (int64_t e = 0; e < E; ++e)
    TORCH_CHECK_VALUE(p[e + 1] >= p[e], op, ": offsets must be nondecreasing, got offsets[", e + 1, "] = ", p[e + 1],
                      " < offsets[", e, "] = ", p[e]);
  TORCH_CHECK_VALUE(p[E] <= N, op, ": offsets[", E, "] = ", p[E], " exceeds the ", N, " rows of x");
  return o;
}

std::tuple<at::Tensor, at::Tensor> grouped_linear_fwd_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                          const at::Tensor& offsets,
                                                          const std::optional<at::Tensor>& bias,
                                                          c10::string_view activation, bool save_pre) {
  constexpr const char* op = "grouped_linear_fwd";
  const GroupedActivation g = grouped_activation_arg(op, activation);
  const DType dtype = kernel_input_arg(op, "x", x, c10::DeviceType::CPU, /*allow_half=*/false);
  const at::Tensor off = grouped_args(op, x, weight, offsets, g);
  const int64_t E = weight.size(0), N = x.size(0), Nw = weight.size(1);
  if (bias) {
    same_place_arg(op, "bias", *bias, x);
    TORCH_CHECK_VALUE(bias->dim() == 2 && bias->size(0) == E && bias->size(1) == Nw, op, ": bias must have shape (",
                      E, ", ", Nw, "), got ", bias->sizes());
  }
  const int64_t width = g.mode == GroupedAct::kGated ? Nw / 2 : Nw;
  const int32_t* o = off.data_ptr<int32_t>();
  const at::Tensor xs = unit_cols(x);
  const at::Tensor w = weight.size(2) > 1 && weight.stride(2) != 1 ? weight.contiguous() : weight;
  const at::Tensor b = bias ? bias->contiguous() : at::Tensor();
  at::Tensor out = empty_output({N, width}, x.options());
  // pre (N, Nw) is kept only for a backward; without one (inference) each expert's GEMM lands in
  // one scratch block sized for the largest expert, reused while cache-warm, instead of a fresh
  // (N, Nw) buffer written and never read.
  const bool keep_pre = save_pre && g.mode != GroupedAct::kNone;
  at::Tensor pre = keep_pre ? empty_output({N, Nw}, x.options()) : at::empty({0}, x.options());
  int64_t largest = 0;
  for (int64_t e = 0; e < E; ++e) largest = std::max<int64_t>(largest, o[e + 1] - o[e]);
  at::Tensor scratch = g.mode != GroupedAct::kNone && !keep_pre ? at::empty({largest, Nw}, x.options()) : at::Tensor();
  // bf16: the bias goes into the GEMM (addmm), so p + bias is rounded once as in eager (see
  // linear.cpp); fp32: mm, and the bias add rides in the epilogue pass.
  const bool bias_in_gemm = b.defined() && dtype == DType::kBFloat16;
  for (int64_t e = 0; e < E; ++e) {
    const int64_t r0 = o[e], n = o[e + 1] - o[e];
    if (n == 0) continue;
    at::Tensor target = g.mode == GroupedAct::kNone ? out.narrow(0, r0, n)
                        : keep_pre ? pre.narrow(0, r0, n) : scratch.narrow(0, 0, n);
    const at::Tensor xe = xs.narrow(0, r0, n), we = w.select(0, e).t();
    if (bias_in_gemm) at::addmm_out(target, b.select(0, e), xe, we);
    else at::mm_out(target, xe, we);
    if (g.mode == GroupedAct::kNone && !(b.defined() && !bias_in_gemm)) continue;
    at::Tensor oe = out.narrow(0, r0, n);
    // The GEMM wrote p into pre (target); the epilogue writes it back only when it adds the bias.
    const bool bias_in_epilogue = b.defined() && !bias_in_gemm;
    grouped_linear_epilogue_cpu(GroupedEpilogueArgs{
        dtype, g.mode, g.act, n, Nw, target.data_ptr(), target.stride(0),
        bias_in_epilogue ? b.select(0, e).data_ptr() : nullptr,
        keep_pre && bias_in_epilogue ? target.data_ptr() : nullptr, target.stride(0), oe.data_ptr(),
        oe.stride(0)});
  }
  // The dropped tail: no expert, output 0 (and pre 0, so nothing stale is ever saved).
  if (o[E] < N) {
    out.narrow(0, o[E], N - o[E]).zero_();
    if (pre.numel()) pre.narrow(0, o[E], N - o[E]).zero_();
  }
  return {out, pre};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> grouped_linear_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& x,
                                                                      const at::Tensor& weight,
                                                                      const at::Tensor& offsets, const at::Tensor& pre,
                                                                      c10::string_view activation, bool has_bias) {
  constexpr const char* op = "grouped_linear_bwd";
  const GroupedActivation g = grouped_activation_arg(op, activation);
  const DType dtype = kernel_input_arg(op, "x", x, c10::DeviceType::CPU, /*allow_half=*/false);
  const at::Tensor off = grouped_args(op, x, weight, offsets, g);
  const int64_t E = weight.size(0), N = x.size(0), Nw = weight.size(1), K = x.size(1);
  const int64_t width = g.mode == GroupedAct::kGated ? Nw / 2 : Nw;
  same_place_arg(op, "grad_out", grad_out, x);
  TORCH_CHECK_VALUE(grad_out.dim() == 2 && grad_out.size(0) == N && grad_out.size(1) == width, op,
                    ": grad_out must have shape (", N, ", ", width, "), got ", grad_out.sizes());
  if (g.mode != GroupedAct::kNone) {
    same_place_arg(op, "pre", pre, x);
    TORCH_CHECK_VALUE(pre.dim() == 2 && pre.size(0) == N && pre.size(1) == Nw, op, ": pre must have shape (", N,
                      ", ", Nw, ") for activation '", std::string(activation), "', got ", pre.sizes());
  }
  const int32_t* o = off.data_ptr<int32_t>();
  const int64_t used = o[E];
  const at::Tensor go = unit_cols(grad_out), xs = unit_cols(x);
  const at::Tensor w = weight.size(2) > 1 && weight.stride(2) != 1 ? weight.contiguous() : weight;
  at::Tensor grad_bias = has_bias ? at::empty({E, Nw}, x.options()) : at::empty({0}, x.options());
  at::Tensor grad_p = go;
  if (g.mode != GroupedAct::kNone) grad_p = empty_output({used, Nw}, x.options());
  if (g.mode != GroupedAct::kNone || has_bias) {
    const at::Tensor pr = g.mode == GroupedAct::kNone ? at::Tensor() : unit_cols(pre);
    grouped_linear_grad_cpu(GroupedGradArgs{dtype, g.mode, g.act, E, Nw, o, go.data_ptr(), go.stride(0),
                                            pr.defined() ? pr.data_ptr() : nullptr, pr.defined() ? pr.stride(0) : 0,
                                            grad_p.data_ptr(), grad_p.stride(0),
                                            has_bias ? grad_bias.data_ptr() : nullptr});
  }
  at::Tensor grad_x = empty_output({N, K}, x.options());
  at::Tensor grad_w = empty_output({E, Nw, K}, weight.options());
  for (int64_t e = 0; e < E; ++e) {
    const int64_t r0 = o[e], n = o[e + 1] - o[e];
    at::Tensor gw = grad_w.select(0, e);
    if (n == 0) {
      gw.zero_();
      continue;
    }
    const at::Tensor gp = grad_p.narrow(0, r0, n);
    at::Tensor gx = grad_x.narrow(0, r0, n);
    at::mm_out(gx, gp, w.select(0, e));
    at::mm_out(gw, gp.t(), xs.narrow(0, r0, n));
  }
  if (used < N) grad_x.narrow(0, used, N - used).zero_();
  return {grad_x, grad_w, grad_bias};
}

}  // namespace
}  // namespace fastlm::bind

TORCH_LIBRARY_IMPL(fastlm, CPU, m) {
  m.impl("grouped_linear_fwd", &fastlm::bind::grouped_linear_fwd_cpu);
  m.impl("grouped_linear_bwd", &fastlm::bind::grouped_linear_bwd_cpu);
}
