// grouped_linear: CPU implementations of grouped_linear_fwd / grouped_linear_bwd, one call over
// all experts. The GEMMs are torch's (MKL / oneDNN) on each expert's row slice, as linear.cpp
// does for one matrix; the epilogue (bias, saved pre-activation, activation or gated halves) is
// one fused pass over each expert's block right after its GEMM (csrc/cpu/moe_grouped_linear.cpp).
// The backward computes grad_p (and grad_bias) for all experts in one pass, then per-expert GEMMs;
// grad_weight comes back in the weight's layout (empty_output_like), mm_out writing a transposed
// one's slices column-major in place.
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

// weight (E, Nw, K) as the per-expert GEMMs read it: at::mm takes either orientation of a
// matrix (MKL's transpose flags), so a (E, K, Nw) buffer seen through transpose(1, 2) (what
// GPT-OSS's experts store) is used in place; anything else is copied once.
at::Tensor mm_operand(const at::Tensor& weight) {
  const bool rows = weight.size(2) <= 1 || weight.stride(2) == 1, cols = weight.size(1) <= 1 || weight.stride(1) == 1;
  return rows || cols ? weight : weight.contiguous();
}

std::tuple<at::Tensor, at::Tensor> grouped_linear_fwd_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                          const at::Tensor& offsets,
                                                          const std::optional<at::Tensor>& bias,
                                                          c10::string_view activation, bool save_pre) {
  constexpr const char* op = "grouped_linear_fwd";
  const DType dtype = kernel_input_arg(op, "x", x, c10::DeviceType::CPU, /*allow_half=*/false);
  cpu_arg(op, "offsets", offsets);
  const auto [g, off, E, N, Nw, width] = grouped_args(op, x, weight, offsets, activation, bias);
  const int32_t* o = off.data_ptr<int32_t>();
  const at::Tensor xs = unit_cols(x);
  const at::Tensor w = mm_operand(weight);
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
  const DType dtype = kernel_input_arg(op, "x", x, c10::DeviceType::CPU, /*allow_half=*/false);
  cpu_arg(op, "offsets", offsets);
  const GroupedArgs ga = grouped_args(op, x, weight, offsets, activation);
  grouped_grad_args(op, ga, x, grad_out, pre, activation);
  const auto [g, off, E, N, Nw, width] = ga;
  const int64_t K = x.size(1);
  const int32_t* o = off.data_ptr<int32_t>();
  const int64_t used = o[E];
  const at::Tensor go = unit_cols(grad_out), xs = unit_cols(x);
  const at::Tensor w = mm_operand(weight);
  at::Tensor grad_bias = has_bias ? at::empty({E, Nw}, x.options()) : at::empty({0}, x.options());
  const at::Tensor pr = g.mode == GroupedAct::kNone ? at::Tensor() : unit_cols(pre);
  // grad_p = act'(pre) * grad_out (and the bias gradient's column sums) for rows [r0, r0 + n) of
  // one expert, or of all (experts = E, row offsets o) when no activation leaves grad_out as is.
  auto grad_rows = [&](int64_t r0, int64_t experts, const int32_t* offs, void* grad_p, int64_t stride, void* gb) {
    const size_t el = go.element_size();
    grouped_linear_grad_cpu(GroupedGradArgs{
        dtype, g.mode, g.act, experts, Nw, offs, static_cast<const char*>(go.data_ptr()) + r0 * go.stride(0) * el,
        go.stride(0), pr.defined() ? static_cast<const char*>(pr.data_ptr()) + r0 * pr.stride(0) * el : nullptr,
        pr.defined() ? pr.stride(0) : 0, grad_p, stride, gb});
  };
  if (g.mode == GroupedAct::kNone && has_bias) grad_rows(0, E, o, go.data_ptr(), go.stride(0), grad_bias.data_ptr());
  // With an activation, grad_p is made one expert at a time into a scratch block sized for the
  // largest expert, right before that expert's two GEMMs read it (still in the last-level cache:
  // 1024 x 3584 fp32 = 14.7 MB at Mixtral-tiny shapes), instead of one (N, Nw) buffer: 117 MB
  // at 8192 routed rows, a fresh mmap every call (zero-filled by the kernel) written once and
  // read back from DRAM twice.
  int64_t largest = 0;
  for (int64_t e = 0; e < E; ++e) largest = std::max<int64_t>(largest, o[e + 1] - o[e]);
  const at::Tensor scratch = g.mode != GroupedAct::kNone ? at::empty({largest, Nw}, x.options()) : at::Tensor();
  at::Tensor grad_x = empty_output({N, K}, x.options());
  at::Tensor grad_w = empty_output_like(weight);  // mm_out writes a column-major slice in place
  for (int64_t e = 0; e < E; ++e) {
    const int64_t r0 = o[e], n = o[e + 1] - o[e];
    at::Tensor gw = grad_w.select(0, e);
    if (n == 0) {
      gw.zero_();
      if (has_bias && g.mode != GroupedAct::kNone) grad_bias.select(0, e).zero_();
      continue;
    }
    at::Tensor gp = go.narrow(0, r0, n);
    if (g.mode != GroupedAct::kNone) {
      const int32_t local[2] = {0, int32_t(n)};
      gp = scratch.narrow(0, 0, n);
      grad_rows(r0, 1, local, gp.data_ptr(), gp.stride(0), has_bias ? grad_bias.select(0, e).data_ptr() : nullptr);
    }
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
