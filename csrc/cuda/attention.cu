// Flash attention forward on tensor cores (nvcuda::wmma m16n16k16, fp16/bf16 in, fp32
// accumulate), sm_80+. One CTA = 4 warps = 64 queries of one (batch, head); each warp owns
// 16 query rows. Per key tile of BN keys: the CTA stages K and V in shared memory, each warp
// computes its 16 x BN scores S = Q K^T with wmma, runs the online softmax on them in shared
// memory (two lanes per row, fp32 statistics), rescales its fp32 O tile there and
// accumulates O += P V with wmma (the accumulator fragments are loaded from and stored back
// to that tile, so no per-row scaling of opaque fragments is needed). No T x T matrix ever
// reaches device memory. Masking follows fastlm/attention.h: hidden scores are -inf, their
// probabilities exactly 0, and value rows no query of the CTA sees are zeroed before P V (the
// lanes mark a key seen with a shared-memory atomicOr). The grid is 1-D over (head, query tile),
// tiles fastest, so any number of heads launches and one head's K/V stay hot in L2.
// Decode-like calls (Tq <= 16, Tk >= 1024) split the keys over gridDim.z CTAs that write fp32
// partials (O, max, sum), merged afterwards in a fixed order (no atomics).
#include "attention_common.cuh"

namespace fastlm::cuda::attn {
namespace {

template <int HD, int BN>
struct Smem {
  static constexpr int ldq = HD + 8, lds = BN + 4, ldp = BN + 8, ldo = HD + 4;
  static constexpr size_t q = size_t(kRows) * ldq * 2, k = size_t(BN) * ldq * 2, v = k;
  static constexpr size_t s = size_t(kWarps) * 16 * lds * 4, p = size_t(kWarps) * 16 * ldp * 2;
  static constexpr size_t o = size_t(kWarps) * 16 * ldo * 4, live = size_t(BN) * 4;
  static constexpr size_t bytes = q + k + v + s + p + o + live;
};

template <typename T, int HD, int BN>
__global__ void __launch_bounds__(kWarps * 32) forward_kernel(const Params p) {
  using L = Smem<HD, BN>;
  FASTLM_DYNAMIC_SHARED(unsigned char, smem);  // 128-byte aligned: wmma pointers need 32
  T* Qs = reinterpret_cast<T*>(smem);
  T* Ks = reinterpret_cast<T*>(smem + L::q);
  T* Vs = reinterpret_cast<T*>(smem + L::q + L::k);
  float* Ss = reinterpret_cast<float*>(smem + L::q + L::k + L::v);
  T* Ps = reinterpret_cast<T*>(smem + L::q + L::k + L::v + L::s);
  float* Os = reinterpret_cast<float*>(smem + L::q + L::k + L::v + L::s + L::p);
  int* live = reinterpret_cast<int*>(smem + L::q + L::k + L::v + L::s + L::p + L::o);

  const AttentionShape& sh = p.sh;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const TileHead th = tile_head(blockIdx.x, sh.tq);
  const int64_t bh = th.head, b = bh / sh.heads, h = bh % sh.heads, hk = h / (sh.heads / sh.kv_heads);
  const int q0 = int(th.tile) * kRows;
  const T* qg = static_cast<const T*>(p.q.data) + b * p.q.s[0] + h * p.q.s[1];
  const T* kg = static_cast<const T*>(p.k.data) + b * p.k.s[0] + hk * p.k.s[1];
  const T* vg = static_cast<const T*>(p.v.data) + b * p.v.s[0] + hk * p.v.s[1];
  const char* mg = head_mask<T>(p, b, h);
  const int64_t offset = causal_offset(sh);
  const int tq = int(sh.tq), tk = int(sh.tk);

  stage<T, HD>(Qs, L::ldq, qg, p.q.s[2], p.q.s[3], q0, kRows, tq, int(sh.head_dim));
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
    const int64_t end = q0 + kRows + offset;  // keys past the diagonal of the last row
    hi = end < tk ? int(end > 0 ? end : 0) : tk;
  }
  int jbeg = 0;  // split-KV (gridDim.z > 1): this CTA's chunk of keys only
  if (gridDim.z > 1) {
    jbeg = int(blockIdx.z * p.chunk);
    hi = min(hi, int(jbeg + p.chunk));
  }
  for (int j0 = jbeg; j0 < hi; j0 += BN) {
    __syncthreads();  // previous tile's K/V/live no longer read
    stage<T, HD>(Ks, L::ldq, kg, p.k.s[2], p.k.s[3], j0, BN, tk, int(sh.head_dim));
    stage<T, HD>(Vs, L::ldq, vg, p.v.s[2], p.v.s[3], j0, BN, tk, int(sh.value_dim));
    for (int idx = threadIdx.x; idx < BN; idx += blockDim.x) live[idx] = 0;
    __syncthreads();

    // S = Q K^T for this warp's 16 rows
    mma_acc<T, HD / 16, BN / 16, false>(So, L::lds, Qs + warp * 16 * L::ldq, L::ldq, Ks, L::ldq, true);
    __syncwarp();

    // online softmax on this lane's half row
    float mx = neg_inf();
    for (int c = half * (BN / 2); c < (half + 1) * (BN / 2); ++c) {
      float s = So[row * L::lds + c] * sh.scale;
      const bool ok = visible<T>(p, mg, qi, j0 + c, offset, &s);
      s = ok ? s : neg_inf();
      if (ok) atomicOr(&live[c], 1);  // many lanes mark one key: an atomic, not a racing store
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
    mma_acc<T, BN / 16, HD / 16, true>(Oo, L::ldo, Po, L::ldp, Vs, L::ldq, false);
    __syncwarp();
  }

  __syncwarp();  // the O tile was zeroed and updated by every lane of the warp (no key tile may have run)
  if (gridDim.z > 1) {  // partials for merge_kernel: unnormalized O, running max and sum
    if (qi < tq) {
      float* po = p.part + ((bh * gridDim.z + blockIdx.z) * sh.tq + qi) * (sh.value_dim + 2);
      for (int c = half; c < sh.value_dim; c += 2) po[c] = Oo[row * L::ldo + c];
      if (half == 0) po[sh.value_dim] = m_i, po[sh.value_dim + 1] = l_i;
    }
    return;
  }
  if (qi < tq) {
    const float inv = l_i > 0.0f ? 1.0f / l_i : 0.0f;
    T* o = static_cast<T*>(p.out) + (bh * sh.tq + qi) * sh.value_dim;
    for (int c = half; c < sh.value_dim; c += 2) o[c] = from_float<T>(Oo[row * L::ldo + c] * inv);
    if (half == 0) p.lse[bh * sh.tq + qi] = l_i > 0.0f ? m_i + __logf(l_i) : neg_inf();
  }
}

// Merges the split-KV partials of one query row (one CTA per row), splits in a fixed order.
template <typename T>
__global__ void merge_kernel(const float* part, T* out, float* lse, int64_t tq, int splits, int64_t dv) {
  const int64_t r = blockIdx.x, bh = r / tq, qi = r % tq;
  auto base = [&](int s) { return part + ((bh * splits + s) * tq + qi) * (dv + 2); };
  float m = neg_inf();
  for (int s = 0; s < splits; ++s) m = fmaxf(m, base(s)[dv]);
  float l = 0.0f;
  for (int s = 0; s < splits; ++s) {
    const float ms = base(s)[dv];
    l += ms == neg_inf() ? 0.0f : base(s)[dv + 1] * __expf(ms - m);
  }
  const float inv = l > 0.0f ? 1.0f / l : 0.0f;
  for (int64_t c = threadIdx.x; c < dv; c += blockDim.x) {
    float acc = 0.0f;
    for (int s = 0; s < splits; ++s) {
      const float ms = base(s)[dv];
      acc += ms == neg_inf() ? 0.0f : base(s)[c] * __expf(ms - m);
    }
    out[r * dv + c] = from_float<T>(acc * inv);
  }
  if (threadIdx.x == 0) lse[r] = l > 0.0f ? m + __logf(l) : neg_inf();
}

constexpr int64_t kSplitGrain = 64;  // split chunks are whole multiples of every key tile size

// How many key splits a call gets: decode-like calls (few queries, many keys) spread the keys
// over enough CTAs to give every SM about two; everything else runs unsplit.
int64_t num_splits(const AttentionShape& sh) {
  if (sh.tq > 16 || sh.tk < 1024) return 1;
  int device = 0, sms = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess)
    return 1;
  const int64_t ctas = sh.batch * sh.heads, want = (2 * sms + ctas - 1) / ctas;
  const int64_t most = (sh.tk + 4 * kSplitGrain - 1) / (4 * kSplitGrain);  // >= 4 tiles per split
  return want < 1 ? 1 : (want < most ? want : most);
}

int64_t split_chunk(const AttentionShape& sh, int64_t splits) {
  const int64_t per = (sh.tk + splits - 1) / splits;
  return (per + kSplitGrain - 1) / kSplitGrain * kSplitGrain;
}

template <typename T, int HD, int BN>
int launch(const Params& p, cudaStream_t stream) {
  const size_t bytes = Smem<HD, BN>::bytes;
  cudaError_t err = cudaFuncSetAttribute(forward_kernel<T, HD, BN>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes));
  if (err != cudaSuccess) return int(err);
  const unsigned splits = unsigned(p.chunk > 0 ? (p.sh.tk + p.chunk - 1) / p.chunk : 1);
  const dim3 grid(unsigned(row_tiles(p.sh.tq) * p.sh.batch * p.sh.heads), 1, splits);
  launch_kernel(forward_kernel<T, HD, BN>, grid, kWarps * 32, bytes, stream, p);
  if (splits > 1)
    launch_kernel(merge_kernel<T>, unsigned(p.sh.batch * p.sh.heads * p.sh.tq), 128, 0, stream, p.part,
                  static_cast<T*>(p.out), p.lse, p.sh.tq, int(splits), p.sh.value_dim);
  return int(cudaGetLastError());
}

