// Rotary position embedding on CUDA: q (B, Hq, T, D) and k (B, Hk, T, D) rotated in one pass.
//
// What: per token (b, t), R/2 angles; pair i of every head of q and k (rotate-half: x[i] and
// x[i + R/2]; interleaved: x[2i] and x[2i + 1]) becomes (x1 c - x2 s, x2 c + x1 s), s negated
// for the backward; dims R..D-1 are copied. c, s come from cos/sin tables (any float dtype,
// (Bc, T, R/2) strided) or are computed from positions and inv_freq in fp32.
//
// Why it is fast: RoPE is memory-bound. Per token it must move 2 (Hq + Hk) D elements (read q
// and k, write both outputs) and does ~3 flops per element, far below any GPU's flop/byte
// balance, so the kernel's job is to move those bytes once, in wide transactions, and nothing
// else: cos/sin for a token are read (or computed) once into shared memory and reused by all
// Hq + Hk heads (a per-head table read would add 2 R/2 loads per head), q and k are handled by
// the same CTA (one launch instead of two, and the table is not read twice), and each thread
// moves 16-byte packs (8 halves / 4 floats per load) when the last dim is dense and the strides
// and pointers allow it; any other layout takes the scalar path, correct for every stride.
// Angles are not fed to __sincosf: positions reach 1e5 and beyond, and the fast intrinsic's error
// grows with |angle| (no full range reduction). Nor to sincosf, whose slow path for large angles
// keeps a table in local memory: the angle is reduced to turns in double (two flops) and handed to
// sincospif (~1 ulp). It is computed R/2 times per token, not per element, so its cost is hidden
// behind the memory.
//
// Launch shape: block (tx, ty), tx threads (a multiple of 32, up to 256) over the token's
// (head, unit) items, ty = 256 / tx tokens per CTA so short rows still fill a CTA; grid.x =
// ceil(B T / ty) CTAs (tokens on grid.x, never heads on grid.y: its limit is 65535). A unit is
// VEC pairs (2 packs) or one pack of the pass-through dims. Dynamic shared memory:
// ty * 2 * R/2 floats.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>

#include "activations.cuh"
#include "launch.cuh"
#include "row_io.cuh"
#include "fastlm/rope.h"

namespace fastlm::cuda {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ float table_value(DType dtype, const void* base, int64_t offset) {
  switch (dtype) {
    case DType::kFloat16: return to_float(static_cast<const __half*>(base)[offset]);
    case DType::kBFloat16: return to_float(static_cast<const __nv_bfloat16*>(base)[offset]);
    default: return static_cast<const float*>(base)[offset];
  }
}

// Element strides of one 4-D operand, by value in the kernel's parameters.
struct Strides {
  int64_t b, h, t, d;
};

struct Params {
  int64_t tokens, seq, q_heads, heads, half, dim;
  int64_t rot_units, units;  // per head: rotation units (VEC pairs each), then pass-through packs
  Strides q, k, qo, ko;
  const void* q_ptr;
  const void* k_ptr;
  void* qo_ptr;
  void* ko_ptr;
  DType table_dtype;
  const void* cos;
  const void* sin;
  int64_t cos_b, cos_t, cos_i, sin_b, sin_t, sin_i;
  const int64_t* positions;
  int64_t pos_b, pos_t;
  const float* inv_freq;
  float scale, sign;
};

template <typename T, int VEC>
__device__ __forceinline__ Pack<T, VEC> load_pack(const T* p, int64_t stride) {
  Pack<T, VEC> r;
  if constexpr (VEC == 1) {
    r.v[0] = p[0];
  } else {
    (void)stride;  // VEC > 1 only with unit last-dim stride
    r = *reinterpret_cast<const Pack<T, VEC>*>(p);
  }
  return r;
}

template <typename T, int VEC>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, VEC>& v) {
  if constexpr (VEC == 1) p[0] = v.v[0];
  else *reinterpret_cast<Pack<T, VEC>*>(p) = v;
}

