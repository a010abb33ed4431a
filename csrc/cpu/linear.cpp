// The linear epilogue on the CPU: y = act(z + bias) + residual over a GEMM output z, one
// pass, in place when y aliases z. The GEMM itself is torch's (MKL / oneDNN), called by the
// binding; this pass replaces eager's separate bias add, activation and residual add (each a
// full read + write of the (M, N) output, and a fresh allocation for every one of them).
// Tiles of (row, 4096-column chunk) keep both tall and wide outputs spread over every core.
#include <algorithm>

#include "activations.h"
#include "fastlm/linear.h"

namespace fastlm::cpu {
namespace {

constexpr int64_t kChunk = 4096;
constexpr int64_t kParallelMinElems = 1 << 15;

template <typename T, bool HasAct, Activation A>
void epilogue(const LinearEpilogueArgs& a) {
  const int64_t chunks = (a.cols + kChunk - 1) / kChunk;
  const T* bias = static_cast<const T*>(a.bias);
#pragma omp parallel for schedule(dynamic, 16) if (a.rows * a.cols >= kParallelMinElems)  // tiles are independent
  for (int64_t tile = 0; tile < a.rows * chunks; ++tile) {
    const int64_t r = tile / chunks, c0 = (tile % chunks) * kChunk;
    const int64_t n = std::min(kChunk, a.cols - c0);
    const T* z = static_cast<const T*>(a.z) + r * a.z_stride + c0;
    const T* res = a.residual ? static_cast<const T*>(a.residual) + r * a.residual_stride + c0 : nullptr;
    const T* b = bias ? bias + c0 : nullptr;
    T* y = static_cast<T*>(a.y) + r * a.y_stride + c0;
    T* pre = a.preact ? static_cast<T*>(a.preact) + r * a.preact_stride + c0 : nullptr;
    for_each_vector(n, [&](int64_t i, int64_t m) {
      vf v = load_n(z + i, m);
      if (b) v = v + load_n(b + i, m);
      if (pre) {  // keep z + bias for the backward, and go on from its rounded value
        store_n(pre + i, v, m);
        v = load_n(pre + i, m);
      }
      if constexpr (HasAct) v = act_forward<A>(v);
      if (res) v = v + load_n(res + i, m);
      store_n(y + i, v, m);
    });
  }
}

template <typename T>
void dispatch(const LinearEpilogueArgs& a) {
  if (!a.has_act) return epilogue<T, false, Activation::kRelu>(a);
  switch (a.act) {
    case Activation::kGelu: return epilogue<T, true, Activation::kGelu>(a);
    case Activation::kGeluTanh: return epilogue<T, true, Activation::kGeluTanh>(a);
    case Activation::kRelu: return epilogue<T, true, Activation::kRelu>(a);
    case Activation::kSilu: return epilogue<T, true, Activation::kSilu>(a);
  }
}

}  // namespace
}  // namespace fastlm::cpu

namespace fastlm {

void linear_epilogue_cpu(const LinearEpilogueArgs& a) {
  if (a.dtype == DType::kFloat32) cpu::dispatch<float>(a);
  else cpu::dispatch<uint16_t>(a);  // bf16 bits; the binding rejects fp16 on the CPU
}

}  // namespace fastlm
