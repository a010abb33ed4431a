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
// the same CTA (one launch instead of two, and the table is not read twice), and q and k move
// in 16-byte packs (8 halves / 4 floats per access) whenever the last dim is dense:
//   packs   R/2, D - R, every stride and pointer pack multiples: a thread loads pack A (first
//           elements of VEC pairs) and pack B (their partners) straight into registers and
//           stores two packs: 2 LDG.128 + 2 STG.128 per 2 VEC elements, nothing else.
//   staged  any other unit-stride layout (head dim 72 in 16-bit types: R/2 = 36 is no pack
//           multiple, partial rotary, odd offsets, odd row strides, e.g. a view of a fused QKV):
//           pairs straddle packs and x and y rows need not share a 16-byte phase, so each pass
//           stages `chunk` heads of the token in shared memory: x's row split by its own address
//           (row_io.cuh: < VEC scalars, packs, < VEC scalars), 2 packs (32 B) in flight per
//           thread, placed at its phase so that its packs are STS.128; after a barrier y's row,
//           split by y's address, is written in packs, each element read from its staged pair
//           (2 LDS per element, any partner). Per row: D / VEC LDG.128 and STG.128 and at most
//           2 (VEC - 1) scalars each side, the global traffic of the packs path; the shared side
//           (1 STS.128 + 2 VEC LDS per pack) should hide under it (an estimate: not yet timed).
//           Rows too long to stage one head (D * sizeof(T) near 48 KB) go to
//   scalar  q / k with a last-dim stride != 1 (every other element, a stride-0 gradient), where
//           no two elements are adjacent: element loads, correct for every stride.
// Angles are not fed to __sincosf: positions reach 1e5 and beyond, and the fast intrinsic's error
// grows with |angle| (no full range reduction). Nor to sincosf, whose slow path for large angles
// keeps a table in local memory: the angle is reduced to turns in double (two flops) and handed to
// sincospif (~1 ulp). It is computed R/2 times per token, not per element, so its cost is hidden
// behind the memory.
//
// Launch shape: block (tx, ty), tx threads (a multiple of 32, up to 256) over the token's
// (head, unit) items, ty = 256 / tx tokens per CTA so short rows still fill a CTA; grid.x =
// ceil(B T / ty) CTAs (tokens on grid.x, never heads on grid.y: its limit is 65535). A unit is
// VEC pairs (2 packs) or one pack of the pass-through dims (staged: one pack of a row, or its
// head or tail scalars). Dynamic shared memory: ty * 2 * R/2 floats, staged also ty * chunk rows
// of D rounded up to a pack plus one pack, within 48 KB.
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
  int64_t chunk, row_elems, stage_at;  // staged path: heads per pass, shared row stride, staging's first float
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

// This thread's token (b, t) (live: one of the B T; a block's others still meet its barriers)
// and its angles in shared memory, cs[0..half) = scale cos, cs[half..2 half) = sign scale sin,
// written by the token's x threads (the caller syncs before reading them).
struct Token {
  bool live;
  int64_t b, t;
  float* cs;
};
__device__ __forceinline__ Token token_angles(const Params& p, float* smem) {
  const int64_t tok = int64_t(blockIdx.x) * blockDim.y + threadIdx.y;
  const bool live = tok < p.tokens;
  const Token tk{live, live ? tok / p.seq : 0, live ? tok % p.seq : 0, smem + int64_t(threadIdx.y) * 2 * p.half};
  for (int64_t i = threadIdx.x; live && i < p.half; i += blockDim.x) {
    float c, s;
    if (p.positions != nullptr) {
      const float angle = float(p.positions[tk.b * p.pos_b + tk.t * p.pos_t]) * p.inv_freq[i];
      // the fp32 angle (as HF forms it) reduced to [-1/2, 1/2) turns in double, exactly enough
      // for any position, then sincospif, whose own reduction is trivial: ~1 ulp, and unlike
      // sincosf no Payne-Hanek slow path with its local-memory table
      const double turns = double(angle) * (0.5 / 3.14159265358979323846);
      sincospif(float(2.0 * (turns - rint(turns))), &s, &c);
    } else {
      c = table_value(p.table_dtype, p.cos, tk.b * p.cos_b + tk.t * p.cos_t + i * p.cos_i);
      s = table_value(p.table_dtype, p.sin, tk.b * p.sin_b + tk.t * p.sin_t + i * p.sin_i);
    }
    tk.cs[i] = p.scale * c;
    tk.cs[p.half + i] = p.sign * (p.scale * s);
  }
  return tk;
}

