// The emulator's own test kernels, compiled only into fastlm._C_emu (instrumented like every
// kernel). Each is a small, plausible kernel; the *_bug variants carry one classic mistake that
// tests/test_emulator.py expects the emulator to report (or, for a misread fragment layout, to
// compute wrong, so the float64 comparison fails as it would on a GPU).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <type_traits>

#include "../cuda/launch.cuh"
#include "../cuda/ptx.cuh"
#include "../cuda/ptx_sm90.cuh"

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

// ---------------------------------------------------------------- sm_90a (run on the "9.0" profile)
namespace h90 = cuda::sm90;

// Byte offset of (row, col) in a tile of 128-byte rows as TMA writes it with 128B swizzle (the
// tile 1024-byte aligned): 16-byte chunk col*2/16 of row r moves to chunk ^ (r % 8).
__device__ inline uint32_t sw128(int row, int byte_in_row) {
  return uint32_t(row * 128 + ((byte_in_row / 16) ^ (row % 8)) * 16 + byte_in_row % 16);
}

// TMA boxes into shared memory; out receives the raw shared bytes. kRank 2: two 64 x 32 boxes
// of 16-bit elements (128B swizzle) from a 72 x 40 tensor at (-8, 20) and (40, 0), both partly
// out of bounds. kRank 3: one 64 x 8 x 2 box (no swizzle) at (0, 4, 1) of a 64 x 10 x 3 tensor
// with padded strides (attention's (d, t, b*h) view): rows t = 10, 11 fall outside.
template <int kRank>
__global__ void tma_boxes(const __grid_constant__ h90::TmaDesc desc, float* out) {
  constexpr int kBytes = kRank == 2 ? 2 * 64 * 32 * 2 : 64 * 8 * 2 * 2;
  FASTLM_DYNAMIC_SHARED(unsigned char, smem_raw);
  unsigned char* smem = h90::smem_align<1024>(smem_raw);  // the launch asks for 1 KB more
  FASTLM_SHARED(uint64_t, full, [1]);
  if (threadIdx.x == 0) {
    h90::mbar_init(&full[0], 1);
    h90::fence_barrier_init();
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    h90::tma_prefetch_desc(&desc);
    h90::mbar_arrive_expect_tx(&full[0], kBytes);
    if (kRank == 2) {
      h90::tma_load_2d(smem, &desc, -8, 20, &full[0]);
      h90::tma_load_2d(smem + 4096, &desc, 40, 0, &full[0]);
    } else {
      h90::tma_load_3d(smem, &desc, 0, 4, 1, &full[0]);
    }
  }
  h90::mbar_wait(&full[0], 0);
  for (int i = threadIdx.x; i < kBytes / 4; i += blockDim.x) std::memcpy(&out[i], smem + 4 * i, 4);
}