// The one table of forward tile shapes: calls f(HD, BN) as integral constants for head dim hd.
template <typename F>
auto with_tiles(int64_t hd, F&& f) {
  using std::integral_constant;
  if (hd <= 32) return f(integral_constant<int, 32>{}, integral_constant<int, 64>{});
  if (hd <= 64) return f(integral_constant<int, 64>{}, integral_constant<int, 64>{});
  if (hd <= 80) return f(integral_constant<int, 80>{}, integral_constant<int, 64>{});
  if (hd <= 96) return f(integral_constant<int, 96>{}, integral_constant<int, 64>{});
  if (hd <= 128) return f(integral_constant<int, 128>{}, integral_constant<int, 64>{});
  return f(integral_constant<int, 256>{}, integral_constant<int, 32>{});
}

template <typename T>
int dispatch_head_dim(const Params& p, cudaStream_t stream) {
  return with_tiles(max_head_dim(p.sh), [&](auto hd, auto bn) { return launch<T, hd.value, bn.value>(p, stream); });
}

}  // namespace
}  // namespace fastlm::cuda::attn

namespace fastlm {

int64_t attention_forward_cuda_smem(int64_t head_dim, int64_t value_dim) {
  const int64_t hd = head_dim > value_dim ? head_dim : value_dim;
  return cuda::attn::with_tiles(hd, [](auto d, auto bn) { return int64_t(cuda::attn::Smem<d.value, bn.value>::bytes); });
}

int64_t attention_forward_cuda_workspace(const AttentionShape& shape) {
  const int64_t splits = cuda::attn::num_splits(shape);
  return splits > 1 ? shape.batch * shape.heads * splits * shape.tq * (shape.value_dim + 2) : 0;
}

int attention_forward_cuda(const AttentionShape& shape, Strided4 q, Strided4 k, Strided4 v, Strided4 mask, void* out,
                           float* lse, float* workspace, cudaStream_t stream) {
  cuda::attn::Params p{shape, q, k, v, mask, out, lse};
  const int64_t splits = cuda::attn::num_splits(shape);
  if (splits > 1 && workspace != nullptr) p.part = workspace, p.chunk = cuda::attn::split_chunk(shape, splits);
  if (shape.dtype == DType::kFloat16) return cuda::attn::dispatch_head_dim<__half>(p, stream);
  return cuda::attn::dispatch_head_dim<__nv_bfloat16>(p, stream);
}

}  // namespace fastlm
