// rope: the CUDA implementation of rope_fwd (and, built with -DFASTLM_EMU, the emulated one).
// Validate, allocate outputs with q's and k's layouts, launch on the current stream.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "gpu_binding.h"
#include "rope_args.h"

namespace fastlm::bind {
namespace {

std::tuple<at::Tensor, at::Tensor> rope_fwd_cuda(const at::Tensor& q, const at::Tensor& k,
                                                 const std::optional<at::Tensor>& cos,
                                                 const std::optional<at::Tensor>& sin,
                                                 const std::optional<at::Tensor>& positions,
                                                 const std::optional<at::Tensor>& inv_freq, double scale,
                                                 bool interleaved, bool inverse) {
  constexpr const char* op = "rope";
  const DType dtype = kernel_input_arg(op, "q", q, kGpu, /*allow_half=*/true);
  RopeProblem p = rope_args(op, q, k, cos, sin, positions, inv_freq, scale, interleaved, inverse, dtype);
  TORCH_CHECK_VALUE(p.half_rotary <= kRopeCudaMaxHalfRotary, op, ": the cuda kernels take R/2 up to ",
                    kRopeCudaMaxHalfRotary, ", got ", p.half_rotary);
  const GpuGuard guard(q.device());
  at::Tensor q_out = at::empty_like(q), k_out = at::empty_like(k);
  rope_outputs(p, q_out, k_out);
  check_launch(op, rope_cuda(p, gpu_stream()));
  return {q_out, k_out};
}

}  // namespace
}  // namespace fastlm::bind

TORCH_LIBRARY_IMPL(FASTLM_GPU_NAMESPACE, FASTLM_GPU_KEY, m) { m.impl("rope_fwd", &fastlm::bind::rope_fwd_cuda); }