// D (64 x N) = A (64 x 64) * B (64 x N) by one warpgroup, four k16 steps, bf16 inputs staged
// by the threads in the layouts TMA would write with 128B swizzle: A K-major (start + 32 bytes
// per k16), B K-major (the same) or MN-major (kTransB: 64-column blocks 8 KB apart = LBO, start +
// 2 KB per k16). kRegsA: A from registers, taken from afrag (per thread, per k16 step, 8 values
// in the ISA's A-fragment order), one commit group per k16 step with wgmma_wait<1> between (each
// chained on the accumulators of the group still in flight). in: A row-major, B row-major (k, n),
// afrag; out: each thread's N/2 accumulators in order. kReadBeforeWait: the bug of storing the
// accumulators before wgmma_wait (a GPU stores undefined values; the emulator's are NaN).
template <int N, bool kTransB, bool kRegsA, bool kReadBeforeWait = false>
__global__ void wgmma_tile(const float* in, float* out) {
  FASTLM_DYNAMIC_SHARED(unsigned char, smem_raw);
  unsigned char* smem = h90::smem_align<1024>(smem_raw);  // the launch asks for 1 KB more
  const float* a = in;
  const float* b = in + 64 * 64;
  const float* afrag = b + 64 * N;
  unsigned char* sa = smem;           // 8 KB: 64 rows of 64 k
  unsigned char* sb = smem + 8192;    // N * 128 bytes
  const int tid = threadIdx.x;
  for (int i = tid; i < 64 * 64; i += 128) {
    const int m = i / 64, k = i % 64;
    *reinterpret_cast<__nv_bfloat16*>(sa + sw128(m, 2 * k)) = __float2bfloat16_rn(a[i]);
  }
  for (int i = tid; i < 64 * N; i += 128) {
    const int k = i / N, n = i % N;
    const uint32_t at = kTransB ? uint32_t(n / 64) * 8192 + sw128(k, 2 * (n % 64)) : sw128(n, 2 * k);
    *reinterpret_cast<__nv_bfloat16*>(sb + at) = __float2bfloat16_rn(b[i]);
  }
  __syncthreads();
  h90::fence_proxy_async_shared();  // the generic-proxy writes above, before the async proxy reads
  float d[N / 2];
  h90::wgmma_fence();
  for (int ks = 0; ks < 4; ++ks) {
    const uint64_t db = kTransB ? h90::smem_desc(sb + 2048 * ks, h90::TmaSwizzle::k128B, 8192, 1024)
                                : h90::smem_desc(sb + 32 * ks, h90::TmaSwizzle::k128B, 16, 1024);
    if constexpr (kRegsA) {
      uint32_t r[4];
      for (int j = 0; j < 4; ++j)
        r[j] = cuda::pack2<__nv_bfloat16>(afrag[(ks * 128 + tid) * 8 + 2 * j], afrag[(ks * 128 + tid) * 8 + 2 * j + 1]);
      h90::wgmma_rs<__nv_bfloat16, N, kTransB>(d, r, db, ks > 0);
      h90::wgmma_commit();
      h90::wgmma_wait<1>();
      if (ks < 3) h90::wgmma_fence();
    } else {
      const uint64_t da = h90::smem_desc(sa + 32 * ks, h90::TmaSwizzle::k128B, 16, 1024);
      h90::wgmma_ss<__nv_bfloat16, N, false, kTransB>(d, da, db, ks > 0);
    }
  }
  h90::wgmma_commit();
  if (kReadBeforeWait)
    for (int i = 0; i < N / 2; ++i) out[tid * (N / 2) + i] = d[i];
  h90::wgmma_wait<0>();
  if (!kReadBeforeWait)
    for (int i = 0; i < N / 2; ++i) out[tid * (N / 2) + i] = d[i];
}

