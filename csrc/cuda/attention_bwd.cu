// Flash attention backward on tensor cores (wmma m16n16k16, fp16/bf16, fp32 accumulate),
// sm_80+, head dims up to 128. Three launches, no atomics (deterministic):
//   delta:  delta = rowsum(dO * O) per query row (fp32);
//   dK/dV:  a CTA owns 64 keys of one (batch, kv head), 16 per warp, and walks every query tile
//           of every query head in its GQA group: S^T = K Q^T, P^T = exp(S^T - lse),
//           dP^T = V dO^T, dS^T = P^T (dP^T - delta); dV += P^T dO, dK += dS^T Q;
//   dQ:     a CTA owns 64 queries, 16 per warp, and walks the key tiles it can see:
//           dQ += dS K, with key rows no query of the CTA sees zeroed first (NaN-safe).
// Both grids are 1-D over (head, tile) pairs (attention_common.cuh: tile_head).
// Accumulators live in fp32 shared memory and are loaded into / stored from wmma fragments
// around each product (attention_common.cuh: mma_acc).
#include "attention_common.cuh"

namespace fastlm::cuda::attn {
namespace {

constexpr int kTile = 32;  // the other side's tile: queries per step (dK/dV), keys per step (dQ)

template <int HD>
struct BwdSmem {
  static constexpr int ldh = HD + 8, lds = kTile + 4, ldp = kTile + 8, ldo = HD + 4;
  static constexpr size_t own = size_t(kRows) * ldh * 2;     // one staged (64 x HD) operand
  static constexpr size_t other = size_t(kTile) * ldh * 2;   // one staged (32 x HD) operand
  static constexpr size_t sf = size_t(kWarps) * 16 * lds * 4;  // per-warp fp32 score tiles
  static constexpr size_t sh = size_t(kWarps) * 16 * ldp * 2;  // per-warp 16-bit score tiles
  static constexpr size_t acc = size_t(kWarps) * 16 * ldo * 4; // per-warp fp32 accumulators
  static constexpr size_t dkdv = 2 * own + 2 * other + 2 * kTile * 4 + 2 * sf + 2 * sh + 2 * acc;
  static constexpr size_t dq = 2 * own + 2 * other + kTile * 4 + 2 * sf + sh + acc;
};

template <typename T>
__global__ void delta_kernel(const T* o, const T* go, float* delta, int64_t rows, int64_t dv) {
  const int64_t r = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= rows) return;
  float acc = 0.0f;
  for (int64_t c = 0; c < dv; ++c) acc += to_float(o[r * dv + c]) * to_float(go[r * dv + c]);
  delta[r] = acc;
}

template <typename T, int HD>
__global__ void __launch_bounds__(kWarps * 32, 1) dkdv_kernel(const Params p) {
  using L = BwdSmem<HD>;
  FASTLM_DYNAMIC_SHARED(unsigned char, smem);  // 128-byte aligned: wmma pointers need 32
  T* Ks = reinterpret_cast<T*>(smem);
  T* Vs = reinterpret_cast<T*>(smem + L::own);
  T* Qs = reinterpret_cast<T*>(smem + 2 * L::own);
  T* dOs = reinterpret_cast<T*>(smem + 2 * L::own + L::other);
  float* lse_s = reinterpret_cast<float*>(smem + 2 * L::own + 2 * L::other);
  float* delta_s = lse_s + kTile;
  float* St = reinterpret_cast<float*>(smem + 2 * L::own + 2 * L::other + 2 * kTile * 4);
  float* dPt = St + kWarps * 16 * L::lds;
  T* Pt = reinterpret_cast<T*>(dPt + kWarps * 16 * L::lds);
  T* dSt = Pt + kWarps * 16 * L::ldp;
  float* dK = reinterpret_cast<float*>(dSt + kWarps * 16 * L::ldp);
  float* dV = dK + kWarps * 16 * L::ldo;

  const AttentionShape& sh = p.sh;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const TileHead th = tile_head(blockIdx.x, sh.tk);
  const int64_t bhk = th.head, b = bhk / sh.kv_heads, hk = bhk % sh.kv_heads, group = sh.heads / sh.kv_heads;
  const int64_t key0 = th.tile * kRows, offset = causal_offset(sh);
  stage<T, HD>(Ks, L::ldh, static_cast<const T*>(p.k.data) + b * p.k.s[0] + hk * p.k.s[1], p.k.s[2], p.k.s[3], key0,
               kRows, sh.tk, sh.head_dim);
  stage<T, HD>(Vs, L::ldh, static_cast<const T*>(p.v.data) + b * p.v.s[0] + hk * p.v.s[1], p.v.s[2], p.v.s[3], key0,
               kRows, sh.tk, sh.value_dim);
  float *St_w = St + warp * 16 * L::lds, *dPt_w = dPt + warp * 16 * L::lds;
  T *Pt_w = Pt + warp * 16 * L::ldp, *dSt_w = dSt + warp * 16 * L::ldp;
  float *dK_w = dK + warp * 16 * L::ldo, *dV_w = dV + warp * 16 * L::ldo;
  for (int idx = lane; idx < 16 * L::ldo; idx += 32) dK_w[idx] = dV_w[idx] = 0.0f;
  const int row = lane >> 1, half = lane & 1;  // two lanes per key row
  const int64_t key = key0 + warp * 16 + row;
  int64_t lo = 0;  // first query that can see a key of this CTA
  if (sh.causal != Causal::kNone) lo = key0 - offset > 0 ? (key0 - offset) / kTile * kTile : 0;

  for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
    const char* mg = head_mask<T>(p, b, h);
    const int64_t bh = b * sh.heads + h;
    for (int64_t i0 = lo; i0 < sh.tq; i0 += kTile) {
      __syncthreads();  // the previous tile's Q/dO no longer read
      stage<T, HD>(Qs, L::ldh, static_cast<const T*>(p.q.data) + b * p.q.s[0] + h * p.q.s[1], p.q.s[2], p.q.s[3], i0,
                   kTile, sh.tq, sh.head_dim);
      stage<T, HD>(dOs, L::ldh, static_cast<const T*>(p.grad_out) + bh * sh.tq * sh.value_dim, sh.value_dim, 1, i0,
                   kTile, sh.tq, sh.value_dim);
      for (int c = threadIdx.x; c < kTile; c += blockDim.x) {
        const bool in = i0 + c < sh.tq;
        lse_s[c] = in ? p.lse[bh * sh.tq + i0 + c] : 0.0f;
        delta_s[c] = in ? p.delta[bh * sh.tq + i0 + c] : 0.0f;
      }
      __syncthreads();
      mma_acc<T, HD / 16, kTile / 16, false>(St_w, L::lds, Ks + warp * 16 * L::ldh, L::ldh, Qs, L::ldh, true);
      mma_acc<T, HD / 16, kTile / 16, false>(dPt_w, L::lds, Vs + warp * 16 * L::ldh, L::ldh, dOs, L::ldh, true);
      __syncwarp();
      for (int c = half * (kTile / 2); c < (half + 1) * (kTile / 2); ++c) {
        float s = St_w[row * L::lds + c] * sh.scale;
        const bool ok = visible<T>(p, mg, i0 + c, key, offset, &s);
        const float pt = ok ? __expf(s - lse_s[c]) : 0.0f;
        const float ds = ok ? pt * (dPt_w[row * L::lds + c] - delta_s[c]) : 0.0f;
        Pt_w[row * L::ldp + c] = from_float<T>(pt);
        dSt_w[row * L::ldp + c] = from_float<T>(ds);
      }
      __syncwarp();
      mma_acc<T, kTile / 16, HD / 16, true>(dV_w, L::ldo, Pt_w, L::ldp, dOs, L::ldh, false);
      mma_acc<T, kTile / 16, HD / 16, true>(dK_w, L::ldo, dSt_w, L::ldp, Qs, L::ldh, false);
    }
  }
  __syncwarp();
  if (key < sh.tk) {
    T* gk = static_cast<T*>(p.grad_k) + (bhk * sh.tk + key) * sh.head_dim;
    T* gv = static_cast<T*>(p.grad_v) + (bhk * sh.tk + key) * sh.value_dim;
    for (int c = half; c < sh.head_dim; c += 2) gk[c] = from_float<T>(dK_w[row * L::ldo + c] * sh.scale);
    for (int c = half; c < sh.value_dim; c += 2) gv[c] = from_float<T>(dV_w[row * L::ldo + c]);
  }
}

