// Flash attention forward on tensor cores (nvcuda::wmma m16n16k16, fp16/bf16 in, fp32
// accumulate), sm_80+. One CTA = 4 warps = 64 queries of one (batch, head); each warp owns
// 16 query rows. Per key tile of BN keys: the CTA stages K and V in shared memory, each warp
// computes its 16 x BN scores S = Q K^T with wmma, runs the online softmax on them in shared
// memory (two lanes per row, fp32 statistics), rescales its fp32 O tile there and
// accumulates O += P V with wmma (the accumulator fragments are loaded from and stored back
// to that tile, so no per-row scaling of opaque fragments is needed). No T x T matrix ever
// reaches device memory. Masking follows fastlm/attention.h: hidden scores are -inf, their
// probabilities exactly 0, and value rows no query of the CTA sees are zeroed before P V.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cstdint>

#include "activations.cuh"
#include "fastlm/attention.h"

namespace fastlm::cuda {
namespace {

namespace wmma = nvcuda::wmma;

constexpr int kWarps = 4;
constexpr int kBlockM = 16 * kWarps;
__device__ __forceinline__ float neg_inf() { return -__int_as_float(0x7f800000); }

template <int HD, int BN>
struct Smem {
  static constexpr int ldq = HD + 8, lds = BN + 4, ldp = BN + 8, ldo = HD + 4;
  static constexpr size_t q = size_t(kBlockM) * ldq * 2, k = size_t(BN) * ldq * 2, v = k;
  static constexpr size_t s = size_t(kWarps) * 16 * lds * 4, p = size_t(kWarps) * 16 * ldp * 2;
  static constexpr size_t o = size_t(kWarps) * 16 * ldo * 4, live = size_t(BN) * 4;
  static constexpr size_t bytes = q + k + v + s + p + o + live;
};

// Rows [r0, r0 + rows) x cols [0, HD) of a strided (T, D) matrix into shared memory, zero padded.
template <typename T, int HD>
__device__ __forceinline__ void stage(T* dst, int ld, const T* src, int64_t rs, int64_t cs, int r0, int rows, int valid_rows,
                                      int cols) {
  for (int idx = threadIdx.x; idx < rows * HD; idx += blockDim.x) {
    const int r = idx / HD, c = idx % HD;
    T val = from_float<T>(0.0f);
    if (r0 + r < valid_rows && c < cols) val = src[(r0 + r) * rs + c * cs];
    dst[r * ld + c] = val;
  }
}

struct Params {
  AttentionShape sh;
  Strided4 q, k, v, mask;
  void* out;
  float* lse;
};

template <typename T, int HD, int BN>
__global__ void __launch_bounds__(kWarps * 32) forward_kernel(const Params p) {
  using L = Smem<HD, BN>;
  extern __shared__ __align__(16) unsigned char smem[];
  T* Qs = reinterpret_cast<T*>(smem);
  T* Ks = reinterpret_cast<T*>(smem + L::q);
  T* Vs = reinterpret_cast<T*>(smem + L::q + L::k);
  float* Ss = reinterpret_cast<float*>(smem + L::q + L::k + L::v);
  T* Ps = reinterpret_cast<T*>(smem + L::q + L::k + L::v + L::s);
  float* Os = reinterpret_cast<float*>(smem + L::q + L::k + L::v + L::s + L::p);
  int* live = reinterpret_cast<int*>(smem + L::q + L::k + L::v + L::s + L::p + L::o);

  const AttentionShape& sh = p.sh;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t bh = blockIdx.y, b = bh / sh.heads, h = bh % sh.heads, hk = h / (sh.heads / sh.kv_heads);
  const int q0 = blockIdx.x * kBlockM;
  const T* qg = static_cast<const T*>(p.q.data) + b * p.q.s[0] + h * p.q.s[1];
  const T* kg = static_cast<const T*>(p.k.data) + b * p.k.s[0] + hk * p.k.s[1];
  const T* vg = static_cast<const T*>(p.v.data) + b * p.v.s[0] + hk * p.v.s[1];
  const char* mg = p.mask.data == nullptr ? nullptr
                   : static_cast<const char*>(p.mask.data) +
                         (b * p.mask.s[0] + h * p.mask.s[1]) * (sh.mask_kind == MaskKind::kBool ? 1 : int64_t(sizeof(T)));
  const int64_t offset = sh.causal == Causal::kBottomRight ? sh.tk - sh.tq : 0;
  const int tq = int(sh.tq), tk = int(sh.tk);

  stage<T, HD>(Qs, L::ldq, qg, p.q.s[2], p.q.s[3], q0, kBlockM, tq, int(sh.head_dim));
  float* So = Ss + warp * 16 * L::lds;
  T* Po = Ps + warp * 16 * L::ldp;
  float* Oo = Os + warp * 16 * L::ldo;
  for (int idx = lane; idx < 16 * L::ldo; idx += 32) Oo[idx] = 0.0f;
  // two lanes per query row, each owning half of the key columns and half of the O columns
  const int row = lane >> 1, half = lane & 1;
  const int64_t qi = q0 + warp * 16 + row;
  float m_i = neg_inf(), l_i = 0.0f;

  int hi = tk;
  if (sh.causal != Causal::kNone) {
    const int64_t end = q0 + kBlockM + offset;  // keys past the diagonal of the last row
    hi = end < tk ? int(end > 0 ? end : 0) : tk;
  }
  for (int j0 = 0; j0 < hi; j0 += BN) {
    __syncthreads();  // previous tile's K/V/live no longer read
    stage<T, HD>(Ks, L::ldq, kg, p.k.s[2], p.k.s[3], j0, BN, tk, int(sh.head_dim));
    stage<T, HD>(Vs, L::ldq, vg, p.v.s[2], p.v.s[3], j0, BN, tk, int(sh.value_dim));
    for (int idx = threadIdx.x; idx < BN; idx += blockDim.x) live[idx] = 0;
    __syncthreads();

    // S = Q K^T for this warp's 16 rows
#pragma unroll
    for (int n = 0; n < BN / 16; ++n) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::fill_fragment(acc, 0.0f);
#pragma unroll
      for (int kk = 0; kk < HD / 16; ++kk) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> bk;
        wmma::load_matrix_sync(a, Qs + warp * 16 * L::ldq + kk * 16, L::ldq);
        wmma::load_matrix_sync(bk, Ks + n * 16 * L::ldq + kk * 16, L::ldq);
        wmma::mma_sync(acc, a, bk, acc);
      }
      wmma::store_matrix_sync(So + n * 16, acc, L::lds, wmma::mem_row_major);
    }
    __syncwarp();