// A warp-specialized pipeline as the Hopper GEMMs run it: D (128 x 64) = A (128 x 256) * B
// (256 x 64), f16, 384 threads: warpgroups 0 and 1 consume (64 rows each), warpgroup 2's first
// thread produces. Two stages of (A 128 x 64 K-major, B 64 x 64 MN-major), 128B swizzle,
// full[s] (1 arrival + tx bytes) and empty[s] (256 consumer arrivals) mbarriers.
// kBug: 1 the consumers skip the full-barrier wait from the third k-tile on (they read a stage
// the producer is refilling); 2 the producer skips the empty-barrier wait (it overwrites a stage the
// consumers may still read); 3 the producer expects 16 more bytes than its loads bring, so the
// first phase never completes (deadlock); 4 the consumers release a stage (arrive on empty)
// before wgmma_wait, while their wgmma may still read it.
constexpr int kPipeM = 128, kPipeN = 64, kPipeK = 256, kPipeStageBytes = (128 * 64 + 64 * 64) * 2;
template <int kBug>
__global__ void tma_wgmma_pipeline(const __grid_constant__ h90::TmaDesc desc_a,
                                   const __grid_constant__ h90::TmaDesc desc_b, float* out) {
  FASTLM_DYNAMIC_SHARED(unsigned char, smem_raw);
  unsigned char* smem = h90::smem_align<1024>(smem_raw);  // the launch asks for 1 KB more
  FASTLM_SHARED(uint64_t, bars, [4]);  // full[0], full[1], empty[0], empty[1]
  uint64_t* full = &bars[0];
  uint64_t* empty = &bars[2];
  const int tid = threadIdx.x, wg = tid / 128;
  if (tid == 0) {
    for (int s = 0; s < 2; ++s) h90::mbar_init(&full[s], 1), h90::mbar_init(&empty[s], 256);
    h90::fence_barrier_init();
  }
  __syncthreads();
  constexpr int kTiles = kPipeK / 64;
  if (wg == 2) {
    h90::setmaxnreg_dec<40>();
    if (tid != 256) return;
    for (int kt = 0; kt < kTiles; ++kt) {
      const int s = kt % 2;
      if (kBug != 2) h90::mbar_wait(&empty[s], ((kt / 2) & 1) ^ 1);
      unsigned char* stage = smem + s * kPipeStageBytes;
      h90::mbar_arrive_expect_tx(&full[s], kPipeStageBytes + (kBug == 3 ? 16 : 0));
      h90::tma_load_2d(stage, &desc_a, kt * 64, 0, &full[s]);
      h90::tma_load_2d(stage + 128 * 128, &desc_b, 0, kt * 64, &full[s]);
    }
    return;
  }
  h90::setmaxnreg_inc<232>();
  float d[kPipeN / 2];
  for (int kt = 0; kt < kTiles; ++kt) {
    const int s = kt % 2;
    if (kBug != 1 || kt < 2) h90::mbar_wait(&full[s], (kt / 2) & 1);
    unsigned char* stage = smem + s * kPipeStageBytes;
    h90::wgmma_fence_operand(d);
    h90::wgmma_fence();
    for (int ks = 0; ks < 4; ++ks) {
      const uint64_t da = h90::smem_desc(stage + wg * 64 * 128 + 32 * ks, h90::TmaSwizzle::k128B, 16, 1024);
      const uint64_t db = h90::smem_desc(stage + 128 * 128 + 2048 * ks, h90::TmaSwizzle::k128B, 8192, 1024);
      h90::wgmma_ss<__half, kPipeN, false, true>(d, da, db, kt > 0 || ks > 0);
    }
    h90::wgmma_commit();
    if (kBug == 4) h90::mbar_arrive(&empty[s]);
    h90::wgmma_wait<0>();
    if (kBug != 4) h90::mbar_arrive(&empty[s]);
    h90::wgmma_fence_operand(d);
  }
  for (int i = 0; i < kPipeN / 2; ++i) out[tid * (kPipeN / 2) + i] = d[i];
}

// Named barriers between two warpgroups: warpgroup 1 writes, bar.arrive; warpgroup 0 bar.sync,
// reads (kSync false: warpgroup 0 reads without the barrier, a race).
template <bool kSync>
__global__ void named_handoff(const float* in, float* out) {
  FASTLM_SHARED(float, buf, [128]);
  const int tid = threadIdx.x;
  if (tid >= 128) {
    buf[tid - 128] = in[tid - 128] * 2.0f;
    h90::named_barrier_arrive(1, 256);
  } else {
    if (kSync) h90::named_barrier_sync(1, 256);
    out[tid] = buf[127 - tid];
  }
}

// One misuse each, which the emulator must stop: 0 an mbarrier initialized twice, 1 an arrive on
// an uninitialized one, 2 more arrivals than it expects in a phase, 3 a wgmma without
// wgmma_fence, 4 a TMA destination off the 1024-byte alignment 128B swizzle needs.
template <int kMisuse>
__global__ void sm90_misuse(const __grid_constant__ h90::TmaDesc desc, float* out) {
  FASTLM_DYNAMIC_SHARED(unsigned char, smem_raw);
  unsigned char* smem = h90::smem_align<1024>(smem_raw);  // the launch asks for 1 KB more
  FASTLM_SHARED(uint64_t, bar, [2]);
  const int tid = threadIdx.x;
  if (tid == 0) {
    h90::mbar_init(&bar[0], 1);
    if (kMisuse == 0) h90::mbar_init(&bar[0], 1);
    h90::fence_barrier_init();
  }
  __syncthreads();
  if (kMisuse == 1 && tid == 0) h90::mbar_arrive(&bar[1]);
  if (kMisuse == 2 && tid < 2) {
    if (tid == 0) h90::mbar_arrive_expect_tx(&bar[0], 16);  // the phase waits for 16 bytes still
    else h90::mbar_arrive(&bar[0]);
  }
  if (kMisuse == 3) {
    float d[4];
    h90::wgmma_ss<__half, 8, false, false>(d, 0, 0, false);
    out[tid] = d[0];
  }
  if (kMisuse == 4 && tid == 0) {
    h90::mbar_arrive_expect_tx(&bar[0], 4096);
    h90::tma_load_2d(smem + 128, &desc, 0, 0, &bar[0]);
  }
}

