// linear: schema and CPU implementation (the CUDA one is in linear_cuda.cpp).
// The CPU GEMM is torch's (MKL / oneDNN, the fastest there is here), one call over all of M:
// splitting M into L2-sized row blocks with the epilogue after each was measured 1.5-3x slower
// on this 2-core machine, because every call re-packs the whole weight. The epilogue
// act(z + bias) + residual is then one fused pass (csrc/cpu/linear.cpp), in place on the GEMM
// output (no second (M, N) allocation) unless the pre-activation is kept for the backward.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>


#include "fastlm/linear.h"
#include "linear_common.h"
#include "cpu_output.h"

namespace fastlm::bind {
namespace {

std::tuple<at::Tensor, at::Tensor> linear_fwd_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                  const std::optional<at::Tensor>& bias,
                                                  const std::optional<at::Tensor>& residual,
                                                  c10::string_view activation, bool save_preact) {
  constexpr const char* op = "linear";
  Activation act = Activation::kGelu;
  const bool has_act = optional_activation_arg(op, activation, &act);
  const DType dtype = kernel_input_arg(op, "x", x, c10::DeviceType::CPU, /*allow_half=*/false);
  linear_args(op, x, weight, bias, residual);
  const int64_t M = x.size(0), N = weight.size(0);
  at::Tensor z = empty_output({M, N}, x.options());  // x @ weight^T; becomes z + bias when it is saved
  at::Tensor y = save_preact ? empty_output({M, N}, x.options()) : z;
  const at::Tensor b = bias ? bias->contiguous() : at::Tensor();
  const at::Tensor r = residual ? rows_view(*residual) : at::Tensor();
  // bf16: the bias goes into the GEMM (addmm), so z + bias is rounded once as in eager; adding it
  // to an already-rounded bf16 z could flip signs near 0 (relu's derivative). fp32: mm, and the
  // bias add rides in the epilogue pass, saving addmm's extra pass that broadcasts bias into z.
  const bool bias_in_gemm = b.defined() && dtype == DType::kBFloat16;
  if (bias_in_gemm) at::addmm_out(z, b, x, weight.t());
  else at::mm_out(z, x, weight.t());
  const bool epilogue = has_act || residual.has_value() || (b.defined() && !bias_in_gemm);
  if (epilogue)
    run_linear_epilogue_cpu(dtype, has_act, act, z, bias_in_gemm ? at::Tensor() : b, r, y,
                            save_preact && !bias_in_gemm ? z : at::Tensor());
  if (save_preact && !epilogue) y.copy_(z);
  return {y, save_preact ? z : at::empty({0}, x.options())};
}

}  // namespace
}  // namespace fastlm::bind

TORCH_LIBRARY_IMPL(fastlm, CPU, m) { m.impl("linear_fwd", &fastlm::bind::linear_fwd_cpu); }
