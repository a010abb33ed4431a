// grouped_linear: CUDA implementations of grouped_linear_fwd / grouped_linear_bwd (the schemas of
// the cpu ops in moe_grouped_linear.cpp), on the grouped GEMM kernels of
// csrc/cuda/moe_grouped_linear.cu. The kernels want every width and K a multiple of 8 (16-byte
// cp.async chunks and epilogue stores); odd shapes are zero-padded here (a gated weight's gate
// and up halves each padded, so they stay halves) and the outputs cut back: copies only for
// shapes no real model has. The weight is read in place (weight_read) either as (E, Nw, K) rows
// (stride(2) == 1) or as the transposed view of an (E, K, Nw) buffer (stride(1) == 1, GPT-OSS's
// experts as fastlm.patch passes them); it is copied (contiguous, padded) only when K or the
// output width (each half when gated) is not a multiple of 8, its base is not 16-byte aligned, or
// its expert stride or its other (non-unit) stride is not a multiple of 8 elements. grad_weight
// comes back in the weight's layout (at::empty_like's, as on every backend): the dW GEMM writes a
// transposed one transposed, so autograd's transpose hands GPT-OSS's (E, in, out) parameter a
// gradient already in its layout, and AccumulateGrad takes it without a copy. Offsets are checked on the host only where
// they live there (the emulator); on a GPU the kernels read them on the device, clamped into [0, N].
#include <ATen/core/Tensor.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cstdint>
#include <string>
#include <vector>

#include "common.h"
#include "fastlm/moe.h"
#include "gpu_binding.h"
#include "moe_args.h"
#include "schemas.h"

