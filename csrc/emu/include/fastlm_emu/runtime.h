// The SIMT emulator's core: CUDA's execution model on one CPU thread, so the kernels in
// csrc/cuda run unchanged (compiled as host C++ with -DFASTLM_EMU) in CPU CI.
//  - A launch runs its blocks one after another. Each CUDA thread of a block is a fiber with its
//    own stack; it runs until it reaches a barrier (__syncthreads), a warp collective (shuffle,
//    vote, __syncwarp, wmma / ldmatrix / mma.sync) or its end, then the next fiber runs.
//  - Warp collectives complete when every lane of their mask has arrived; the last lane to
//    arrive performs the whole operation for the warp (fragment layouts in ptx.h / wmma.h).
//  - Shared memory is one arena per block: every allocation (static FASTLM_SHARED declarations
//    and the dynamic buffer) sits between red zones and starts as 0xff bytes (NaN for any float
//    type). The kernels are compiled with -fsanitize=thread, but instead of TSan's runtime the
//    __tsan_* hooks in runtime.cpp see every load and store: those that hit the arena are checked
//    for out-of-bounds (a red zone or any gap), uninitialized reads, and races. A race is two
//    accesses to one byte, at least one a write, by two threads with no barrier between them:
//    the same block-barrier epoch, and for two lanes of one warp also the same warp-sync epoch.
//    Kernels that use the sm_90 primitives (mbarrier, named barriers, TMA, wgmma: ptx_sm90.h)
//    also get vector clocks, so a wait on an mbarrier phase or a named barrier orders too.
//  - A launch with clusters (sm_90) runs the CTAs of one cluster together as one group of fibers,
//    each CTA with its own shared arena, barriers and blockIdx; the cluster barrier and DSMEM
//    (ptx_sm90.h) work across them, and a deadlock names what every CTA waits for.
//  - Errors stop the launch and come back as its status; cudaGetErrorString gives the message.
// One launch at a time per process (a mutex serializes callers). Slow by design, exact in effect.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(8) float2 {
  float x, y;
};
inline float2 make_float2(float x, float y) { return {x, y}; }
struct alignas(16) float4 {
  float x, y, z, w;
};
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }

namespace fastlm::emu {

struct Thread;

// What the built-in variables read: the running CUDA thread (null outside a kernel) and its ids.
struct Current {
  Thread* thread = nullptr;
  uint3 thread_idx{0, 0, 0}, block_idx{0, 0, 0};
  dim3 block_dim, grid_dim;
};
extern Current g_cur;

// Stops the launch with a message (formatted like printf); never returns inside a kernel.
[[noreturn]] void fail(const char* fmt, ...) __attribute__((format(printf, 1, 2)));

// Block barrier.
void syncthreads();

// A warp collective: every lane of `mask` calls it with the same `what`; when the last one
// arrives, op(ctx of that lane, slots of all 32 lanes, mask) runs once. slot points to this
// lane's own data (inputs and outputs).
using CollectiveOp = void (*)(void** slots, unsigned mask);
void warp_collective(unsigned mask, const char* what, void* slot, CollectiveOp op);

// Shared memory: the n-th FASTLM_SHARED declaration a thread reaches is the block's n-th
// allocation; the dynamic buffer is what the launch asked for.
void* shared_alloc(size_t bytes, size_t align, const char* name);
unsigned char* dynamic_shared();

// Accesses done by the emulator on behalf of a lane (collectives, cp.async), for the checker.
// lane: the lane within the calling thread's warp the access belongs to.
void shared_access_by_lane(int lane, const void* p, size_t n, bool write);
// Whether p lies in this block's shared arena (in an allocation or not).
bool in_shared_arena(const void* p);

// cp.async: the copy is queued now and done at the wait that retires its group.
void cp_async_queue(void* dst, const void* src, int bytes, int src_bytes);
void cp_async_commit();
void cp_async_wait(int groups_left);

// Launch: runs kernel(args...) on every thread of grid x block. With a cluster shape other than
// (1,1,1) (sm_90 only; grid a multiple of it in every dimension, at most 8 CTAs) the CTAs of
// each cluster run together, so they can wait for each other and read each other's shared memory.
using KernelThunk = void (*)(const void* args);
int launch_raw(const void* kernel_id, KernelThunk thunk, const void* args, dim3 grid, dim3 block, size_t dynamic_smem,
               dim3 cluster);

template <typename... P>
int launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, std::tuple<std::decay_t<P>...> args,
           dim3 cluster = dim3(1, 1, 1)) {
  struct Pack {
    void (*k)(P...);
    std::tuple<std::decay_t<P>...> a;
  };
  Pack pack{kernel, std::move(args)};
  KernelThunk thunk = [](const void* raw) {
    const Pack& pk = *static_cast<const Pack*>(raw);
    std::apply(pk.k, pk.a);  // each thread gets its own copies of the by-value parameters
  };
  return launch_raw(reinterpret_cast<const void*>(kernel), thunk, &pack, grid, block, smem, cluster);
}

// The emulated device: what cudaDeviceGetAttribute answers and what launches are checked against.
struct DeviceProfile {
  int major, minor, sms, max_threads_per_block, max_grid_y, max_grid_z;
  int smem_per_block, smem_per_block_optin;  // bytes
  int threads_per_sm, smem_per_sm, gpcs;     // where CTAs are placed: a cluster's CTAs share one GPC
};
const DeviceProfile& device();
// "8.0" (default), "8.6", "8.9", "9.0": the GPU whose limits launches are checked against.
bool set_device_arch(const char* arch);
// The SMs of each GPC that clusters may be placed on (0, the default: the profile's sms / gpcs, 16
// on sm_90). Fewer model a GPU whose GPCs are partly taken (MIG slices, other work), so that a
// launcher's answer to "this cluster does not fit" can be tested.
void set_gpc_sms(int sms);
// The twin of cudaOccupancyMaxActiveClusters: how many clusters of `cluster` CTAs of `block`
// threads and `dynamic_smem` bytes each can be resident at once (0: none; then a launch of that
// cluster fails with cudaErrorInvalidClusterSize). An impossible shape returns the launch's
// error and leaves it for cudaGetLastError, as CUDA does.
int max_active_clusters(int* count, const void* kernel_id, dim3 block, dim3 cluster, size_t dynamic_smem);

struct Stats {
  int64_t launches, blocks, threads, shared_accesses, barriers, collectives;
  int64_t faults;  // launches stopped by a reported kernel error (race, out of bounds, ...)
};
Stats stats();

}  // namespace fastlm::emu

// CUDA's built-in variables.
#define threadIdx (::fastlm::emu::g_cur.thread_idx)
#define blockIdx (::fastlm::emu::g_cur.block_idx)
#define blockDim (::fastlm::emu::g_cur.block_dim)
#define gridDim (::fastlm::emu::g_cur.grid_dim)
constexpr int warpSize = 32;
