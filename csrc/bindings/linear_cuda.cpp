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

// K-contiguous rows, 16-byte aligned: what cp.async's 16-byte chunks need; copies otherwise.
// A contiguous view can still start off a 16-byte boundary (a storage offset that is not a
// multiple of 8 elements), and .contiguous() returns such a view as it is: clone it instead.
at::Tensor gemm_operand(const at::Tensor& t) {
  const bool ok = t.stride(1) == 1 && t.stride(0) % 8 == 0 && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  return ok ? t : t.clone(at::MemoryFormat::Contiguous);
}

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
  const at::Tensor b = bias ? bias->contiguous() : at::Tensor();
  const at::Tensor r = residual ? rows_view(*residual) : at::Tensor();
  const LinearCudaArgs args{dtype, has_act, act, M, N, K, x.data_ptr(), x.stride(0), w.data_ptr(), w.stride(0),
                            b.defined() ? b.data_ptr() : nullptr, r.defined() ? r.data_ptr() : nullptr,
                            r.defined() ? r.stride(0) : 0, y.data_ptr(), save_preact ? pre.data_ptr() : nullptr};
  check_launch(op, linear_forward_cuda(args, gpu_stream()));
  return {y, pre};
}

}  // namespace
}  // namespace fastlm::bind

TORCH_LIBRARY_IMPL(FASTLM_GPU_NAMESPACE, FASTLM_GPU_KEY, m) { m.impl("linear_fwd", &fastlm::bind::linear_fwd_cuda); }