// ---- clusters and distributed shared memory
// A cluster-wide sum. Each CTA (64 threads) stages its 64 inputs; after a cluster barrier every
// CTA adds up the whole cluster's stages, read through mapa + ld.shared::cluster at 32, 64 and
// 128 bits (out[4 * block + w], w = 0, 1, 2; out[4 * block + 3] = its %cluster_ctarank), and
// thread 0 stores its CTA's sum into rank 0's inbox (st.shared::cluster). After a second
// barrier rank 0 adds up the inbox and, pulling each CTA's sum from it, the same again
// (out[4 * grid + 2 * cluster + 0 / 1]); a last barrier keeps every CTA's shared memory alive
// until then. Blocks are numbered x-fastest; clusters likewise, in units of the cluster shape.
// kBug: 1 rank 1 takes the first cluster barrier in thread 0 only, its other threads wait for
// thread 0 at a __syncthreads (a deadlock), 2 mapa with rank = cluster size, 3 the 128-bit reads one float4 past the stage,
// 4 no last barrier (the other CTAs exit while rank 0 still pulls from them), 5 no second
// barrier (rank 0 reads its inbox unordered with the other CTAs' remote stores: a race), 6 no
// first barrier (rank 1 reads rank 0, which has not started), 7 the last barrier an arrive
// without its wait (rank 1 exits unordered with rank 0's pull from it).
template <int kBug>
__global__ void cluster_sum(const float* in, float* out) {
  FASTLM_SHARED(float, stage, [64]);
  FASTLM_SHARED(float, part, [3][64]);
  FASTLM_SHARED(float, inbox, [8]);
  FASTLM_SHARED(float, mine, [1]);
  const int tid = threadIdx.x;
  const int block = int(blockIdx.x + blockIdx.y * gridDim.x);
  const uint32_t rank = h90::cluster_ctarank(), size = h90::cluster_nctarank();
  stage[tid] = in[block * 64 + tid];
  if (kBug == 1 && rank == 1) {
    if (tid == 0) h90::cluster_sync();
    __syncthreads();
  } else if (kBug != 6) {
    h90::cluster_sync();  // every stage written, every CTA running
  }
  if (tid == 0) {
    float sum = 0.0f;
    for (int i = 0; i < 64; ++i) sum += stage[i];
    mine[0] = sum;
    h90::st_shared_cluster(h90::mapa_shared(h90::smem_u32(&inbox[rank]), 0), sum);
  }
  const uint32_t last = kBug == 2 ? size : size - 1;
  float s1 = 0.0f, s2 = 0.0f, s4 = 0.0f;
  for (uint32_t q = 0; q <= last; ++q) {
    s1 += h90::ld_shared_cluster<float>(h90::mapa_shared(h90::smem_u32(&stage[tid]), q));
    if (tid < 32) {
      const float2 v = h90::ld_shared_cluster<float2>(h90::mapa_shared(h90::smem_u32(&stage[2 * tid]), q));
      s2 += v.x + v.y;
    }
    if (tid < 16) {
      const float4 v =
          h90::ld_shared_cluster<float4>(h90::mapa_shared(h90::smem_u32(&stage[4 * tid + (kBug == 3 ? 4 : 0)]), q));
      s4 += v.x + v.y + v.z + v.w;
    }
  }
  part[0][tid] = s1;
  if (tid < 32) part[1][tid] = s2;
  if (tid < 16) part[2][tid] = s4;
  __syncthreads();
  if (tid == 0) {
    for (int w = 0; w < 3; ++w) {
      float total = 0.0f;
      for (int i = 0; i < 64 >> w; ++i) total += part[w][i];
      out[4 * block + w] = total;
    }
    out[4 * block + 3] = float(rank);
  }
  if (kBug != 5) h90::cluster_sync();  // the inbox is complete
  if (rank == 0 && tid == 0) {
    const uint3 c = h90::cluster_nctaid();
    const int cluster = int(blockIdx.x / c.x + blockIdx.y / c.y * (gridDim.x / c.x));
    float pushed = 0.0f, pulled = 0.0f;
    for (uint32_t q = 0; q < size; ++q) {
      pushed += inbox[q];
      pulled += h90::ld_shared_cluster<float>(h90::mapa_shared(h90::smem_u32(&mine[0]), q));
    }
    out[4 * int(gridDim.x * gridDim.y) + 2 * cluster] = pushed;
    out[4 * int(gridDim.x * gridDim.y) + 2 * cluster + 1] = pulled;
  }
  if (kBug == 7) {
    h90::cluster_arrive();
    __syncthreads();
  } else if (kBug != 4) {
    h90::cluster_sync();  // no CTA exits while rank 0 may still read it
  }
}