    // online softmax on this lane's half row
    float mx = neg_inf();
    for (int c = half * (BN / 2); c < (half + 1) * (BN / 2); ++c) {
      const int64_t j = j0 + c;
      bool ok = qi < tq && j < tk && (sh.causal == Causal::kNone || j <= qi + offset);
      float s = So[row * L::lds + c] * sh.scale;
      if (ok && sh.mask_kind == MaskKind::kBool) {
        ok = reinterpret_cast<const uint8_t*>(mg)[qi * p.mask.s[2] + j * p.mask.s[3]] != 0;
      } else if (ok && sh.mask_kind == MaskKind::kAdditive) {
        s += to_float(reinterpret_cast<const T*>(mg)[qi * p.mask.s[2] + j * p.mask.s[3]]);
        ok = s != neg_inf();
      }
      s = ok ? s : neg_inf();
      if (ok) live[c] = 1;  // benign race: every writer stores 1
      So[row * L::lds + c] = s;
      mx = fmaxf(mx, s);
    }
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    const float m_new = fmaxf(m_i, mx);
    const float sub = m_new == neg_inf() ? 0.0f : m_new;
    const float alpha = m_i == neg_inf() ? 0.0f : __expf(m_i - sub);
    float sum = 0.0f;
    for (int c = half * (BN / 2); c < (half + 1) * (BN / 2); ++c) {
      const float s = So[row * L::lds + c];
      const float pr = s == neg_inf() ? 0.0f : __expf(s - sub);
      sum += pr;
      Po[row * L::ldp + c] = from_float<T>(pr);
    }
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    l_i = l_i * alpha + sum;
    m_i = m_new;
    for (int c = half * (HD / 2); c < (half + 1) * (HD / 2); ++c) Oo[row * L::ldo + c] *= alpha;
    __syncthreads();  // live[] complete, P and rescaled O visible
    for (int idx = threadIdx.x; idx < BN * HD; idx += blockDim.x)
      if (!live[idx / HD]) Vs[(idx / HD) * L::ldq + idx % HD] = from_float<T>(0.0f);
    __syncthreads();