template <typename T, int HD>
__global__ void __launch_bounds__(kWarps * 32) dq_kernel(const Params p) {
  using L = BwdSmem<HD>;
  FASTLM_DYNAMIC_SHARED(unsigned char, smem);  // 128-byte aligned: wmma pointers need 32
  T* Qs = reinterpret_cast<T*>(smem);
  T* dOs = reinterpret_cast<T*>(smem + L::own);
  T* Ks = reinterpret_cast<T*>(smem + 2 * L::own);
  T* Vs = reinterpret_cast<T*>(smem + 2 * L::own + L::other);
  int* live = reinterpret_cast<int*>(smem + 2 * L::own + 2 * L::other);
  float* S = reinterpret_cast<float*>(smem + 2 * L::own + 2 * L::other + kTile * 4);
  float* dP = S + kWarps * 16 * L::lds;
  T* dS = reinterpret_cast<T*>(dP + kWarps * 16 * L::lds);
  float* dQ = reinterpret_cast<float*>(dS + kWarps * 16 * L::ldp);

  const AttentionShape& sh = p.sh;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const TileHead th = tile_head(blockIdx.x, sh.tq);
  const int64_t bh = th.head, b = bh / sh.heads, h = bh % sh.heads, hk = h / (sh.heads / sh.kv_heads);
  const int64_t q0 = th.tile * kRows, offset = causal_offset(sh);
  const char* mg = head_mask<T>(p, b, h);
  stage<T, HD>(Qs, L::ldh, static_cast<const T*>(p.q.data) + b * p.q.s[0] + h * p.q.s[1], p.q.s[2], p.q.s[3], q0,
               kRows, sh.tq, sh.head_dim);
  stage<T, HD>(dOs, L::ldh, static_cast<const T*>(p.grad_out) + bh * sh.tq * sh.value_dim, sh.value_dim, 1, q0, kRows,
               sh.tq, sh.value_dim);
  float *S_w = S + warp * 16 * L::lds, *dP_w = dP + warp * 16 * L::lds, *dQ_w = dQ + warp * 16 * L::ldo;
  T* dS_w = dS + warp * 16 * L::ldp;
  for (int idx = lane; idx < 16 * L::ldo; idx += 32) dQ_w[idx] = 0.0f;
  const int row = lane >> 1, half = lane & 1;  // two lanes per query row
  const int64_t qi = q0 + warp * 16 + row;
  const float lse = qi < sh.tq ? p.lse[bh * sh.tq + qi] : 0.0f;
  const float delta = qi < sh.tq ? p.delta[bh * sh.tq + qi] : 0.0f;
  int64_t hi = sh.tk;
  if (sh.causal != Causal::kNone) hi = q0 + kRows + offset < sh.tk ? q0 + kRows + offset : sh.tk;

  for (int64_t j0 = 0; j0 < hi; j0 += kTile) {
    __syncthreads();
    stage<T, HD>(Ks, L::ldh, static_cast<const T*>(p.k.data) + b * p.k.s[0] + hk * p.k.s[1], p.k.s[2], p.k.s[3], j0,
                 kTile, sh.tk, sh.head_dim);
    stage<T, HD>(Vs, L::ldh, static_cast<const T*>(p.v.data) + b * p.v.s[0] + hk * p.v.s[1], p.v.s[2], p.v.s[3], j0,
                 kTile, sh.tk, sh.value_dim);
    for (int c = threadIdx.x; c < kTile; c += blockDim.x) live[c] = 0;
    __syncthreads();
    mma_acc<T, HD / 16, kTile / 16, false>(S_w, L::lds, Qs + warp * 16 * L::ldh, L::ldh, Ks, L::ldh, true);
    mma_acc<T, HD / 16, kTile / 16, false>(dP_w, L::lds, dOs + warp * 16 * L::ldh, L::ldh, Vs, L::ldh, true);
    __syncwarp();
    for (int c = half * (kTile / 2); c < (half + 1) * (kTile / 2); ++c) {
      float s = S_w[row * L::lds + c] * sh.scale;
      const bool ok = visible<T>(p, mg, qi, j0 + c, offset, &s);
      const float pr = ok ? __expf(s - lse) : 0.0f;
      dS_w[row * L::ldp + c] = from_float<T>(ok ? pr * (dP_w[row * L::lds + c] - delta) : 0.0f);
      if (ok) atomicOr(&live[c], 1);  // many lanes mark one key: an atomic, not a racing store
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < kTile * HD; idx += blockDim.x)
      if (!live[idx / HD]) Ks[(idx / HD) * L::ldh + idx % HD] = from_float<T>(0.0f);
    __syncthreads();
    mma_acc<T, kTile / 16, HD / 16, true>(dQ_w, L::ldo, dS_w, L::ldp, Ks, L::ldh, false);
  }
  __syncwarp();
  if (qi < sh.tq) {
    T* gq = static_cast<T*>(p.grad_q) + (bh * sh.tq + qi) * sh.head_dim;
    for (int c = half; c < sh.head_dim; c += 2) gq[c] = from_float<T>(dQ_w[row * L::ldo + c] * sh.scale);
  }
}