template <int kBug>
void launch_cluster_sum(dim3 grid, dim3 cluster, const float* in, float* out) {
  cuda::launch_cluster_kernel(cluster_sum<kBug>, grid, 64, cluster, 0, nullptr, in, out);
}

template <typename T>
void to_16bit(const float* from, T* to, size_t n) {
  for (size_t i = 0; i < n; ++i) {
    if constexpr (std::is_same_v<T, __half>) to[i] = __float2half_rn(from[i]);
    else to[i] = __float2bfloat16_rn(from[i]);
  }
}

template <int N, bool kTransB, bool kRegsA, bool kReadBeforeWait = false>
void launch_wgmma_tile(const float* in, float* out) {
  const auto kernel = wgmma_tile<N, kTransB, kRegsA, kReadBeforeWait>;
  const size_t smem = 1024 + 8192 + (kTransB ? size_t(N + 63) / 64 * 8192 : size_t(N) * 128);
  cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
  launch_kernel(kernel, 1, 128, smem, nullptr, in, out);
}

template <int kBug>
void launch_pipeline(const float* in, float* out) {
  static __half a[kPipeM * kPipeK], b[kPipeK * kPipeN];
  to_16bit(in, a, kPipeM * kPipeK);
  to_16bit(in + kPipeM * kPipeK, b, kPipeK * kPipeN);
  h90::TmaDesc da, db;
  const char* why = nullptr;
  if (!h90::make_tma_desc_2d(&da, a, 2, kPipeK, kPipeM, kPipeK * 2, 64, 128, h90::TmaSwizzle::k128B, &why) ||
      !h90::make_tma_desc_2d(&db, b, 2, kPipeN, kPipeK, kPipeN * 2, 64, 64, h90::TmaSwizzle::k128B, &why)) {
    std::fprintf(stderr, "make_tma_desc_2d: %s\n", why);
    return;
  }
  constexpr int kSmem = 1024 + 2 * kPipeStageBytes;
  cudaFuncSetAttribute(tma_wgmma_pipeline<kBug>, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
  launch_kernel(tma_wgmma_pipeline<kBug>, 1, 384, kSmem, nullptr, da, db, out);
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
  // sm_90a: in holds the inputs the Python test laid out, out is sized for the kernel's output
  else if (is("tma_boxes")) {
    h90::TmaDesc desc;
    if (!h90::make_tma_desc_2d(&desc, in, 2, 72, 40, 144, 64, 32, h90::TmaSwizzle::k128B, nullptr)) return -2;
    launch_kernel(tma_boxes<2>, 1, 128, 8192 + 1024, nullptr, desc, out);
  }
  else if (is("tma_box_3d")) {
    h90::TmaDesc desc;
    const int64_t dims[3] = {64, 10, 3}, strides[2] = {160, 160 * 12};  // rows of 80 elements, 12 per slice
    const int box[3] = {64, 8, 2};
    if (!h90::make_tma_desc_3d(&desc, in, 2, dims, strides, box, h90::TmaSwizzle::kNone, nullptr)) return -2;
    launch_kernel(tma_boxes<3>, 1, 128, 2048 + 1024, nullptr, desc, out);
  }
  else if (std::strncmp(name, "sm90_misuse_", 12) == 0 && name[12] >= '0' && name[12] <= '4' && !name[13]) {
    h90::TmaDesc desc;
    if (!h90::make_tma_desc_2d(&desc, in, 2, 72, 40, 144, 64, 32, h90::TmaSwizzle::k128B, nullptr)) return -2;
    void (*const kernels[])(h90::TmaDesc, float*) = {sm90_misuse<0>, sm90_misuse<1>, sm90_misuse<2>, sm90_misuse<3>,
                                                     sm90_misuse<4>};
    launch_kernel(kernels[name[12] - '0'], 1, 128, 8192 + 1024, nullptr, desc, out);
  }
  else if (is("wgmma_ss_n64")) launch_wgmma_tile<64, false, false>(in, out);
  else if (is("wgmma_ss_n128_mn")) launch_wgmma_tile<128, true, false>(in, out);
  else if (is("wgmma_ss_n256")) launch_wgmma_tile<256, false, false>(in, out);
  else if (is("wgmma_ss_n24")) launch_wgmma_tile<24, false, false>(in, out);
  else if (is("wgmma_read_before_wait_bug")) launch_wgmma_tile<64, false, false, true>(in, out);
  else if (is("wgmma_rs_n128")) launch_wgmma_tile<128, false, true>(in, out);
  else if (is("wgmma_rs_n64_mn")) launch_wgmma_tile<64, true, true>(in, out);
  else if (is("pipeline")) launch_pipeline<0>(in, out);
  else if (is("pipeline_early_read_bug")) launch_pipeline<1>(in, out);
  else if (is("pipeline_overwrite_bug")) launch_pipeline<2>(in, out);
  else if (is("pipeline_deadlock_bug")) launch_pipeline<3>(in, out);
  else if (is("pipeline_early_release_bug")) launch_pipeline<4>(in, out);
  else if (is("named_handoff")) launch_kernel(named_handoff<true>, 1, 256, 0, nullptr, in, out);
  else if (is("named_handoff_bug")) launch_kernel(named_handoff<false>, 1, 256, 0, nullptr, in, out);
  // clusters: two clusters of 1, 2, 4 (2 x 2) or 8 CTAs; the bugs in clusters of 2 (the deadlock: 4)
  else if (is("cluster_sum_1")) launch_cluster_sum<0>(dim3(2), dim3(1), in, out);
  else if (is("cluster_sum_2")) launch_cluster_sum<0>(dim3(4), dim3(2), in, out);
  else if (is("cluster_sum_4")) launch_cluster_sum<0>(dim3(2, 4), dim3(2, 2), in, out);
  else if (is("cluster_sum_8")) launch_cluster_sum<0>(dim3(16), dim3(8), in, out);
  else if (is("cluster_deadlock_bug")) launch_cluster_sum<1>(dim3(4), dim3(4), in, out);
  else if (is("cluster_bad_rank_bug")) launch_cluster_sum<2>(dim3(2), dim3(2), in, out);
  else if (is("cluster_oob_bug")) launch_cluster_sum<3>(dim3(2), dim3(2), in, out);
  else if (is("cluster_exited_bug")) launch_cluster_sum<4>(dim3(2), dim3(2), in, out);
  else if (is("cluster_race_bug")) launch_cluster_sum<5>(dim3(2), dim3(2), in, out);
  else if (is("cluster_unstarted_bug")) launch_cluster_sum<6>(dim3(2), dim3(2), in, out);
  else if (is("cluster_no_wait_bug")) launch_cluster_sum<7>(dim3(2), dim3(2), in, out);
  else if (is("cluster_shape_bug")) launch_cluster_sum<0>(dim3(3), dim3(2), in, out);
  else return -1;
  return int(cudaGetLastError());
}

}  // namespace fastlm::emu_selftest