    // O += P V
#pragma unroll
    for (int d = 0; d < HD / 16; ++d) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::load_matrix_sync(acc, Oo + d * 16, L::ldo, wmma::mem_row_major);
#pragma unroll
      for (int kk = 0; kk < BN / 16; ++kk) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> bv;
        wmma::load_matrix_sync(a, Po + kk * 16, L::ldp);
        wmma::load_matrix_sync(bv, Vs + kk * 16 * L::ldq + d * 16, L::ldq);
        wmma::mma_sync(acc, a, bv, acc);
      }
      wmma::store_matrix_sync(Oo + d * 16, acc, L::ldo, wmma::mem_row_major);
    }
    __syncwarp();
  }

  if (qi < tq) {
    const float inv = l_i > 0.0f ? 1.0f / l_i : 0.0f;
    T* o = static_cast<T*>(p.out) + (bh * sh.tq + qi) * sh.value_dim;
    for (int c = half; c < sh.value_dim; c += 2) o[c] = from_float<T>(Oo[row * L::ldo + c] * inv);
    if (half == 0) p.lse[bh * sh.tq + qi] = l_i > 0.0f ? m_i + __logf(l_i) : neg_inf();
  }
}

template <typename T, int HD, int BN>
int launch(const Params& p, cudaStream_t stream) {
  const size_t bytes = Smem<HD, BN>::bytes;
  cudaError_t err = cudaFuncSetAttribute(forward_kernel<T, HD, BN>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes));
  if (err != cudaSuccess) return int(err);
  const dim3 grid(unsigned((p.sh.tq + kBlockM - 1) / kBlockM), unsigned(p.sh.batch * p.sh.heads));
  forward_kernel<T, HD, BN><<<grid, kWarps * 32, bytes, stream>>>(p);
  return int(cudaGetLastError());
}

template <typename T>
int dispatch_head_dim(const Params& p, cudaStream_t stream) {
  const int64_t hd = p.sh.head_dim > p.sh.value_dim ? p.sh.head_dim : p.sh.value_dim;
  if (hd <= 32) return launch<T, 32, 64>(p, stream);
  if (hd <= 64) return launch<T, 64, 64>(p, stream);
  if (hd <= 80) return launch<T, 80, 64>(p, stream);
  if (hd <= 96) return launch<T, 96, 64>(p, stream);
  if (hd <= 128) return launch<T, 128, 64>(p, stream);
  return launch<T, 256, 32>(p, stream);
}

}  // namespace
}  // namespace fastlm::cuda

namespace fastlm {

int attention_forward_cuda(const AttentionShape& shape, Strided4 q, Strided4 k, Strided4 v, Strided4 mask, void* out,
                           float* lse, cudaStream_t stream) {
  const cuda::Params p{shape, q, k, v, mask, out, lse};
  if (shape.dtype == DType::kFloat16) return cuda::dispatch_head_dim<__half>(p, stream);
  return cuda::dispatch_head_dim<__nv_bfloat16>(p, stream);
}

}  // namespace fastlm
