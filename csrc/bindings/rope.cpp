// rope: the CPU implementation of rope_fwd (schema in schemas.h; CUDA in rope_cuda.cpp).
// The backward is the same op with inverse = true.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "rope_args.h"

namespace fastlm::bind {
namespace {

std::tuple<at::Tensor, at::Tensor> rope_fwd_cpu(const at::Tensor& q, const at::Tensor& k,
                                                const std::optional<at::Tensor>& cos,
                                                const std::optional<at::Tensor>& sin,
                                                const std::optional<at::Tensor>& positions,
                                                const std::optional<at::Tensor>& inv_freq, double scale,
                                                bool interleaved, bool inverse) {
  constexpr const char* op = "rope";
  const DType dtype = kernel_input_arg(op, "q", q, c10::DeviceType::CPU, /*allow_half=*/false);
  RopeProblem p = rope_args(op, q, k, cos, sin, positions, inv_freq, scale, interleaved, inverse, dtype);
  at::Tensor q_out = at::empty_like(q), k_out = at::empty_like(k);
  rope_outputs(p, q_out, k_out);
  rope_cpu(p);
  return {q_out, k_out};
}

}  // namespace
}  // namespace fastlm::bind

TORCH_LIBRARY_IMPL(fastlm, CPU, m) { m.impl("rope_fwd", &fastlm::bind::rope_fwd_cpu); }