// Head h (q heads first, then k heads) of token (b, t): its input and output rows.
template <typename T>
struct HeadRows {
  const T* x;
  T* y;
  int64_t xd, yd;  // element strides of the last dim
};
template <typename T>
__device__ __forceinline__ HeadRows<T> head_rows(const Params& p, int64_t h, int64_t b, int64_t t) {
  const bool is_q = h < p.q_heads;
  const int64_t hh = is_q ? h : h - p.q_heads;
  const Strides& xs = is_q ? p.q : p.k;
  const Strides& ys = is_q ? p.qo : p.ko;
  return {static_cast<const T*>(is_q ? p.q_ptr : p.k_ptr) + b * xs.b + hh * xs.h + t * xs.t,
          static_cast<T*>(is_q ? p.qo_ptr : p.ko_ptr) + b * ys.b + hh * ys.h + t * ys.t, xs.d, ys.d};
}

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

// The packs path (VEC = 16 / sizeof(T)) and the element-stride path (VEC = 1): a thread takes
// a unit (VEC pairs: pack A of first elements, pack B of second elements; or a pass-through pack)
// straight from global memory into registers.
template <typename T, int VEC, bool kInterleaved>
__global__ void __launch_bounds__(kThreads) rope_kernel(Params p) {
  FASTLM_DYNAMIC_SHARED(float, smem);
  const Token tk = token_angles(p, smem);
  const int64_t b = tk.b, t = tk.t;
  const float* cs = tk.cs;
  __syncthreads();
  if (!tk.live) return;
  const int64_t items = p.heads * p.units;
  for (int64_t item = threadIdx.x; item < items; item += blockDim.x) {
    const int64_t u = item % p.units;
    const HeadRows<T> r = head_rows<T>(p, item / p.units, b, t);
    if (u >= p.rot_units) {  // pass-through pack of dims R..D-1
      const int64_t e = 2 * p.half + (u - p.rot_units) * VEC;
      store_pack<T, VEC>(r.y + e * r.yd, load_pack<T, VEC>(r.x + e * r.xd, r.xd));
      continue;
    }
    // pack A holds the first, pack B the second element of VEC pairs
    const int64_t first = u * VEC;  // first pair of this unit
    const int64_t ea = kInterleaved ? 2 * first : first;
    const int64_t eb = kInterleaved ? 2 * first + VEC : first + p.half;
    const Pack<T, VEC> a = load_pack<T, VEC>(r.x + ea * r.xd, r.xd);
    const Pack<T, VEC> bb = load_pack<T, VEC>(r.x + eb * r.xd, r.xd);
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
    store_pack<T, VEC>(r.y + ea * r.yd, ya);
    store_pack<T, VEC>(r.y + eb * r.yd, yb);
  }
}

// Staged path items per row: pairs of packs (a row holds at most D / VEC packs), its head, its tail.
template <typename T>
__host__ __device__ __forceinline__ int64_t staged_slots(int64_t dim) { return (dim / kVec<T> + 1) / 2 + 2; }

