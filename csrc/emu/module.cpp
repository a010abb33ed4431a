// The extension module fastlm._C_emu: the CUDA kernels of csrc/cuda and their bindings, compiled
// as host C++ against the SIMT emulator, serving CPU tensors as torch.ops.fastlm_emu.* with the
// schemas of torch.ops.fastlm.* (fastlm's "cuda-emu" backend). Plus the emulator's controls:
//   emu_set_arch(arch)   the GPU whose limits launches are checked against ("8.0", "8.6", "8.9", "9.0")
//   emu_device()         [major, minor, SMs, shared bytes per block (opt-in)] of that GPU
//   emu_set_gpc_sms(n)   the SMs of each GPC clusters may use (0: all of them; fewer: larger clusters
//                        do not fit, cudaOccupancyMaxActiveClusters says 0 and their launches fail)
//   emu_stats()          [launches, blocks, threads, checked shared accesses, barriers, collectives,
//                        faults (launches stopped by a race, out-of-bounds or other kernel error)]
//   emu_selftest(name, x)  the emulator's own test kernels (csrc/emu/selftest.cu)
#include <ATen/core/Tensor.h>
#include <Python.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "bindings/schemas.h"
#include "fastlm_emu/runtime.h"

namespace fastlm::emu {
at::Tensor selftest(c10::string_view name, const at::Tensor& x);  // selftest_binding.cpp
}

namespace {

void set_arch(c10::string_view arch) {
  TORCH_CHECK_VALUE(fastlm::emu::set_device_arch(std::string(arch).c_str()),
                    "emu_set_arch: arch must be one of 8.0, 8.6, 8.9, 9.0, got '", std::string(arch), "'");
}

void set_gpc_sms(int64_t sms) {
  TORCH_CHECK_VALUE(sms >= 0 && sms <= 1024, "emu_set_gpc_sms: sms must be 0 (all) .. 1024, got ", sms);
  fastlm::emu::set_gpc_sms(int(sms));
}

std::vector<int64_t> device_info() {
  const fastlm::emu::DeviceProfile& d = fastlm::emu::device();
  return {d.major, d.minor, d.sms, d.smem_per_block_optin};
}

std::vector<int64_t> stats() {
  const fastlm::emu::Stats s = fastlm::emu::stats();
  return {s.launches, s.blocks, s.threads, s.shared_accesses, s.barriers, s.collectives, s.faults};
}

}  // namespace

TORCH_LIBRARY(fastlm_emu, m) {
  for (const char* schema : fastlm::bind::kKernelSchemas) m.def(schema);
  m.def("emu_set_arch(str arch) -> ()", &set_arch);
  m.def("emu_device() -> int[]", &device_info);
  m.def("emu_set_gpc_sms(int sms) -> ()", &set_gpc_sms);
  m.def("emu_stats() -> int[]", &stats);
  m.def("emu_selftest(str name, Tensor x) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastlm_emu, CPU, m) { m.impl("emu_selftest", &fastlm::emu::selftest); }

PyMODINIT_FUNC PyInit__C_emu(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C_emu",
                               "fastlm's CUDA kernels under the SIMT emulator (ops in torch.ops.fastlm_emu)",
                               -1, nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module);
}