template <typename T, int HD>
int launch(const Params& p, cudaStream_t stream) {
  using L = BwdSmem<HD>;
  cudaError_t err = cudaFuncSetAttribute(dkdv_kernel<T, HD>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(L::dkdv));
  if (err == cudaSuccess)
    err = cudaFuncSetAttribute(dq_kernel<T, HD>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(L::dq));
  if (err != cudaSuccess) return int(err);
  const int64_t rows = p.sh.batch * p.sh.heads * p.sh.tq;
  launch_kernel(delta_kernel<T>, unsigned((rows + 255) / 256), 256, 0, stream, static_cast<const T*>(p.out),
                static_cast<const T*>(p.grad_out), p.delta, rows, p.sh.value_dim);
  const dim3 kv_grid(unsigned(row_tiles(p.sh.tk) * p.sh.batch * p.sh.kv_heads));
  launch_kernel(dkdv_kernel<T, HD>, kv_grid, kWarps * 32, L::dkdv, stream, p);
  const dim3 q_grid(unsigned(row_tiles(p.sh.tq) * p.sh.batch * p.sh.heads));
  launch_kernel(dq_kernel<T, HD>, q_grid, kWarps * 32, L::dq, stream, p);
  return int(cudaGetLastError());
}

// The one table of backward instantiations: calls f(HD) as an integral constant for head dim
// hd <= 128 (the binding refuses larger ones), or returns `none`.
template <typename F, typename R>
R with_head_dim(int64_t hd, R none, F&& f) {
  using std::integral_constant;
  if (hd <= 32) return f(integral_constant<int, 32>{});
  if (hd <= 64) return f(integral_constant<int, 64>{});
  if (hd <= 80) return f(integral_constant<int, 80>{});
  if (hd <= 96) return f(integral_constant<int, 96>{});
  if (hd <= 128) return f(integral_constant<int, 128>{});
  return none;
}

