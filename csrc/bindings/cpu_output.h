// Output allocation for the CPU kernels. Buffers of 32 MiB and up are always a fresh mmap under
// glibc (its largest mmap threshold), so every call faults each 4 KiB page in and has it zeroed:
// ~40 ms for GPT-2's (512, 50257) fp32 logits, a fifth of the GEMM producing them. Asking for
// transparent huge pages on the untouched mapping turns 25,000 faults into 50 (the zeroing
// stays); where THP is off or the memory came from elsewhere, madvise just fails or no-ops.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include <sys/mman.h>

#include <cstdint>

namespace fastlm::bind {

// at::empty, plus the huge-page advice for large CPU buffers (other devices: plain at::empty).
inline at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options);
#ifdef MADV_HUGEPAGE
  if (!t.device().is_cpu()) return t;
  constexpr uintptr_t kMin = uintptr_t(32) << 20, kHuge = uintptr_t(2) << 20;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(t.data_ptr()), bytes = uintptr_t(t.nbytes());
  const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1), last = (begin + bytes) & ~(kHuge - 1);
  if (bytes >= kMin && last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#endif
  return t;
}

// An output laid out as at::empty_like(t) lays it out (t's strides where t is dense, the same
// order of strides otherwise: a gradient in its parameter's layout), with the same advice.
inline at::Tensor empty_output_like(const at::Tensor& t) {
  const at::Tensor layout = at::empty_like(t, t.options().device(at::kMeta));
  return empty_output({t.numel()}, t.options()).as_strided(t.sizes(), layout.strides());
}

}  // namespace fastlm::bind
