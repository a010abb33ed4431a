// moe_permute / moe_unpermute: CPU implementations (kernels in csrc/cpu/moe_permute.cpp).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "cpu_output.h"
#include "fastlm/moe.h"
#include "moe_args.h"

namespace fastlm::bind {
namespace {

// row_index (T, k) against y's `rows` rows; unique: no row twice (unpermute's backward writes each once).
void row_index_values(const char* op, const at::Tensor& row_index, int64_t rows, bool unique) {
  bool duplicate = false;
  const int64_t k = row_index.size(1);
  const int64_t bad = moe_check_row_index_cpu(row_index.size(0), k, row_index.data_ptr<int32_t>(),
                                              row_index.stride(0), row_index.stride(1), rows, unique, &duplicate);
  if (bad < 0) return;
  const int64_t t = bad / k, s = bad % k;
  const int32_t value = row_index[t][s].item<int32_t>();
  TORCH_CHECK_VALUE(!duplicate, op, ": row_index must reference each row at most once, got ", value, " twice (again at [",
                    t, ", ", s, "])");
  TORCH_CHECK_VALUE(false, op, ": row_index must be in [-1, ", rows, ") (rows of the sorted tensor), got ", value,
                    " at [", t, ", ", s, "]");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_permute_fwd_cpu(const at::Tensor& x, const at::Tensor& expert_ids,
                                                                   int64_t num_experts) {
  constexpr const char* op = "moe_permute_fwd";
  rows_arg(op, "x", x);
  index_arg(op, "expert_ids", expert_ids, x.size(0));
  TORCH_CHECK_VALUE(num_experts >= 0 && num_experts < INT32_MAX, op, ": num_experts must be >= 0, got ", num_experts);
  const int64_t T = x.size(0), H = x.size(1), k = expert_ids.size(1), E = num_experts;
  const at::Tensor xs = unit_cols(x);
  at::Tensor sorted = empty_output({T * k, H}, x.options());
  at::Tensor row_index = at::empty({T, k}, expert_ids.options());
  at::Tensor offsets = at::empty({E + 1}, expert_ids.options());
  const int64_t bad = moe_permute_forward_cpu(
      T, k, E, expert_ids.data_ptr<int32_t>(), expert_ids.stride(0), expert_ids.stride(1), xs.data_ptr(),
      xs.stride(0) * xs.element_size(), H * xs.element_size(), sorted.data_ptr(), row_index.data_ptr<int32_t>(),
      offsets.data_ptr<int32_t>());
  TORCH_CHECK_VALUE(bad < 0, op, ": expert_ids must be in [-1, num_experts) = [-1, ", E, "), got ",
                    bad < 0 ? 0 : expert_ids[bad / k][bad % k].item<int32_t>(), " at [", bad / k, ", ", bad % k, "]");
  return {sorted, row_index, offsets};
}

at::Tensor moe_permute_bwd_cpu(const at::Tensor& grad_sorted, const at::Tensor& row_index) {
  constexpr const char* op = "moe_permute_bwd";
  const DType dtype = rows_arg(op, "grad_sorted", grad_sorted);
  index_arg(op, "row_index", row_index, -1);
  row_index_values(op, row_index, grad_sorted.size(0), /*unique=*/false);
  const int64_t T = row_index.size(0), k = row_index.size(1), H = grad_sorted.size(1);
  const at::Tensor g = unit_cols(grad_sorted);
  at::Tensor grad_x = empty_output({T, H}, grad_sorted.options());
  moe_permute_backward_cpu(dtype, T, k, H, g.data_ptr(), g.stride(0), row_index.data_ptr<int32_t>(),
                           row_index.stride(0), row_index.stride(1), grad_x.data_ptr(), H);
  return grad_x;
}

at::Tensor moe_unpermute_fwd_cpu(const at::Tensor& y_sorted, const at::Tensor& row_index, const at::Tensor& weights) {
  constexpr const char* op = "moe_unpermute_fwd";
  const DType dtype = rows_arg(op, "y_sorted", y_sorted);
  index_arg(op, "row_index", row_index, -1);
  weights_arg(op, "weights", weights, row_index);
  row_index_values(op, row_index, y_sorted.size(0), /*unique=*/false);
  const int64_t T = row_index.size(0), k = row_index.size(1), H = y_sorted.size(1);
  const at::Tensor y = unit_cols(y_sorted);
  at::Tensor out = empty_output({T, H}, y_sorted.options());
  moe_unpermute_forward_cpu(dtype, T, k, H, y.data_ptr(), y.stride(0), row_index.data_ptr<int32_t>(),
                            row_index.stride(0), row_index.stride(1), weights.data_ptr<float>(), weights.stride(0),
                            weights.stride(1), out.data_ptr(), H);
  return out;
}

std::tuple<at::Tensor, at::Tensor> moe_unpermute_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& y_sorted,
                                                         const at::Tensor& row_index, const at::Tensor& weights) {
  constexpr const char* op = "moe_unpermute_bwd";
  const DType dtype = rows_arg(op, "y_sorted", y_sorted);
  index_arg(op, "row_index", row_index, -1);
  weights_arg(op, "weights", weights, row_index);
  rows_arg(op, "grad_out", grad_out);
  same_dtype_arg(op, "grad_out", grad_out, "y_sorted", y_sorted);
  const int64_t T = row_index.size(0), k = row_index.size(1), N = y_sorted.size(0), H = y_sorted.size(1);
  TORCH_CHECK_VALUE(grad_out.size(0) == T && grad_out.size(1) == H, op, ": grad_out must have shape (", T, ", ", H,
                    "), got ", grad_out.sizes());
  row_index_values(op, row_index, N, /*unique=*/true);
  const at::Tensor go = unit_cols(grad_out), y = unit_cols(y_sorted);
  at::Tensor grad_y = empty_output({N, H}, y_sorted.options());
  at::Tensor grad_w = at::empty({T, k}, weights.options());
  moe_unpermute_backward_cpu(dtype, T, k, H, N, go.data_ptr(), go.stride(0), y.data_ptr(), y.stride(0),
                             row_index.data_ptr<int32_t>(), row_index.stride(0), row_index.stride(1),
                             weights.data_ptr<float>(), weights.stride(0), weights.stride(1), grad_y.data_ptr(), H,
                             grad_w.data_ptr<float>());
  return {grad_y, grad_w};
}

}  // namespace
}  // namespace fastlm::bind

TORCH_LIBRARY_IMPL(fastlm, CPU, m) {
  m.impl("moe_permute_fwd", &fastlm::bind::moe_permute_fwd_cpu);
  m.impl("moe_permute_bwd", &fastlm::bind::moe_permute_bwd_cpu);
  m.impl("moe_unpermute_fwd", &fastlm::bind::moe_unpermute_fwd_cpu);
  m.impl("moe_unpermute_bwd", &fastlm::bind::moe_unpermute_bwd_cpu);
}
