// The grouped linear's epilogues on the CPU. The per-expert GEMMs are torch's (MKL), called by
// the binding on row slices; the forward epilogue runs over each expert's output block right
// after its GEMM, while it is still (partly) in cache: bias add, the saved pre-activation, and
// the activation, gated (swiglu/geglu: act(gate) * up over the two halves of the row) or
// elementwise, in one pass. The backward's pass produces grad_p for all experts at once from
// grad_out and pre (no activation recomputed twice, no intermediate), with the bias gradient
// as fp32 column sums per (expert, row block), combined in a fixed order afterwards.
#include <omp.h>

#include <algorithm>
#include <vector>

#include "activations.h"
#include "fastlm/moe.h"

namespace fastlm::cpu {
namespace {

constexpr int64_t kChunk = 2048;               // output columns per tile
constexpr int64_t kRowBlock = 32;              // backward rows per tile
constexpr int64_t kParallelMinElems = 1 << 15;

template <typename T, GroupedAct M, Activation A>
void epilogue(const GroupedEpilogueArgs& a) {
  const int64_t width = M == GroupedAct::kGated ? a.cols / 2 : a.cols;  // outputs per row
  const int64_t half = a.cols / 2;
  const int64_t chunks = (width + kChunk - 1) / kChunk;
  const T* bias = static_cast<const T*>(a.bias);
#pragma omp parallel for schedule(static) if (a.rows * a.cols >= kParallelMinElems)
  for (int64_t tile = 0; tile < a.rows * chunks; ++tile) {
    const int64_t r = tile / chunks, c0 = (tile % chunks) * kChunk, n = std::min(kChunk, width - c0);
    if (n <= 0) continue;  // never: tells the compiler the partial stores have a positive length
    const T* z = static_cast<const T*>(a.z) + r * a.z_stride;
    T* pre = a.pre ? static_cast<T*>(a.pre) + r * a.pre_stride : nullptr;
    T* out = static_cast<T*>(a.out) + r * a.out_stride;
    for_each_vector(n, [&](int64_t i0, int64_t m) {
      const int64_t i = c0 + i0;
      vf v = load_n(z + i, m);
      if (bias) v = v + load_n(bias + i, m);
      if constexpr (M == GroupedAct::kNone) {
        store_n(out + i, v, m);
      } else {
        if (pre) {  // keep p + bias for the backward, and go on from its rounded value
          store_n(pre + i, v, m);
          v = load_n(pre + i, m);
        }
        if constexpr (M == GroupedAct::kElementwise) {
          store_n(out + i, act_forward<A>(v), m);
        } else {
          vf u = load_n(z + half + i, m);
          if (bias) u = u + load_n(bias + half + i, m);
          if (pre) {
            store_n(pre + half + i, u, m);
            u = load_n(pre + half + i, m);
          }
          store_n(out + i, act_forward<A>(v) * u, m);
        }
      }
    });
  }
}

template <typename T, GroupedAct M>
void epilogue_act(const GroupedEpilogueArgs& a) {
  switch (a.act) {
    case Activation::kGelu: return epilogue<T, M, Activation::kGelu>(a);
    case Activation::kGeluTanh: return epilogue<T, M, Activation::kGeluTanh>(a);
    case Activation::kRelu: return epilogue<T, M, Activation::kRelu>(a);
    case Activation::kSilu: return epilogue<T, M, Activation::kSilu>(a);
  }
}

template <typename T>
void epilogue_dispatch(const GroupedEpilogueArgs& a) {
  switch (a.mode) {
    case GroupedAct::kNone: return epilogue<T, GroupedAct::kNone, Activation::kRelu>(a);
    case GroupedAct::kElementwise: return epilogue_act<T, GroupedAct::kElementwise>(a);
    case GroupedAct::kGated: return epilogue_act<T, GroupedAct::kGated>(a);
  }
}

// One (expert, row block, column chunk) tile of the backward; `acc` (chunk width floats, or
// null) receives the block's column sums of grad_p.
template <typename T, GroupedAct M, Activation A>
void grad_tile(const GroupedGradArgs& a, int64_t r0, int64_t r1, int64_t c0, int64_t n, float* acc) {
  const int64_t half = a.cols / 2;
  const T* go = static_cast<const T*>(a.grad_out);
  const T* pre = static_cast<const T*>(a.pre);
  T* gp = static_cast<T*>(a.grad_p);
  for (int64_t r = r0; r < r1; ++r) {
    const T* g = go + r * a.grad_out_stride + c0;
    for_each_vector(n, [&](int64_t i, int64_t m) {
      const vf gv = load_n(g + i, m);
      if constexpr (M == GroupedAct::kNone) {
        if (acc) store(acc + i, load(acc + i) + gv);
      } else if constexpr (M == GroupedAct::kElementwise) {
        const vf d = gv * act_derivative<A>(load_n(pre + r * a.pre_stride + c0 + i, m));
        store_n(gp + r * a.grad_p_stride + c0 + i, d, m);
        if (acc) store(acc + i, load(acc + i) + d);
      } else {
        const T* p = pre + r * a.pre_stride + c0 + i;
        const vf gate = load_n(p, m), up = load_n(p + half, m);
        const vf dgate = gv * up * act_derivative<A>(gate), dup = gv * act_forward<A>(gate);
        T* q = gp + r * a.grad_p_stride + c0 + i;
        store_n(q, dgate, m);
        store_n(q + half, dup, m);
        if (acc) {
          store(acc + i, load(acc + i) + dgate);
          store(acc + kChunk + i, load(acc + kChunk + i) + dup);
        }
      }
    });
  }
}

template <typename T, GroupedAct M, Activation A>
void grad(const GroupedGradArgs& a) {
  const int64_t E = a.experts;
  const bool gated = M == GroupedAct::kGated;
  const int64_t width = gated ? a.cols / 2 : a.cols;  // grad_out columns
  const int64_t chunks = (width + kChunk - 1) / kChunk;
  // Row blocks that never straddle two experts.
  struct Block { int64_t expert, r0, r1; };
  std::vector<Block> blocks;
  std::vector<int64_t> first_block(size_t(E) + 1);
  for (int64_t e = 0; e < E; ++e) {
    first_block[e] = int64_t(blocks.size());
    for (int64_t r = a.offsets[e]; r < a.offsets[e + 1]; r += kRowBlock)
      blocks.push_back({e, r, std::min<int64_t>(r + kRowBlock, a.offsets[e + 1])});
  }
  first_block[E] = int64_t(blocks.size());
  const int64_t nb = int64_t(blocks.size());
  const bool bias = a.grad_bias != nullptr;
  // Partial column sums: per block, per chunk, kChunk (gate) [+ kChunk (up)] floats.
  const int64_t part = gated ? 2 * kChunk : kChunk;
  std::vector<float> partial(bias ? size_t(nb * chunks * part) : 0);
  const int64_t total_rows = a.offsets[E];
#pragma omp parallel for schedule(dynamic, 4) if (total_rows * a.cols >= kParallelMinElems)
  for (int64_t tile = 0; tile < nb * chunks; ++tile) {
    const Block& b = blocks[tile / chunks];
    const int64_t c0 = (tile % chunks) * kChunk, n = std::min(kChunk, width - c0);
    float* acc = bias ? partial.data() + tile * part : nullptr;
    if (acc) std::fill(acc, acc + part, 0.0f);
    grad_tile<T, M, A>(a, b.r0, b.r1, c0, n, acc);
  }
  if (!bias) return;
  // grad_bias[e, c] = sum over e's blocks, in block order.
  T* gb = static_cast<T*>(a.grad_bias);
#pragma omp parallel for schedule(static) if (E * a.cols * 8 >= kParallelMinElems)
  for (int64_t e = 0; e < E; ++e) {
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t c0 = c * kChunk, n = std::min(kChunk, width - c0);
      for (int64_t h = 0; h < (gated ? 2 : 1); ++h) {
        T* dst = gb + e * a.cols + h * (a.cols / 2) + c0;
        for_each_vector(n, [&](int64_t i, int64_t m) {
          vf s = splat(0.0f);
          for (int64_t blk = first_block[e]; blk < first_block[e + 1]; ++blk)
            s = s + load_n(partial.data() + (blk * chunks + c) * part + h * kChunk + i, m);
          store_n(dst + i, s, m);
        });
      }
    }
  }
}

template <typename T, GroupedAct M>
void grad_act(const GroupedGradArgs& a) {
  switch (a.act) {
    case Activation::kGelu: return grad<T, M, Activation::kGelu>(a);
    case Activation::kGeluTanh: return grad<T, M, Activation::kGeluTanh>(a);
    case Activation::kRelu: return grad<T, M, Activation::kRelu>(a);
    case Activation::kSilu: return grad<T, M, Activation::kSilu>(a);
  }
}

template <typename T>
void grad_dispatch(const GroupedGradArgs& a) {
  switch (a.mode) {
    case GroupedAct::kNone: return grad<T, GroupedAct::kNone, Activation::kRelu>(a);
    case GroupedAct::kElementwise: return grad_act<T, GroupedAct::kElementwise>(a);
    case GroupedAct::kGated: return grad_act<T, GroupedAct::kGated>(a);
  }
}

}  // namespace
}  // namespace fastlm::cpu

namespace fastlm {

void grouped_linear_epilogue_cpu(const GroupedEpilogueArgs& a) {
  if (a.rows == 0 || a.cols == 0) return;
  if (a.dtype == DType::kFloat32) cpu::epilogue_dispatch<float>(a);
  else cpu::epilogue_dispatch<uint16_t>(a);  // bf16 bits
}

void grouped_linear_grad_cpu(const GroupedGradArgs& a) {
  if (a.dtype == DType::kFloat32) cpu::grad_dispatch<float>(a);
  else cpu::grad_dispatch<uint16_t>(a);
}

}  // namespace fastlm
