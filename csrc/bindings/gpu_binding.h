// What a CUDA binding (<op>_cuda.cpp) needs beyond common.h: the device type its tensors live
// on, a device guard, the stream, the launch-status check and where it registers. The same
// bindings are compiled a second time with -DFASTLM_EMU into fastlm._C_emu: there they serve CPU
// tensors through the SIMT emulator (csrc/emu) and register as torch.ops.fastlm_emu.*, so the
// real cuda backend stays exactly what a GPU runs.
#pragma once
#include <c10/core/Device.h>
#include <c10/util/Exception.h>
#include <cuda_runtime_api.h>

#ifdef FASTLM_EMU
#define FASTLM_GPU_NAMESPACE fastlm_emu
#define FASTLM_GPU_KEY CPU
#else
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#define FASTLM_GPU_NAMESPACE fastlm
#define FASTLM_GPU_KEY CUDA
#endif

namespace fastlm::bind {

// kGpu: where the tensors live; GpuGuard makes their device current; gpu_stream() is that
// device's current stream (call it under the guard).
#ifdef FASTLM_EMU
constexpr c10::DeviceType kGpu = c10::DeviceType::CPU;
constexpr const char* kGpuName = "CPU (the emulated cuda backend)";
struct GpuGuard {
  explicit GpuGuard(c10::Device) {}
};
inline cudaStream_t gpu_stream() { return nullptr; }
#else
constexpr c10::DeviceType kGpu = c10::DeviceType::CUDA;
constexpr const char* kGpuName = "CUDA";
using GpuGuard = c10::cuda::CUDAGuard;
inline cudaStream_t gpu_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }
#endif

inline void check_launch(const char* op, int status) {
  TORCH_CHECK(status == 0, op, ": CUDA launch failed: ", cudaGetErrorString(static_cast<cudaError_t>(status)));
}

}  // namespace fastlm::bind
