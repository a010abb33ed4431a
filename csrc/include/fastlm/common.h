// Types shared by the torch-free kernel files and the bindings.
// Kernels see raw pointers, sizes, strides and these enums; nothing here pulls in torch or CUDA.
#pragma once
#include <cstdint>
#include <string>

// Same spelling as cuda_runtime's driver_types.h, so launchers can be declared without it.
typedef struct CUstream_st* cudaStream_t;

namespace fastlm {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

enum class Activation : int { kGelu = 0, kGeluTanh = 1, kRelu = 2, kSilu = 3 };

// Names as the Python API spells them; returns false for an unknown name.
inline bool parse_activation(const std::string& name, Activation* out) {
  if (name == "gelu") { *out = Activation::kGelu; return true; }
  if (name == "gelu_tanh") { *out = Activation::kGeluTanh; return true; }
  if (name == "relu") { *out = Activation::kRelu; return true; }
  if (name == "silu") { *out = Activation::kSilu; return true; }
  return false;
}

}  // namespace fastlm