namespace fastlm::bind {
namespace {

int64_t round8(int64_t v) { return (v + 7) / 8 * 8; }

// `t` with dimension `dim` = parts x part spread to parts x part8: part p at [p part8, p part8 + part),
// zeros between. Unchanged when part is already a multiple of 8.
at::Tensor spread(const at::Tensor& t, int64_t dim, int64_t parts, int64_t part, int64_t part8) {
  if (part == part8) return t;
  std::vector<int64_t> shape(t.sizes().begin(), t.sizes().end());
  shape[dim] = parts * part8;
  at::Tensor out = at::zeros(shape, t.options());
  for (int64_t p = 0; p < parts; ++p) out.narrow(dim, p * part8, part).copy_(t.narrow(dim, p * part, part));
  return out;
}

// spread's inverse: the parts x part entries of `t`'s dimension `dim`, contiguous.
at::Tensor gather(const at::Tensor& t, int64_t dim, int64_t parts, int64_t part, int64_t part8) {
  if (part == part8) return t;
  std::vector<at::Tensor> pieces;
  for (int64_t p = 0; p < parts; ++p) pieces.push_back(t.narrow(dim, p * part8, part));
  return parts == 1 ? pieces[0].contiguous() : at::cat(pieces, dim);
}

// Unit last stride, every other stride a multiple of 8 elements, 16-byte aligned: what the
// GEMM's 16-byte chunks need; a contiguous copy otherwise.
at::Tensor gemm_operand(const at::Tensor& t) {
  bool ok = t.stride(-1) == 1 || t.size(-1) <= 1;
  for (int64_t d = 0; d + 1 < t.dim(); ++d) ok = ok && (t.stride(d) % 8 == 0 || t.size(d) <= 1);
  ok = ok && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  return ok ? t : t.clone(at::MemoryFormat::Contiguous);
}
// Stride d in elements; a dimension of extent <= 1 has no meaningful stride: its dense one.
int64_t stride_of(const at::Tensor& t, int64_t d) {
  if (t.size(d) > 1) return t.stride(d);
  int64_t dense = 1;
  for (int64_t i = d + 1; i < t.dim(); ++i) dense *= t.size(i);
  return dense;
}

// x fp16/bf16 on this binding's device (the rest: grouped_args, moe_args.h). Returns the dtype.
DType gpu_rows_arg(const char* op, const at::Tensor& x) {
  TORCH_CHECK_VALUE(x.device().type() == kGpu, op, ": x must be a ", kGpuName, " tensor here, got ", x.device().str());
  TORCH_CHECK_TYPE(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16, op,
                   ": x must be float16 or bfloat16 for the CUDA tensor-core GEMM, got ", x.scalar_type());
  return x.scalar_type() == at::kHalf ? DType::kFloat16 : DType::kBFloat16;
}

// The padded extents: K8, the output width and its padding, and the parts of Nw (2 when gated).
struct Extents {
  int64_t k, k8, width, width8, parts;
  int64_t cols8() const { return parts * width8; }
};
Extents extents(const at::Tensor& x, const at::Tensor& weight, const GroupedActivation& m) {
  const int64_t parts = m.mode == GroupedAct::kGated ? 2 : 1, width = weight.size(1) / parts;
  return {x.size(1), round8(x.size(1)), width, round8(width), parts};
}

// How the kernels read weight (E, Nw, K): in place by rows (K contiguous) or by columns (Nw
// contiguous: the transposed view of an (E, K, Nw) buffer), or from a padded contiguous copy.
enum class WeightRead { kRows, kColumns, kPaddedCopy };
WeightRead weight_read(const at::Tensor& w, const Extents& s) {
  const auto unit = [&](int64_t d) { return w.size(d) <= 1 || w.stride(d) == 1; };
  const auto by8 = [&](int64_t d) { return w.size(d) <= 1 || w.stride(d) % 8 == 0; };
  const bool ok = s.k == s.k8 && s.width == s.width8 && reinterpret_cast<uintptr_t>(w.data_ptr()) % 16 == 0 && by8(0);
  if (ok && unit(2) && by8(1)) return WeightRead::kRows;
  if (ok && unit(1) && by8(2)) return WeightRead::kColumns;
  return WeightRead::kPaddedCopy;
}

// The weight as the kernels read it: the tensor itself, or (E, Nw8, K8) with its halves and K
// padded, contiguous; with the arguments' row stride and orientation.
struct WeightOperand {
  at::Tensor w;
  int64_t stride;
  bool transposed;
};
WeightOperand weight_operand(const at::Tensor& w, const Extents& s) {
  switch (weight_read(w, s)) {
    case WeightRead::kRows: return {w, stride_of(w, 1), false};
    case WeightRead::kColumns: return {w, w.size(2) > 1 ? w.stride(2) : s.cols8(), true};
    default: return {gemm_operand(spread(spread(w, 2, 1, s.k, s.k8), 1, s.parts, s.width, s.width8)), s.k8, false};
  }
}

std::tuple<at::Tensor, at::Tensor> grouped_linear_fwd_cuda(const at::Tensor& x, const at::Tensor& weight,
                                                           const at::Tensor& offsets,
                                                           const std::optional<at::Tensor>& bias,
                                                           c10::string_view activation, bool save_pre) {
  constexpr const char* op = "grouped_linear_fwd";
  const DType dtype = gpu_rows_arg(op, x);
  const auto [m, off, E, N, Nw, width] = grouped_args(op, x, weight, offsets, activation, bias);
  const Extents s = extents(x, weight, m);
  const bool keep_pre = save_pre && m.mode != GroupedAct::kNone;
  const GpuGuard guard(x.device());
  at::Tensor out = at::empty({N, s.width8}, x.options());
  at::Tensor pre = at::empty(keep_pre ? at::IntArrayRef{N, s.cols8()} : at::IntArrayRef{0}, x.options());
  if (N > 0 && s.width > 0) {
    const at::Tensor xp = gemm_operand(spread(x, 1, 1, s.k, s.k8));
    const WeightOperand w = weight_operand(weight, s);
    const at::Tensor b = bias ? gemm_operand(spread(*bias, 1, s.parts, s.width, s.width8).contiguous()) : at::Tensor();
    const GroupedLinearCudaArgs args{dtype, m.mode, m.act, N, E, s.k8, s.width8, off.data_ptr<int32_t>(),
                                     xp.data_ptr(), stride_of(xp, 0), w.w.data_ptr(), stride_of(w.w, 0),
                                     w.stride, w.transposed, b.defined() ? b.data_ptr() : nullptr,
                                     out.data_ptr(), s.width8, keep_pre ? pre.data_ptr() : nullptr, s.cols8()};
    check_launch(op, grouped_linear_forward_cuda(args, gpu_stream()));
  }
  return {gather(out, 1, 1, s.width, s.width8), keep_pre ? gather(pre, 1, s.parts, s.width, s.width8) : pre};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> grouped_linear_bwd_cuda(const at::Tensor& grad_out, const at::Tensor& x,
                                                                       const at::Tensor& weight,
                                                                       const at::Tensor& offsets, const at::Tensor& pre,
                                                                       c10::string_view activation, bool has_bias) {
  constexpr const char* op = "grouped_linear_bwd";
  const DType dtype = gpu_rows_arg(op, x);
  const GroupedArgs ga = grouped_args(op, x, weight, offsets, activation);
  grouped_grad_args(op, ga, x, grad_out, pre, activation);
  const auto [m, off, E, N, Nw, width] = ga;
  const int64_t K = x.size(1);
  const Extents s = extents(x, weight, m);
  const bool act = m.mode != GroupedAct::kNone;
  const GpuGuard guard(x.device());
  at::Tensor grad_x = at::empty({N, s.k8}, x.options());
  // grad_weight in the weight's layout (at::empty_like's, what the op's fake promises): written
  // there by the dW GEMM when unpadded and contiguous either way round (a transposed weight:
  // stored transposed, so autograd hands GPT-OSS's (E, in, out) parameter its gradient with no
  // copy); otherwise the padded contiguous result is copied in.
  at::Tensor grad_w = at::empty_like(weight);
  const bool unpadded = s.k == s.k8 && s.width == s.width8;
  const bool gw_rows = unpadded && grad_w.is_contiguous();
  const bool gw_cols = unpadded && !gw_rows && grad_w.transpose(1, 2).is_contiguous();
  at::Tensor gw_buf = gw_rows || gw_cols ? grad_w : at::empty({E, s.cols8(), s.k8}, x.options());
  at::Tensor grad_b = at::empty(has_bias ? at::IntArrayRef{E, s.cols8()} : at::IntArrayRef{0}, x.options());
  if (E > 0 || N > 0) {
    const at::Tensor go = gemm_operand(spread(grad_out, 1, 1, s.width, s.width8));
    const at::Tensor pr = act ? gemm_operand(spread(pre, 1, s.parts, s.width, s.width8)) : at::Tensor();
    const at::Tensor xp = gemm_operand(spread(x, 1, 1, s.k, s.k8));
    const WeightOperand w = weight_operand(weight, s);
    at::Tensor grad_p = at::empty(act ? at::IntArrayRef{N, s.cols8()} : at::IntArrayRef{0}, x.options());
    const GroupedLinearGradCudaArgs args{dtype, m.mode, m.act, N, E, s.k8, s.width8, off.data_ptr<int32_t>(),
                                         go.data_ptr(), stride_of(go, 0), act ? pr.data_ptr() : nullptr,
                                         act ? stride_of(pr, 0) : 0, xp.data_ptr(), stride_of(xp, 0),
                                         w.w.data_ptr(), stride_of(w.w, 0), w.stride, w.transposed,
                                         act ? grad_p.data_ptr() : nullptr,
                                         s.cols8(), grad_x.data_ptr(), gw_buf.data_ptr(), gw_cols,
                                         has_bias ? grad_b.data_ptr() : nullptr};
    check_launch(op, grouped_linear_backward_cuda(args, gpu_stream()));
  }
  if (!gw_rows && !gw_cols) grad_w.copy_(gather(gather(gw_buf, 2, 1, K, s.k8), 1, s.parts, s.width, s.width8));
  return {gather(grad_x, 1, 1, K, s.k8), grad_w, has_bias ? gather(grad_b, 1, s.parts, s.width, s.width8) : grad_b};
}

}  // namespace
}  // namespace fastlm::bind

#ifdef FASTLM_EMU
// The emulator module declares only the ops it has kernels for; the MoE schemas live in
// kMoeSchemas (the CPU module defines them all): take the grouped_linear ones from there.
TORCH_LIBRARY_FRAGMENT(FASTLM_GPU_NAMESPACE, m) {
  for (const char* schema : fastlm::bind::kMoeSchemas)
    if (std::string(schema).rfind("grouped_linear_", 0) == 0) m.def(schema);
}
#endif

TORCH_LIBRARY_IMPL(FASTLM_GPU_NAMESPACE, FASTLM_GPU_KEY, m) {
  m.impl("grouped_linear_fwd", &fastlm::bind::grouped_linear_fwd_cuda);
  m.impl("grouped_linear_bwd", &fastlm::bind::grouped_linear_bwd_cuda);
}