template <typename T, int VEC, bool kInterleaved>
__global__ void __launch_bounds__(kThreads) rope_kernel(Params p) {
  FASTLM_DYNAMIC_SHARED(float, smem);
  const int64_t tok = int64_t(blockIdx.x) * blockDim.y + threadIdx.y;
  const bool live = tok < p.tokens;  // no early return: the block meets at __syncthreads below
  const int64_t b = live ? tok / p.seq : 0, t = live ? tok % p.seq : 0;
  float* cs = smem + int64_t(threadIdx.y) * 2 * p.half;  // [c[0..half), s[0..half)]
  if (live) {
    for (int64_t i = threadIdx.x; i < p.half; i += blockDim.x) {
      float c, s;
      if (p.positions != nullptr) {
        const float angle = float(p.positions[b * p.pos_b + t * p.pos_t]) * p.inv_freq[i];
        // the fp32 angle (as HF forms it) reduced to [-1/2, 1/2) turns in double, exactly enough
        // for any position, then sincospif, whose own reduction is trivial: ~1 ulp, and unlike
        // sincosf no Payne-Hanek slow path with its local-memory table
        const double turns = double(angle) * (0.5 / 3.14159265358979323846);
        sincospif(float(2.0 * (turns - rint(turns))), &s, &c);
      } else {
        c = table_value(p.table_dtype, p.cos, b * p.cos_b + t * p.cos_t + i * p.cos_i);
        s = table_value(p.table_dtype, p.sin, b * p.sin_b + t * p.sin_t + i * p.sin_i);
      }
      cs[i] = p.scale * c;
      cs[p.half + i] = p.sign * (p.scale * s);
    }
  }
  __syncthreads();
  if (!live) return;
  const int64_t items = p.heads * p.units;
  for (int64_t item = threadIdx.x; item < items; item += blockDim.x) {
    const int64_t h = item / p.units, u = item % p.units;
    const bool is_q = h < p.q_heads;
    const int64_t hh = is_q ? h : h - p.q_heads;
    const Strides& xs = is_q ? p.q : p.k;
    const Strides& ys = is_q ? p.qo : p.ko;
    const T* x = static_cast<const T*>(is_q ? p.q_ptr : p.k_ptr) + b * xs.b + hh * xs.h + t * xs.t;
    T* y = static_cast<T*>(is_q ? p.qo_ptr : p.ko_ptr) + b * ys.b + hh * ys.h + t * ys.t;
    if (u >= p.rot_units) {  // pass-through pack of dims R..D-1
      const int64_t e = 2 * p.half + (u - p.rot_units) * VEC;
      store_pack<T, VEC>(y + e * ys.d, load_pack<T, VEC>(x + e * xs.d, xs.d));
      continue;
    }
    // pack A holds the first, pack B the second element of VEC pairs
    const int64_t first = u * VEC;  // first pair of this unit
    const int64_t ea = kInterleaved ? 2 * first : first;
    const int64_t eb = kInterleaved ? 2 * first + VEC : first + p.half;
    const Pack<T, VEC> a = load_pack<T, VEC>(x + ea * xs.d, xs.d);
    const Pack<T, VEC> bb = load_pack<T, VEC>(x + eb * xs.d, xs.d);
    Pack<T, VEC> ya, yb;
    if constexpr (kInterleaved && VEC > 1) {
      // packs a, bb are 2 VEC consecutive elements: pair j is (elem 2j, elem 2j + 1)
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float x1 = to_float(j < VEC / 2 ? a.v[2 * j] : bb.v[2 * j - VEC]);
        const float x2 = to_float(j < VEC / 2 ? a.v[2 * j + 1] : bb.v[2 * j + 1 - VEC]);
        const float c = cs[first + j], s = cs[p.half + first + j];
        const T y1 = from_float<T>(x1 * c - x2 * s), y2 = from_float<T>(x2 * c + x1 * s);
        if (j < VEC / 2) {
          ya.v[2 * j] = y1;
          ya.v[2 * j + 1] = y2;
        } else {
          yb.v[2 * j - VEC] = y1;
          yb.v[2 * j + 1 - VEC] = y2;
        }
      }
    } else {
      // rotate-half, or one interleaved pair (VEC = 1: a, bb are elements 2i and 2i + 1)
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float x1 = to_float(a.v[j]), x2 = to_float(bb.v[j]);
        const float c = cs[first + j], s = cs[p.half + first + j];
        ya.v[j] = from_float<T>(x1 * c - x2 * s);
        yb.v[j] = from_float<T>(x2 * c + x1 * s);
      }
    }
    store_pack<T, VEC>(y + ea * ys.d, ya);
    store_pack<T, VEC>(y + eb * ys.d, yb);
  }
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

