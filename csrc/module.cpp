// The extension module fastlm._C. Importing it runs every op registration: the namespace and
// the schemas of csrc/bindings/schemas.h are defined here (CPU-only ops add theirs with
// TORCH_LIBRARY_FRAGMENT), and each op registers its kernels from csrc/bindings/<op>.cpp with
// TORCH_LIBRARY_IMPL (CPU there, CUDA in <op>_cuda.cpp). One binding file per op keeps
// rebuilds small and the files short; each is ~8 s to compile because they include only the
// slim torch headers they need.
#include <Python.h>
#include <torch/library.h>

#include "bindings/schemas.h"

TORCH_LIBRARY(fastlm, m) {
  for (const char* schema : fastlm::bind::kKernelSchemas) m.def(schema);
}

#ifndef FASTLM_CUDA_ARCHS
#define FASTLM_CUDA_ARCHS ""
#endif
#ifndef FASTLM_CPU_FLAGS
#define FASTLM_CPU_FLAGS ""
#endif

// A plain module with the build facts `python -m fastlm info` reports.
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
