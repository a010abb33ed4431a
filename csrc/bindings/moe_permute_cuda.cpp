// moe_permute / moe_unpermute: CUDA implementations (kernels in csrc/cuda/moe_permute.cu). Index
// values are checked here only where they live in host memory (the emulator build): a GPU
// tensor's values are never read on the host, and the kernels treat an out-of-range index as
// dropped instead of touching memory outside the tensors.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "fastlm/moe.h"
#include "gpu_binding.h"
#include "moe_args.h"

namespace fastlm::bind {
namespace {

void row_index_values(const char* op, const at::Tensor& row_index, int64_t rows, bool unique) {
  if (row_index.device().is_cpu()) check_row_index_on_host(op, row_index, rows, unique);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_permute_fwd_cuda(const at::Tensor& x, const at::Tensor& expert_ids,
                                                                    int64_t num_experts) {
  constexpr const char* op = "moe_permute_fwd";
  rows_arg(op, "x", x, kGpu);
  index_arg(op, "expert_ids", expert_ids, x.size(0), kGpu);
  same_device_arg(op, "expert_ids", expert_ids, "x", x);
  TORCH_CHECK_VALUE(num_experts >= 0 && num_experts < INT32_MAX, op, ": num_experts must be >= 0, got ", num_experts);
  if (expert_ids.device().is_cpu()) check_expert_ids_on_host(op, expert_ids, num_experts);
  const int64_t T = x.size(0), H = x.size(1), k = expert_ids.size(1), E = num_experts;
  const GpuGuard guard(x.device());
  const at::Tensor xs = unit_cols(x);
  at::Tensor sorted = at::empty({T * k, H}, x.options());
  at::Tensor row_index = at::empty({T, k}, expert_ids.options());
  at::Tensor offsets = at::empty({E + 1}, expert_ids.options());
  at::Tensor ws = at::empty({int64_t(moe_permute_workspace_bytes_cuda(T, k, E))}, x.options().dtype(at::kByte));
  check_launch(op, moe_permute_forward_cuda(T, k, E, expert_ids.data_ptr<int32_t>(), expert_ids.stride(0),
                                            expert_ids.stride(1), xs.data_ptr(), xs.stride(0) * xs.element_size(),
                                            H * xs.element_size(), sorted.data_ptr(), row_index.data_ptr<int32_t>(),
                                            offsets.data_ptr<int32_t>(), ws.data_ptr(), gpu_stream()));
  return {sorted, row_index, offsets};
}

// out (T, H) = sum over slots of weights * rows (weights undefined: unit weights).
at::Tensor gather_rows(const char* op, DType dtype, const at::Tensor& rows, const at::Tensor& row_index,
                       const at::Tensor& weights) {
  const int64_t T = row_index.size(0), k = row_index.size(1), H = rows.size(1);
  const GpuGuard guard(rows.device());
  const at::Tensor y = unit_cols(rows);
  at::Tensor out = at::empty({T, H}, rows.options());
  const bool weighted = weights.defined();
  check_launch(op, moe_unpermute_forward_cuda(dtype, T, k, H, y.size(0), y.data_ptr(), y.stride(0),
                                              row_index.data_ptr<int32_t>(), row_index.stride(0),
                                              row_index.stride(1), weighted ? weights.data_ptr<float>() : nullptr,
                                              weighted ? weights.stride(0) : 0, weighted ? weights.stride(1) : 0,
                                              out.data_ptr(), H, gpu_stream()));
  return out;
}

at::Tensor moe_permute_bwd_cuda(const at::Tensor& grad_sorted, const at::Tensor& row_index) {
  constexpr const char* op = "moe_permute_bwd";
  const DType dtype = rows_arg(op, "grad_sorted", grad_sorted, kGpu);
  index_arg(op, "row_index", row_index, -1, kGpu);
  same_device_arg(op, "row_index", row_index, "grad_sorted", grad_sorted);
  row_index_values(op, row_index, grad_sorted.size(0), /*unique=*/false);
  return gather_rows(op, dtype, grad_sorted, row_index, at::Tensor());
}

at::Tensor moe_unpermute_fwd_cuda(const at::Tensor& y_sorted, const at::Tensor& row_index, const at::Tensor& weights) {
  constexpr const char* op = "moe_unpermute_fwd";
  const DType dtype = rows_arg(op, "y_sorted", y_sorted, kGpu);
  index_arg(op, "row_index", row_index, -1, kGpu);
  weights_arg(op, "weights", weights, row_index, kGpu);
  same_device_arg(op, "row_index", row_index, "y_sorted", y_sorted);
  same_device_arg(op, "weights", weights, "y_sorted", y_sorted);
  row_index_values(op, row_index, y_sorted.size(0), /*unique=*/false);
  return gather_rows(op, dtype, y_sorted, row_index, weights);
}

std::tuple<at::Tensor, at::Tensor> moe_unpermute_bwd_cuda(const at::Tensor& grad_out, const at::Tensor& y_sorted,
                                                          const at::Tensor& row_index, const at::Tensor& weights) {
  constexpr const char* op = "moe_unpermute_bwd";
  const DType dtype = rows_arg(op, "y_sorted", y_sorted, kGpu);
  index_arg(op, "row_index", row_index, -1, kGpu);
  weights_arg(op, "weights", weights, row_index, kGpu);
  rows_arg(op, "grad_out", grad_out, kGpu);
  same_dtype_arg(op, "grad_out", grad_out, "y_sorted", y_sorted);
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"grad_out", grad_out},
                                {"row_index", row_index}, {"weights", weights}})
    same_device_arg(op, name, t, "y_sorted", y_sorted);
  const int64_t T = row_index.size(0), k = row_index.size(1), N = y_sorted.size(0), H = y_sorted.size(1);
  TORCH_CHECK_VALUE(grad_out.size(0) == T && grad_out.size(1) == H, op, ": grad_out must have shape (", T, ", ", H,
                    "), got ", grad_out.sizes());
  row_index_values(op, row_index, N, /*unique=*/true);
  const GpuGuard guard(y_sorted.device());
  const at::Tensor go = unit_cols(grad_out), y = unit_cols(y_sorted);
  at::Tensor grad_y = at::empty({N, H}, y_sorted.options());
  at::Tensor grad_w = at::empty({T, k}, weights.options());
  at::Tensor referenced = at::empty({N}, y_sorted.options().dtype(at::kByte));
  check_launch(op, moe_unpermute_backward_cuda(dtype, T, k, H, N, go.data_ptr(), go.stride(0), y.data_ptr(),
                                               y.stride(0), row_index.data_ptr<int32_t>(), row_index.stride(0),
                                               row_index.stride(1), weights.data_ptr<float>(), weights.stride(0),
                                               weights.stride(1), grad_y.data_ptr(), H, grad_w.data_ptr<float>(),
                                               referenced.data_ptr<uint8_t>(), gpu_stream()));
  return {grad_y, grad_w};
}

}  // namespace
}  // namespace fastlm::bind

TORCH_LIBRARY_IMPL(FASTLM_GPU_NAMESPACE, FASTLM_GPU_KEY, m) {
  m.impl("moe_permute_fwd", &fastlm::bind::moe_permute_fwd_cuda);
  m.impl("moe_permute_bwd", &fastlm::bind::moe_permute_bwd_cuda);
  m.impl("moe_unpermute_fwd", &fastlm::bind::moe_unpermute_fwd_cuda);
  m.impl("moe_unpermute_bwd", &fastlm::bind::moe_unpermute_bwd_cuda);
}
