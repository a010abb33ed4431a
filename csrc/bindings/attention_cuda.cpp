// attention: the CUDA implementation of attention_fwd declared in attention.cpp (tensor-core
// forward, fp16/bf16). There is no CUDA attention_bwd: the Python op routes calls that need a
// gradient to another backend and says so in the registry's reasons.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include "attention_args.h"

namespace fastlm::bind {
namespace {

std::tuple<at::Tensor, at::Tensor> attention_fwd_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                      const std::optional<at::Tensor>& mask, int64_t causal,
                                                      double scale) {
  constexpr const char* op = "attention";
  TORCH_CHECK_VALUE(q.device().is_cuda(), op, ": q must be a CUDA tensor here, got ", q.device().str());
  TORCH_CHECK_TYPE(q.scalar_type() != at::kFloat, op, ": q must be float16 or bfloat16 on ", q.device().str(),
                   " (the cuda attention kernel runs on tensor cores), got ", q.scalar_type());
  const AttentionShape sh = check_args(op, q, k, v, mask, causal, scale, /*allow_half=*/true);
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = at::empty({sh.batch, sh.heads, sh.tq, sh.value_dim}, q.options());
  at::Tensor lse = at::empty({sh.batch, sh.heads, sh.tq}, q.options().dtype(at::kFloat));
  if (out.numel() == 0 && lse.numel() == 0) return {out, lse};
  if (nothing_to_attend(sh, out, lse)) return {out, lse};
  const int status = attention_forward_cuda(sh, strided(q), strided(k), strided(v), mask ? strided(*mask) : kNoMask,
                                            out.data_ptr(), lse.data_ptr<float>(),
                                            c10::cuda::getCurrentCUDAStream(q.device().index()).stream());
  TORCH_CHECK(status == 0, op, ": CUDA launch failed: ", cudaGetErrorString(static_cast<cudaError_t>(status)));
  return {out, lse};
}

}  // namespace
}  // namespace fastlm::bind

TORCH_LIBRARY_IMPL(fastlm, CUDA, m) { m.impl("attention_fwd", &fastlm::bind::attention_fwd_cuda); }
