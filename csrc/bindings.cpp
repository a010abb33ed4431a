// The op schemas (TORCH_LIBRARY), the CPU implementations, and the Python module init.
// Includes only the slim torch headers it needs: this file and bindings_cuda.cpp are the
// slow part of the build, kernel files never include torch.
#include <Python.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "bindings_common.h"
#include "fastlm/bias_act.h"

namespace fastlm::bind {
namespace {

at::Tensor bias_act_fwd_cpu(const at::Tensor& x, const std::optional<at::Tensor>& bias,
                            c10::string_view activation) {
  constexpr const char* op = "bias_act";
  const Activation act = activation_arg(op, activation);
  TORCH_CHECK_VALUE(x.device().is_cpu(), op, ": x must be a CPU tensor here, got ", x.device().str());
  const DType dtype = dtype_arg(op, "x", x, /*allow_half=*/false);
  bias_arg(op, bias, x);
  at::Tensor y = at::empty(x.sizes(), x.options());
  if (x.numel() == 0) return y;
  const at::Tensor x2 = rows_view(x);
  const at::Tensor b = bias ? bias->contiguous() : at::Tensor();
  bias_act_forward_cpu(dtype, act, x2.size(0), x2.size(1), x2.data_ptr(), x2.stride(0),
                       b.defined() ? b.data_ptr() : nullptr, y.data_ptr(), x2.size(1));
  return y;
}

std::tuple<at::Tensor, at::Tensor> bias_act_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& x,
                                                    const std::optional<at::Tensor>& bias,
                                                    c10::string_view activation) {
  constexpr const char* op = "bias_act_backward";
  const Activation act = activation_arg(op, activation);
  TORCH_CHECK_VALUE(x.device().is_cpu(), op, ": x must be a CPU tensor here, got ", x.device().str());
  const DType dtype = dtype_arg(op, "x", x, /*allow_half=*/false);
  bias_arg(op, bias, x);
  same_place_arg(op, "grad_out", grad_out, x);
  TORCH_CHECK_VALUE(grad_out.sizes() == x.sizes(), op, ": grad_out has shape ", grad_out.sizes(),
                    " but x has shape ", x.sizes());
  at::Tensor grad_x = at::empty(x.sizes(), x.options());
  at::Tensor grad_bias = bias ? at::empty({last_dim(x)}, x.options()) : at::empty({0}, x.options());
  if (x.numel() == 0) return {grad_x, grad_bias.zero_()};
  const at::Tensor g2 = rows_view(grad_out), x2 = rows_view(x);
  const at::Tensor b = bias ? bias->contiguous() : at::Tensor();
  bias_act_backward_cpu(dtype, act, x2.size(0), x2.size(1), g2.data_ptr(), g2.stride(0),
                        x2.data_ptr(), x2.stride(0), b.defined() ? b.data_ptr() : nullptr,
                        grad_x.data_ptr(), x2.size(1), b.defined() ? grad_bias.data_ptr() : nullptr);
  return {grad_x, grad_bias};
}

}  // namespace
}  // namespace fastlm::bind

TORCH_LIBRARY(fastlm, m) {
  m.def("bias_act_fwd(Tensor x, Tensor? bias, str activation) -> Tensor");
  m.def("bias_act_bwd(Tensor grad_out, Tensor x, Tensor? bias, str activation) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastlm, CPU, m) {
  m.impl("bias_act_fwd", &fastlm::bind::bias_act_fwd_cpu);
  m.impl("bias_act_bwd", &fastlm::bind::bias_act_bwd_cpu);
}

// A plain module: importing fastlm._C runs the registrations above. Build facts ride along
// as constants so `python -m fastlm info` can say what this build contains.
#ifndef FASTLM_CUDA_ARCHS
#define FASTLM_CUDA_ARCHS ""
#endif
#ifndef FASTLM_CPU_FLAGS
#define FASTLM_CPU_FLAGS ""
#endif

PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "fastlm kernels (ops in torch.ops.fastlm)",
                               -1, nullptr, nullptr, nullptr, nullptr, nullptr};
  PyObject* m = PyModule_Create(&module);
  if (m == nullptr) return nullptr;
#ifdef FASTLM_WITH_CUDA
  PyModule_AddIntConstant(m, "with_cuda", 1);
#else
  PyModule_AddIntConstant(m, "with_cuda", 0);
#endif
  PyModule_AddStringConstant(m, "cuda_archs", FASTLM_CUDA_ARCHS);
  PyModule_AddStringConstant(m, "cpu_flags", FASTLM_CPU_FLAGS);
  return m;
}