// The staged path (the header has why and its arithmetic): per pass, `chunk` heads of the token
// into shared memory at x's phase, a barrier, then y's rows in packs from the staged pairs.
template <typename T, bool kInterleaved>
__global__ void __launch_bounds__(kThreads) rope_staged_kernel(Params p) {
  constexpr int V = kVec<T>;
  FASTLM_DYNAMIC_SHARED(float, smem);
  const Token tk = token_angles(p, smem);
  const int64_t b = tk.b, t = tk.t;
  const bool live = tk.live;  // no early return: the block meets at every __syncthreads
  const float* cs = tk.cs;
  T* stage = reinterpret_cast<T*>(smem + p.stage_at) + int64_t(threadIdx.y) * p.chunk * p.row_elems;
  const int64_t slots = staged_slots<T>(p.dim);
  for (int64_t h0 = 0; h0 < p.heads; h0 += p.chunk) {
    const int64_t items = (p.heads - h0 < p.chunk ? p.heads - h0 : p.chunk) * slots;
    __syncthreads();  // the angles are in; the previous pass is done reading the stage
    for (int64_t item = threadIdx.x; live && item < items; item += blockDim.x) {
      const int64_t u = item % slots;
      const HeadRows<T> r = head_rows<T>(p, h0 + item / slots, b, t);
      const RowSplit xs = split_row(r.x, p.dim);
      T* row = stage + (item / slots) * p.row_elems + (V - xs.head) % V;  // x[e] at row[e]
      const int64_t pairs = (xs.packs + 1) / 2;
      if (u < pairs) {  // packs 2u and 2u + 1 (2u again when it is the last): both loads in flight
        const int64_t e0 = xs.head + 2 * u * V, e1 = xs.head + (2 * u + 1 < xs.packs ? 2 * u + 1 : 2 * u) * V;
        const Pack<T, V> a = *reinterpret_cast<const Pack<T, V>*>(r.x + e0);
        const Pack<T, V> c = *reinterpret_cast<const Pack<T, V>*>(r.x + e1);
        *reinterpret_cast<Pack<T, V>*>(row + e0) = a;
        *reinterpret_cast<Pack<T, V>*>(row + e1) = c;
      } else {
        const int64_t e0 = u == pairs ? 0 : xs.head + xs.packs * V;
        const int64_t n = u == pairs ? xs.head : u == pairs + 1 ? xs.tail : 0;
#pragma unroll 1  // < VEC elements, by 2 threads of a row: no unrolled copies
        for (int64_t e = e0; e < e0 + n; ++e) row[e] = r.x[e];
      }
    }
    __syncthreads();
    for (int64_t item = threadIdx.x; live && item < items; item += blockDim.x) {
      const int64_t u = item % slots;
      const HeadRows<T> r = head_rows<T>(p, h0 + item / slots, b, t);
      const T* row = stage + (item / slots) * p.row_elems + (V - split_row(r.x, p.dim).head) % V;
      const auto rotated = [&](int64_t e) -> T {
        if (e >= 2 * p.half) return row[e];
        const bool second = kInterleaved ? (e & 1) != 0 : e >= p.half;
        const int64_t i = kInterleaved ? e / 2 : (second ? e - p.half : e);
        const int64_t partner = kInterleaved ? (e ^ 1) : (second ? e - p.half : e + p.half);
        const float xe = to_float(row[e]), xp = to_float(row[partner]), c = cs[i], s = cs[p.half + i];
        return from_float<T>(second ? xe * c + xp * s : xe * c - xp * s);
      };
      const RowSplit ys = split_row(r.y, p.dim);
      const int64_t pairs = (ys.packs + 1) / 2;
      if (u < pairs) {
        for (int64_t pk = 2 * u; pk < 2 * u + 2 && pk < ys.packs; ++pk) {
          const int64_t e = ys.head + pk * V;
          Pack<T, V> out;
#pragma unroll
          for (int j = 0; j < V; ++j) out.v[j] = rotated(e + j);
          *reinterpret_cast<Pack<T, V>*>(r.y + e) = out;
        }
      } else {
        const int64_t e0 = u == pairs ? 0 : ys.head + ys.packs * V;
        const int64_t n = u == pairs ? ys.head : u == pairs + 1 ? ys.tail : 0;
#pragma unroll 1
        for (int64_t e = e0; e < e0 + n; ++e) r.y[e] = rotated(e);
      }
    }
  }
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

// The packs path needs unit last-dim strides, every other stride, R/2 and D - R a multiple of
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

bool unit_last_dim(const RopeProblem& p) {
  return p.q_s[3] == 1 && p.k_s[3] == 1 && p.q_out_s[3] == 1 && p.k_out_s[3] == 1;
}

Params params_of(const RopeProblem& p) {
  Params k{};
  k.tokens = p.batch * p.seq;
  k.seq = p.seq;
  k.q_heads = p.q_heads;
  k.heads = p.q_heads + p.k_heads;
  k.half = p.half_rotary;
  k.dim = p.head_dim;
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
  return k;
}

constexpr int64_t kSmemBudget = 48 * 1024;  // dynamic shared memory per block without the opt-in
int threads_for(int64_t items) {
  return int(std::min<int64_t>(kThreads, std::max<int64_t>(32, (items + 31) / 32 * 32)));
}
int64_t round16(int64_t bytes) { return (bytes + 15) / 16 * 16; }

template <typename T>
int launch_typed(const RopeProblem& p, cudaStream_t stream) {
  constexpr int V = kVec<T>;
  Params k = params_of(p);
  const int64_t table_bytes = 2 * p.half_rotary * int64_t(sizeof(float));  // per token
  enum { kPacks, kStaged, kScalar } path = can_vectorize<T>(p) ? kPacks : unit_last_dim(p) ? kStaged : kScalar;
  int tx = 0, ty = 1;
  size_t smem = 0;
  if (path == kStaged) {  // all heads of ty tokens per pass, else fewer heads of one token
    k.row_elems = (p.head_dim + V - 1) / V * V + V;  // room for the row placed at its phase
    const int64_t row_bytes = k.row_elems * int64_t(sizeof(T));
    const auto bytes = [&](int64_t tokens, int64_t chunk) {
      return round16(tokens * table_bytes) + tokens * chunk * row_bytes;
    };
    k.chunk = k.heads;
    tx = threads_for(k.chunk * staged_slots<T>(p.head_dim));
    ty = kThreads / tx;
    while (ty > 1 && bytes(ty, k.chunk) > kSmemBudget) ty /= 2;
    if (bytes(1, k.chunk) > kSmemBudget) {
      k.chunk = (kSmemBudget - round16(table_bytes)) / row_bytes;
      tx = threads_for(k.chunk * staged_slots<T>(p.head_dim));
    }
    k.stage_at = round16(ty * table_bytes) / int64_t(sizeof(float));
    smem = size_t(bytes(ty, k.chunk));
    if (k.chunk < 1) path = kScalar;  // a row too long to stage
  }
  if (path != kStaged) {
    const int vec = path == kPacks ? V : 1;
    k.rot_units = p.half_rotary / vec;
    k.units = k.rot_units + (p.head_dim - 2 * p.half_rotary) / vec;
    tx = threads_for(k.heads * k.units);
    ty = kThreads / tx;
    while (ty > 1 && ty * table_bytes > kSmemBudget) ty /= 2;
    smem = size_t(ty * table_bytes);
  }
  const int64_t blocks = (k.tokens + ty - 1) / ty;
  if (blocks > INT32_MAX) return int(cudaErrorInvalidConfiguration);
  const dim3 grid{unsigned(blocks)}, block{unsigned(tx), unsigned(ty)};
  const bool il = p.interleaved;
  switch (path) {
    case kPacks:
      launch_kernel(il ? rope_kernel<T, V, true> : rope_kernel<T, V, false>, grid, block, smem, stream, k);
      break;
    case kStaged:
      launch_kernel(il ? rope_staged_kernel<T, true> : rope_staged_kernel<T, false>, grid, block, smem, stream, k);
      break;
    case kScalar:
      launch_kernel(il ? rope_kernel<T, 1, true> : rope_kernel<T, 1, false>, grid, block, smem, stream, k);
      break;
  }
  return int(cudaGetLastError());
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
