// layer_norm / rms_norm: CUDA implementations of the ops declared in norms.cpp.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include "norms_common.h"

namespace fastlm::bind {
namespace {

constexpr int64_t kMaxCols = 16384;  // csrc/cuda/norms.cu keeps a row in registers: 32 x 512 threads

void check_launch(const char* op, int status) {
  TORCH_CHECK(status == 0, op, ": CUDA launch failed: ", cudaGetErrorString(static_cast<cudaError_t>(status)));
}

NormOutputs norm_fwd_cuda(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                          const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                          double eps, bool rms) {
  constexpr const char* op = "norm_fwd";
  TORCH_CHECK_VALUE(x.dim() != 2 || x.size(1) <= kMaxCols, op, ": rows of ", x.size(-1),
                    " elements exceed the CUDA kernel's limit of ", kMaxCols);
  const c10::cuda::CUDAGuard guard(x.device());
  NormForwardPlan p = plan_norm_forward(op, x, residual, weight, bias, eps, rms, c10::DeviceType::CUDA);
  if (p.args.rows > 0 && p.args.cols > 0)
    check_launch(op, norm_forward_cuda(p.args, c10::cuda::getCurrentCUDAStream().stream()));
  return p.outputs();
}

NormGrads norm_bwd_cuda(const at::Tensor& grad_y, const std::optional<at::Tensor>& grad_sum, const at::Tensor& h,
                        const std::optional<at::Tensor>& weight, const at::Tensor& mean, const at::Tensor& rstd,
                        bool rms, bool bias_grad) {
  constexpr const char* op = "norm_bwd";
  TORCH_CHECK_VALUE(h.dim() != 2 || h.size(1) <= kMaxCols, op, ": rows of ", h.size(-1),
                    " elements exceed the CUDA kernel's limit of ", kMaxCols);
  const c10::cuda::CUDAGuard guard(h.device());
  NormBackwardPlan p = plan_norm_backward(op, grad_y, grad_sum, h, weight, mean, rstd, rms, bias_grad,
                                          c10::DeviceType::CUDA);
  if (p.args.rows > 0 && p.args.cols > 0) {
    at::Tensor ws = at::empty({norm_backward_cuda_workspace(p.args.rows, p.args.cols)},
                              h.options().dtype(at::kFloat));
    check_launch(op, norm_backward_cuda(p.args, ws.data_ptr<float>(), c10::cuda::getCurrentCUDAStream().stream()));
  }
  return p.outputs();
}

}  // namespace
}  // namespace fastlm::bind

TORCH_LIBRARY_IMPL(fastlm, CUDA, m) {
  m.impl("norm_fwd", &fastlm::bind::norm_fwd_cuda);
  m.impl("norm_bwd", &fastlm::bind::norm_bwd_cuda);
}
