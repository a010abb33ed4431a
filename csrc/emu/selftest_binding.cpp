// torch.ops.fastlm_emu.emu_selftest: runs one of csrc/emu/selftest.cu's kernels on a float32
// input of at least 384 elements and returns its output of max(512, x.numel()) floats (NaN where
// it wrote nothing; the sm_90 tests pass inputs sized for their outputs);
// an emulator error becomes a RuntimeError carrying the emulator's message.
#include <ATen/core/Tensor.h>
#include <ATen/ops/full.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <string>

#include "fastlm_emu/cuda.h"

namespace fastlm::emu_selftest {
int run(const char* name, const float* in, float* out);
}

namespace fastlm::emu {

at::Tensor selftest(c10::string_view name, const at::Tensor& x) {
  TORCH_CHECK_VALUE(x.scalar_type() == at::kFloat && x.is_contiguous() && x.numel() >= 384 && x.device().is_cpu(),
                    "emu_selftest: x must be a contiguous CPU float32 tensor of at least 384 elements");
  at::Tensor out = at::full({std::max<int64_t>(512, x.numel())}, NAN, x.options());
  const std::string n(name);
  const int status = emu_selftest::run(n.c_str(), x.data_ptr<float>(), out.data_ptr<float>());
  TORCH_CHECK_VALUE(status != -1, "emu_selftest: unknown test '", n, "'");
  TORCH_CHECK(status == 0, "emu_selftest ", n, ": ", cudaGetErrorString(static_cast<cudaError_t>(status)));
  return out;
}

}  // namespace fastlm::emu