template <typename T>
int dispatch_head_dim(const Params& p, cudaStream_t stream) {
  return with_head_dim(max_head_dim(p.sh), int(cudaErrorInvalidValue),
                       [&](auto hd) { return launch<T, hd.value>(p, stream); });
}

}  // namespace
}  // namespace fastlm::cuda::attn

namespace fastlm {

int64_t attention_backward_cuda_smem(int64_t head_dim, int64_t value_dim) {
  const int64_t hd = head_dim > value_dim ? head_dim : value_dim;
  return cuda::attn::with_head_dim(hd, int64_t(-1), [](auto d) {
    using L = cuda::attn::BwdSmem<d.value>;
    return int64_t(L::dkdv > L::dq ? L::dkdv : L::dq);
  });
}

int attention_backward_cuda(const AttentionShape& shape, const void* grad_out, Strided4 q, Strided4 k, Strided4 v,
                            Strided4 mask, const void* out, const float* lse, float* delta, void* grad_q,
                            void* grad_k, void* grad_v, cudaStream_t stream) {
  cuda::attn::Params p{shape, q, k, v, mask, const_cast<void*>(out), const_cast<float*>(lse)};
  p.grad_out = grad_out, p.delta = delta, p.grad_q = grad_q, p.grad_k = grad_k, p.grad_v = grad_v;
  if (shape.dtype == DType::kFloat16) return cuda::attn::dispatch_head_dim<__half>(p, stream);
  return cuda::attn::dispatch_head_dim<__nv_bfloat16>(p, stream);
}

}  // namespace fastlm