// 16-byte packs need unit last-dim strides, every other stride, R/2 and D - R a multiple of
// the pack, and 16-byte aligned base pointers.
template <typename T>
bool can_vectorize(const RopeProblem& p) {
  constexpr int64_t kVec = 16 / sizeof(T);
  if (p.half_rotary % kVec || (p.head_dim - 2 * p.half_rotary) % kVec) return false;
  for (const int64_t* s : {p.q_s, p.k_s, p.q_out_s, p.k_out_s}) {
    if (s[3] != 1 || s[0] % kVec || s[1] % kVec || s[2] % kVec) return false;
  }
  return aligned16(p.q) && aligned16(p.k) && aligned16(p.q_out) && aligned16(p.k_out);
}

template <typename T, int VEC>
int launch(const RopeProblem& p, cudaStream_t stream) {
  Params k{};
  k.tokens = p.batch * p.seq;
  k.seq = p.seq;
  k.q_heads = p.q_heads;
  k.heads = p.q_heads + p.k_heads;
  k.half = p.half_rotary;
  k.dim = p.head_dim;
  k.rot_units = p.half_rotary / VEC;
  k.units = k.rot_units + (p.head_dim - 2 * p.half_rotary) / VEC;
  k.q = {p.q_s[0], p.q_s[1], p.q_s[2], p.q_s[3]};
  k.k = {p.k_s[0], p.k_s[1], p.k_s[2], p.k_s[3]};
  k.qo = {p.q_out_s[0], p.q_out_s[1], p.q_out_s[2], p.q_out_s[3]};
  k.ko = {p.k_out_s[0], p.k_out_s[1], p.k_out_s[2], p.k_out_s[3]};
  k.q_ptr = p.q;
  k.k_ptr = p.k;
  k.qo_ptr = p.q_out;
  k.ko_ptr = p.k_out;
  k.table_dtype = p.table_dtype;
  k.cos = p.cos;
  k.sin = p.sin;
  k.cos_b = p.cos_s[0], k.cos_t = p.cos_s[1], k.cos_i = p.cos_s[2];
  k.sin_b = p.sin_s[0], k.sin_t = p.sin_s[1], k.sin_i = p.sin_s[2];
  k.positions = p.positions;
  k.pos_b = p.positions_s[0], k.pos_t = p.positions_s[1];
  k.inv_freq = p.inv_freq;
  k.scale = p.scale;
  k.sign = p.inverse ? -1.0f : 1.0f;

  const int64_t items = k.heads * k.units;
  const int tx = int(std::min<int64_t>(kThreads, std::max<int64_t>(32, (items + 31) / 32 * 32)));
  int ty = kThreads / tx;
  const int64_t per_token_smem = 2 * p.half_rotary * int64_t(sizeof(float));
  while (ty > 1 && ty * per_token_smem > 48 * 1024) ty /= 2;
  const int64_t blocks = (k.tokens + ty - 1) / ty;
  if (blocks > INT32_MAX) return int(cudaErrorInvalidConfiguration);
  const size_t smem = size_t(ty * per_token_smem);
  if (p.interleaved)
    launch_kernel(rope_kernel<T, VEC, true>, dim3(unsigned(blocks)), dim3(unsigned(tx), unsigned(ty)), smem, stream, k);
  else
    launch_kernel(rope_kernel<T, VEC, false>, dim3(unsigned(blocks)), dim3(unsigned(tx), unsigned(ty)), smem, stream,
                  k);
  return int(cudaGetLastError());
}

template <typename T>
int launch_typed(const RopeProblem& p, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  return can_vectorize<T>(p) ? launch<T, kVec>(p, stream) : launch<T, 1>(p, stream);
}

}  // namespace
}  // namespace fastlm::cuda

namespace fastlm {

int rope_cuda(const RopeProblem& p, cudaStream_t stream) {
  if (p.batch == 0 || p.seq == 0 || p.head_dim == 0 || p.q_heads + p.k_heads == 0) return 0;
  if (p.half_rotary > kRopeCudaMaxHalfRotary) return int(cudaErrorInvalidValue);
  switch (p.dtype) {
    case DType::kFloat32: return cuda::launch_typed<float>(p, stream);
    case DType::kFloat16: return cuda::launch_typed<__half>(p, stream);
    case DType::kBFloat16: return cuda::launch_typed<__nv_bfloat16>(p, stream);
  }
  return int(cudaErrorInvalidValue);
}

}  // namespace fastlm
