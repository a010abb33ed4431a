// The emulator's own test kernels, compiled only into fastlm._C_emu (instrumented like every
// kernel). Each is a small, plausible kernel; the *_bug variants carry one classic mistake that
// tests/test_emulator.py expects the emulator to report (or, for a misread fragment layout, to
// compute wrong, so the float64 comparison fails as it would on a GPU).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>

#include "../cuda/launch.cuh"
#include "../cuda/ptx.cuh"

namespace fastlm::emu_selftest {
namespace {

using cuda::launch_kernel;

// out[0] = sum of in[0..63] by one block of 64 threads through shared memory.
template <bool kSync>
__global__ void block_sum(const float* in, float* out) {
  FASTLM_SHARED(float, part, [64]);
  part[threadIdx.x] = in[threadIdx.x];
  if (kSync) __syncthreads();  // the bug variant reads other threads' slots without it
  if (threadIdx.x == 0) {
    float s = 0.0f;
    for (int i = 0; i < 64; ++i) s += part[i];
    out[0] = s;
  }
}

// Shifts in[] by one slot; the last thread writes one past the array.
__global__ void shift_oob(const float* in, float* out) {
  FASTLM_SHARED(float, buf, [64]);
  buf[threadIdx.x + 1] = in[threadIdx.x];
  __syncthreads();
  out[threadIdx.x] = threadIdx.x > 0 ? buf[threadIdx.x] : 0.0f;
}

// Reverses in[] but only half the threads stage their element.
__global__ void reverse_half_staged(const float* in, float* out) {
  FASTLM_SHARED(float, buf, [64]);
  if (threadIdx.x < 32) buf[threadIdx.x] = in[threadIdx.x];
  __syncthreads();
  out[threadIdx.x] = buf[63 - threadIdx.x];
}

// Lanes 16..31 leave before the warp-wide shuffle their lanes 0..15 wait in.
__global__ void early_exit_shuffle(const float* in, float* out) {
  if (threadIdx.x >= 16) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, in[threadIdx.x], 1);
}

// D (16 x 8) = A (16 x 16, in[0..255] row-major) * B (16 x 8, in[256..383] row-major) with
// ldmatrix + mma.sync; out: D row-major. kWrongA loads A's ldmatrix rows as if A were a B
// operand (a1 and a2 swapped), a classic misreading of the fragment layout.
template <bool kWrongA>
__global__ void mma_tile(const float* in, float* out) {
  FASTLM_SHARED(__half, a, [16 * 16]);
  FASTLM_SHARED(__half, bt, [8 * 16]);  // B transposed: (n, k), k contiguous, as mma's "col" B
  const int lane = threadIdx.x;
  for (int i = lane; i < 256; i += 32) a[i] = __float2half_rn(in[i]);
  for (int i = lane; i < 128; i += 32) bt[(i % 8) * 16 + i / 8] = __float2half_rn(in[256 + i]);
  __syncwarp();
  uint32_t af[4], bf[2];
  const int row = kWrongA ? lane % 8 + (lane / 16) * 8 : lane % 16;
  const int col = kWrongA ? ((lane / 8) % 2) * 8 : (lane / 16) * 8;
  cuda::ldmatrix_x4(af, &a[row * 16 + col]);
  cuda::ldmatrix_x2(bf, &bt[(lane % 8) * 16 + ((lane / 8) % 2) * 8]);
  float c[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  cuda::mma_m16n8k16<__half>(c, af, bf[0], bf[1]);
  const int g = lane / 4, t = lane % 4;
  out[g * 8 + 2 * t] = c[0];
  out[g * 8 + 2 * t + 1] = c[1];
  out[(g + 8) * 8 + 2 * t] = c[2];
  out[(g + 8) * 8 + 2 * t + 1] = c[3];
}

// Raw fragments for the layout tables: out[lane * 16 + ...] = A's four ldmatrix registers as
// 8 halves, B's two registers as 4 halves, then the 4 accumulator floats of D = A * B + 0.
__global__ void fragments(const float* in, float* out) {
  FASTLM_SHARED(__half, a, [16 * 16]);
  FASTLM_SHARED(__half, bt, [8 * 16]);
  const int lane = threadIdx.x;
  for (int i = lane; i < 256; i += 32) a[i] = __float2half_rn(in[i]);
  for (int i = lane; i < 128; i += 32) bt[(i % 8) * 16 + i / 8] = __float2half_rn(in[256 + i]);
  __syncwarp();
  uint32_t af[4], bf[2];
  cuda::ldmatrix_x4(af, &a[(lane % 16) * 16 + (lane / 16) * 8]);
  cuda::ldmatrix_x2(bf, &bt[(lane % 8) * 16 + ((lane / 8) % 2) * 8]);
  float c[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  cuda::mma_m16n8k16<__half>(c, af, bf[0], bf[1]);
  float* o = out + lane * 16;
  for (int r = 0; r < 4; ++r)
    for (int h = 0; h < 2; ++h) o[2 * r + h] = __half2float(__half{uint16_t(af[r] >> (16 * h))});
  for (int r = 0; r < 2; ++r)
    for (int h = 0; h < 2; ++h) o[8 + 2 * r + h] = __half2float(__half{uint16_t(bf[r] >> (16 * h))});
  for (int i = 0; i < 4; ++i) o[12 + i] = c[i];
}

// cp.async of 16-byte chunks from in + offset: misaligned unless offset is a multiple of 4.
__global__ void cp_async_copy(const float* in, float* out, int offset) {
  FASTLM_SHARED(float, buf, [64]);
  cuda::cp_async16(&buf[threadIdx.x * 4], in + offset + threadIdx.x * 4, 16);
  cuda::cp_async_commit();
  cuda::cp_async_wait<0>();
  __syncthreads();
  for (int i = 0; i < 4; ++i) out[threadIdx.x * 4 + i] = buf[(threadIdx.x * 4 + 4 + i) % 64];
}

// Blocks take turns through a flag in grid order, as the attention backward's dQ sums do: block
// b waits until the flag reads b (+ 1 for the bug: a turn only a later block could give), then
// records its ticket and hands the turn on.
__global__ void take_turns(int* flag, int* counter, float* out, int ahead) {
  FASTLM_SHARED(int, mine, [1]);
  if (threadIdx.x == 0) *mine = cuda::ticket(counter);
  __syncthreads();
  if (threadIdx.x == 0) cuda::wait_flag(flag, int(blockIdx.x) + ahead);
  __syncthreads();
  if (threadIdx.x == 0) out[blockIdx.x] = float(*mine);
  __syncthreads();
  if (threadIdx.x == 0) cuda::signal_flag(flag, int(blockIdx.x) + 1);
}

// A zero-byte cp.async whose source is shared memory (it must be a global address).
__global__ void cp_async_shared_source(const float* in, float* out) {
  FASTLM_SHARED(float, buf, [64]);
  cuda::cp_async16(&buf[threadIdx.x * 4], &buf[0], 0);
  cuda::cp_async_commit();
  cuda::cp_async_wait<0>();
  out[threadIdx.x] = in[threadIdx.x];
}

// float2 through L2 at an address 4 bytes off its 8-byte alignment.
__global__ void l2_float2(const float* in, float* out, int offset) {
  const float2 v = cuda::load_l2(reinterpret_cast<const float2*>(in + offset) + threadIdx.x);
  cuda::store_l2(reinterpret_cast<float2*>(out) + threadIdx.x, v);
}

}  // namespace

// Runs test kernel `name` on in (at least 384 floats) into out (512 floats). Returns the launch
// status (cudaGetErrorString has the emulator's message), or -1 for an unknown name.
int run(const char* name, const float* in, float* out) {
  const auto is = [&](const char* n) { return std::strcmp(name, n) == 0; };
  if (is("block_sum")) launch_kernel(block_sum<true>, 1, 64, 0, nullptr, in, out);
  else if (is("block_sum_bug")) launch_kernel(block_sum<false>, 1, 64, 0, nullptr, in, out);
  else if (is("shift_oob_bug")) launch_kernel(shift_oob, 1, 64, 0, nullptr, in, out);
  else if (is("uninit_bug")) launch_kernel(reverse_half_staged, 1, 64, 0, nullptr, in, out);
  else if (is("early_exit_bug")) launch_kernel(early_exit_shuffle, 1, 32, 0, nullptr, in, out);
  else if (is("mma_tile")) launch_kernel(mma_tile<false>, 1, 32, 0, nullptr, in, out);
  else if (is("mma_tile_bug")) launch_kernel(mma_tile<true>, 1, 32, 0, nullptr, in, out);
  else if (is("fragments")) launch_kernel(fragments, 1, 32, 0, nullptr, in, out);
  else if (is("cp_async")) launch_kernel(cp_async_copy, 1, 16, 0, nullptr, in, out, 4);
  else if (is("cp_async_bug")) launch_kernel(cp_async_copy, 1, 16, 0, nullptr, in, out, 2);
  else if (is("bad_grid_bug")) launch_kernel(block_sum<true>, dim3(1, 70000), 64, 0, nullptr, in, out);
  else if (is("turns") || is("turns_bug")) {
    static int flag_and_counter[2];
    flag_and_counter[0] = flag_and_counter[1] = 0;
    launch_kernel(take_turns, 4, 32, 0, nullptr, &flag_and_counter[0], &flag_and_counter[1], out, is("turns") ? 0 : 1);
  }
  else if (is("cp_async_shared_source_bug")) launch_kernel(cp_async_shared_source, 1, 16, 0, nullptr, in, out);
  else if (is("l2_float2")) launch_kernel(l2_float2, 1, 32, 0, nullptr, in, out, 2);
  else if (is("l2_float2_bug")) launch_kernel(l2_float2, 1, 32, 0, nullptr, in, out, 1);
  else return -1;
  return int(cudaGetLastError());
}

}  // namespace fastlm::emu_selftest
