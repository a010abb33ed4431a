// linear: CUDA implementation of the op declared in linear.cpp (the hand-written tensor-core
// GEMM with the fused epilogue in csrc/cuda/linear.cu).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstdint>

#include "fastlm/linear.h"
#include "gpu_binding.h"
#include "linear_common.h"

namespace fastlm::bind {
namespace {

// Contiguous rows, 16-byte aligned: what cp.async's and the epilogue's 16-byte chunks need;
// copies otherwise. A contiguous view can still start off a 16-byte boundary (a storage offset
// that is not a multiple of 8 elements), and .contiguous() returns such a view as it is: clone it
// instead. 1-D tensors (bias) count as one row.
at::Tensor gemm_operand(const at::Tensor& t) {
  const bool rows = t.dim() == 1 || t.stride(0) % 8 == 0 || t.size(0) <= 1;
  const bool ok = t.stride(-1) == 1 && rows && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  return ok ? t : t.clone(at::MemoryFormat::Contiguous);
}

int64_t row_stride(const at::Tensor& t) { return t.size(0) <= 1 ? t.size(1) : t.stride(0); }

std::tuple<at::Tensor, at::Tensor> linear_fwd_cuda(const at::Tensor& x_in, const at::Tensor& w_in,
                                                   const std::optional<at::Tensor>& bias,
                                                   const std::optional<at::Tensor>& residual,
                                                   c10::string_view activation, bool save_preact) {
  constexpr const char* op = "linear";
  Activation act = Activation::kGelu;
  const bool has_act = optional_activation_arg(op, activation, &act);
  TORCH_CHECK_VALUE(x_in.device().type() == kGpu, op, ": x must be a ", kGpuName, " tensor here, got ", x_in.device().str());
  TORCH_CHECK_TYPE(x_in.scalar_type() == at::kHalf || x_in.scalar_type() == at::kBFloat16, op,
                   ": x must be float16 or bfloat16 for the CUDA tensor-core GEMM, got ", x_in.scalar_type());
  const DType dtype = x_in.scalar_type() == at::kHalf ? DType::kFloat16 : DType::kBFloat16;
  linear_args(op, x_in, w_in, bias, residual);
  const int64_t M = x_in.size(0), K = x_in.size(1), N = w_in.size(0);
  TORCH_CHECK_VALUE(N % 8 == 0 && K % 8 == 0, op, ": the CUDA GEMM needs N and K multiples of 8, got N=", N,
                    ", K=", K);
  const GpuGuard guard(x_in.device());
  at::Tensor y = at::empty({M, N}, x_in.options());
  at::Tensor pre = at::empty(save_preact ? at::IntArrayRef{M, N} : at::IntArrayRef{0}, x_in.options());
  if (M == 0 || N == 0) return {y, pre};
  const bool empty_k = K == 0;  // the GEMM is all zeros; the kernel runs only its epilogue
  const at::Tensor x = empty_k ? x_in : gemm_operand(x_in), w = empty_k ? w_in : gemm_operand(w_in);
  const at::Tensor b = bias ? gemm_operand(*bias) : at::Tensor();
  const at::Tensor r = residual ? gemm_operand(rows_view(*residual)) : at::Tensor();
  const int64_t workspace = linear_forward_cuda_workspace(M, N, K);
  at::Tensor ws = at::empty({workspace}, x_in.options().dtype(at::kFloat));
  const LinearCudaArgs args{dtype, has_act, act, M, N, K, x.data_ptr(), empty_k ? 0 : row_stride(x), w.data_ptr(),
                            empty_k ? 0 : row_stride(w), b.defined() ? b.data_ptr() : nullptr,
                            r.defined() ? r.data_ptr() : nullptr, r.defined() ? row_stride(r) : 0, y.data_ptr(),
                            save_preact ? pre.data_ptr() : nullptr, workspace ? ws.data_ptr<float>() : nullptr};
  check_launch(op, linear_forward_cuda(args, gpu_stream()));
  return {y, pre};
}

// grad_x = grad_p @ weight and grad_weight = grad_p^T @ x on the forward's GEMM core (grad_p is
// grad_y * act'(p), computed by bias_act_bwd beforehand).
std::tuple<at::Tensor, at::Tensor> linear_bwd_cuda(const at::Tensor& grad_p_in, const at::Tensor& x_in,
                                                   const at::Tensor& w_in) {
  constexpr const char* op = "linear_bwd";
  TORCH_CHECK_VALUE(x_in.device().type() == kGpu, op, ": x must be a ", kGpuName, " tensor here, got ", x_in.device().str());
  TORCH_CHECK_TYPE(x_in.scalar_type() == at::kHalf || x_in.scalar_type() == at::kBFloat16, op,
                   ": x must be float16 or bfloat16 for the CUDA tensor-core GEMM, got ", x_in.scalar_type());
  TORCH_CHECK_VALUE(x_in.dim() == 2 && w_in.dim() == 2 && w_in.size(1) == x_in.size(1), op,
                    ": x must be (M, K) and weight (N, K), got ", x_in.sizes(), " and ", w_in.sizes());
  const int64_t M = x_in.size(0), K = x_in.size(1), N = w_in.size(0);
  TORCH_CHECK_VALUE(grad_p_in.dim() == 2 && grad_p_in.size(0) == M && grad_p_in.size(1) == N, op,
                    ": grad_p must have shape (", M, ", ", N, "), got ", grad_p_in.sizes());
  for (const at::Tensor* t : {&grad_p_in, &w_in}) {
    TORCH_CHECK_TYPE(t->scalar_type() == x_in.scalar_type(), op, ": grad_p and weight must have x's dtype ",
                     x_in.scalar_type(), ", got ", t->scalar_type());
    TORCH_CHECK_VALUE(t->device() == x_in.device(), op, ": grad_p and weight must be on x's device ",
                      x_in.device().str(), ", got ", t->device().str());
  }
  TORCH_CHECK_VALUE(N % 8 == 0 && K % 8 == 0, op, ": the CUDA GEMM needs N and K multiples of 8, got N=", N,
                    ", K=", K);
  const GpuGuard guard(x_in.device());
  at::Tensor gx = at::empty({M, K}, x_in.options()), gw = at::empty({N, K}, x_in.options());
  if (K == 0 || N == 0) return {gx, gw};
  const at::Tensor gp = gemm_operand(grad_p_in), x = gemm_operand(x_in), w = gemm_operand(w_in);
  const DType dtype = x_in.scalar_type() == at::kHalf ? DType::kFloat16 : DType::kBFloat16;
  const LinearGradCudaArgs args{dtype, M, N, K, gp.data_ptr(), row_stride(gp), x.data_ptr(), row_stride(x),
                                w.data_ptr(), row_stride(w), gx.data_ptr(), gw.data_ptr()};
  check_launch(op, linear_backward_cuda(args, gpu_stream()));
  return {gx, gw};
}

}  // namespace
}  // namespace fastlm::bind

// linear_bwd has a GPU kernel only (the cpu backend's backward GEMMs are torch.mm): declared
// here, so it exists wherever this file is built (the CUDA build and the emulator).
TORCH_LIBRARY_FRAGMENT(FASTLM_GPU_NAMESPACE, m) {
  m.def("linear_bwd(Tensor grad_p, Tensor x, Tensor weight) -> (Tensor grad_x, Tensor grad_weight)");
}

TORCH_LIBRARY_IMPL(FASTLM_GPU_NAMESPACE, FASTLM_GPU_KEY, m) {
  m.impl("linear_fwd", &fastlm::bind::linear_fwd_cuda);
  m.impl("linear_bwd", &fastlm::bind::linear_bwd_cuda);
}
