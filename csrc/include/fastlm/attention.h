// Launchers for flash attention on (B, H, T, D) tensors given by raw pointers and element
// strides. Query head h reads key/value head h / (H / H_kv) (GQA). The mask, when present, is
// bool (uint8, nonzero = attend) or additive (the inputs' dtype), indexed by its 4 strides (0
// for broadcast dims). Causal: query i may see key j <= i + offset, offset 0 for top-left
// alignment (torch's is_causal) and Tk - Tq for bottom-right. Rows that see no key give
// output 0, lse -inf and zero gradients; keys that no query of a tile sees never enter the math.
// Scores are scale * q.k; with softcap > 0 each becomes softcap * tanh(score / softcap) before
// the mask and the softmax (FlashAttention's softcap; 0 = off, compiled out of the kernels).
//
// Sliding window, ALiBi and sinks are measured from the diagonal j = i + offset, where offset is
// diagonal_offset(shape): 0 for top-left causal, Tk - Tq otherwise (bottom-right, FlashAttention's
// convention, also when not causal). Key j is visible to query i only if
//   window_left < 0 or j >= i + offset - window_left, and window_right < 0 or j <= i + offset + window_right
// (besides causal and the bool mask); key tiles wholly outside the window are skipped, not masked.
// ALiBi adds -slope(b, h) * |i + offset - j| to each score (after the softcap, with any additive
// mask). A sink adds exp(sink[h]) to each row's softmax denominator: lse = log(exp(sink) +
// sum_j exp(s_ij)), a fully masked row gives output 0 and lse = sink. The backward needs no sinks
// (the forward's lse carries them).
//
// Dropout (dropout_p > 0, CPU kernels only): the softmax statistics (m, l, lse) are those of the
// undropped P; only where P feeds the output is it multiplied by keep / (1 - p), O = (P o Z) V,
// and the backward regenerates the same Z: dV = (P o Z)^T dO, dP = (dO V^T) o Z, dS = P (dP - delta)
// with delta = rowsum(dO o O) (the dropped O). keep(b, h, i, j) is Triton's (cpu/philox.h):
// tl.rand(seed + b * H + h, uint32(i * Tk + j)) >= p, h the query head (GQA included), so the
// cpu and triton backends drop the same entries for the same seed. Varlen: b is the sequence
// index, i and j the positions inside the sequence and Tk the sequence's own key count.
#pragma once
#include <vector>

#include "fastlm/common.h"

namespace fastlm {

enum class MaskKind : int { kNone = 0, kBool = 1, kAdditive = 2 };
enum class Causal : int { kNone = 0, kTopLeft = 1, kBottomRight = 2 };

struct Strided4 {
  const void* data;
  int64_t s[4];  // element strides of (B, H, T, D) (or (B, H, Tq, Tk) for the mask)
};

struct AttentionShape {
  DType dtype;
  int64_t batch, heads, kv_heads, tq, tk, head_dim, value_dim;
  Causal causal;
  MaskKind mask_kind;
  float scale;
  float softcap = 0.0f;  // > 0: scores capped to softcap * tanh(s / softcap); 0: off
  int64_t window_left = -1, window_right = -1;  // sliding window around the diagonal; -1: unbounded
  // ALiBi slope of (b, h) = alibi_slopes[b * alibi_batch_stride + h] (fp32, on the tensors' device;
  // stride 0 for per-head slopes); nullptr: no ALiBi.
  const float* alibi_slopes = nullptr;
  int64_t alibi_batch_stride = 0;
  const float* sinks = nullptr;  // (H,) fp32 sink logits, forward only; nullptr: none
  // Variable-length packed sequences (FlashAttention's varlen), int32 (batch + 1,) prefix sums on
  // the kernels' device (host memory for the CPU kernels, device memory for the CUDA ones, which
  // read them there: no host sync): sequence b has queries [cu_seqlens_q[b], cu_seqlens_q[b+1])
  // and keys [cu_seqlens_k[b], cu_seqlens_k[b+1]) of the packed T dims, and is its own attention
  // problem (its own Tq, Tk and diagonal offset); tq/tk are then upper bounds of those lengths
  // (max_seqlen_q/k). q/k/v are given as Strided4 with batch stride 0 and T = the packed rows; out
  // is (total_q, H, Dv) and lse (H, total_q). nullptr (both): dense, every sequence has Tq = tq and
  // Tk = tk.
  const int32_t* cu_seqlens_q = nullptr;
  const int32_t* cu_seqlens_k = nullptr;
  int64_t total_q = 0;  // varlen: the packed query rows (q.size(0)), lse's row length
  // Attention dropout (CPU kernels; see the header comment): probability in [0, 1) (0: off) and
  // the Philox seed, which Triton's kernels take as the int seed & 0x7FFFFFFF.
  float dropout_p = 0.0f;
  int64_t dropout_seed = 0;
};

inline bool is_varlen(const AttentionShape& sh) { return sh.cu_seqlens_q != nullptr; }

// The diagonal causal masks, windows and ALiBi are measured from: key j = query i + offset, for a
// sequence of tq queries and tk keys.
inline int64_t diagonal_offset(const AttentionShape& sh, int64_t tq, int64_t tk) {
  return sh.causal == Causal::kTopLeft ? 0 : tk - tq;
}
inline int64_t diagonal_offset(const AttentionShape& sh) { return diagonal_offset(sh, sh.tq, sh.tk); }

// out: (B, H, Tq, Dv) contiguous, lse: (B, H, Tq) fp32 contiguous; varlen (shape.cu_seqlens_*):
// out (total_q, H, Dv) and lse (H, total_q) contiguous, grad_q/k/v contiguous (total, H, D).
void attention_forward_cpu(const AttentionShape& shape, Strided4 q, Strided4 k, Strided4 v,
                           Strided4 mask, void* out, float* lse);

// Decode attention against a KV cache (FlashAttention's flash_attn_with_kvcache, vLLM's paged
// attention), forward only. q is (B, Tq, H, D) given as Strided4 strides of (b, t, h, d). The
// caches are Strided4 with strides of (page, slot, kv head, d): paged, k (num_pages, page_size,
// Hkv, D) and key row j of batch b in page block_table[b * block_table_stride + j / page_size],
// slot j % page_size; contiguous (block_table nullptr), k (B, max_len, Hkv, D), i.e. page b of
// page_size = max_len. Batch b has keys [0, cache_seqlens[b]) (host int32) and its queries sit at
// positions cache_seqlens[b] - Tq + i: shape.tk is only the capacity, shape.causal is kNone or
// kBottomRight, and window / ALiBi / softcap / sinks act as in attention_forward_cpu with Tk =
// cache_seqlens[b]. Pointers on the kernels' device (the CPU kernel's: host); the caller has
// checked the pages a batch uses are in range (the CUDA binding cannot without a sync: the ops
// layer does).
// out: (B, Tq, H, Dv) contiguous, lse (B, H, Tq) fp32 contiguous.
struct KvCacheLayout {
  const int32_t* block_table;  // nullptr: contiguous cache
  int64_t block_table_stride;  // elements between batch rows of block_table
  int64_t page_size;           // >= 1 (contiguous: max_len)
  const int32_t* cache_seqlens;
};
void attention_decode_forward_cpu(const AttentionShape& shape, const KvCacheLayout& cache, Strided4 q,
                                  Strided4 k_cache, Strided4 v_cache, void* out, float* lse);

// grad_q/k/v: contiguous, shaped like q/k/v. out and lse are the forward's.
void attention_backward_cpu(const AttentionShape& shape, Strided4 grad_out, Strided4 q, Strided4 k,
                            Strided4 v, Strided4 mask, Strided4 out, const float* lse,
                            void* grad_q, void* grad_k, void* grad_v);

// CUDA launchers on tensor cores (fp16/bf16, sm_80+) return the launch status and never
// synchronize. Forward: head dims up to 256; decode-like calls split the keys across CTAs and
// need attention_forward_cuda_workspace(shape) floats of scratch (0: no split; call both with
// the same current device).
// Varlen (shape.cu_seqlens_*, device int32) runs in the same kernels and one launch: CTAs are
// indexed by (sequence, head, query tile of max_seqlen_q) and those past their sequence's end exit;
// it never splits the keys (workspace 0).
int64_t attention_forward_cuda_workspace(const AttentionShape& shape);
// Dense calls with no user mask, softcap, window, ALiBi, sinks or dropout, head_dim == value_dim
// in 64..128, Tq > 16 and TMA-able strides run on an sm_90 GPU in a FlashAttention-3 style kernel
// (attention_sm90.cu: TMA, mbarriers, warp specialisation, wgmma); the rest in the sm_80 one.
int attention_forward_cuda(const AttentionShape& shape, Strided4 q, Strided4 k, Strided4 v, Strided4 mask,
                           void* out, float* lse, float* workspace, cudaStream_t stream);

// Decode against a KV cache on tensor cores (the forward's kernel with each key tile's rows
// gathered through the block table; cache and q as for attention_decode_forward_cpu, pointers in
// device memory). Paged and contiguous caches give bit-identical results: the key tiles and the
// split of sequence b depend on cache_seqlens[b] alone. Needs
// attention_decode_forward_cuda_workspace(shape) floats of scratch (0: no split).
int64_t attention_decode_forward_cuda_workspace(const AttentionShape& shape);
int attention_decode_forward_cuda(const AttentionShape& shape, const KvCacheLayout& cache, Strided4 q,
                                  Strided4 k_cache, Strided4 v_cache, void* out, float* lse, float* workspace,
                                  cudaStream_t stream);

// The one decision of the forward's tier: why the Hopper kernel cannot serve this call on a device
// of compute capability major.minor (nullptr: it can, and attention_forward_cuda launches it).
// Looks at the shape, options and strides only (never at tensor values); also says so when the
// binary has no sm_90a code. The emulator runs the Hopper kernel on its "9.0" profile.
const char* attention_sm90_why_not(const AttentionShape& shape, int major, int minor, const Strided4& q,
                                   const Strided4& k, const Strided4& v, const Strided4& mask);
// Hopper-tier launches since the library loaded (tests: that the tier really ran).
int64_t attention_sm90_launches();

// The kernels' index math, evaluated on the host for tests (no launch). Forward: [key tile BN,
// then per CTA: batch, kv head, first key, end key, the full (maskless) key tiles' [start, end),
// and for each of its 64 rows the query head and position (-1, -1 past the end)]. Backward:
// [query tile BM, key tile BN, then per key tile of BN: the query tiles that see it [first, end),
// and the maskless ones [lo, hi)].
std::vector<int64_t> attention_forward_index_plan(const AttentionShape& shape);
std::vector<int64_t> attention_backward_index_plan(const AttentionShape& shape);

// Bytes of shared memory per block the forward / backward kernels need for these head dims
// (the dispatcher compares them with the device's sharedMemPerBlockOptin: 99 KB on sm_86/89).
int64_t attention_forward_cuda_smem(int64_t head_dim, int64_t value_dim);
int64_t attention_backward_cuda_smem(int64_t head_dim, int64_t value_dim);

// Backward: head dims up to 256, as the forward. out contiguous (B, H, Tq, Dv) (varlen: (total_q, H, Dv));
// grad_out, q, k, v with the forward's 16-byte row alignment; grad_q/k/v contiguous like q/k/v.
// Varlen: one launch, CTAs per (sequence, KV head, key tile of max_seqlen_k); the workspace is
// laid out for (num_seqs, H, max_seqlen_q) rows, so its size depends on the bounds only. workspace: attention_backward_cuda_workspace(shape).floats of fp32
// scratch (delta, the dQ sums and their turn counters, dK/dV partials); the launcher zeroes
// what must start at 0 on the stream.
struct AttentionBackwardWorkspace {
  int64_t floats;       // scratch size
  int64_t head_splits;  // CTAs sharing one KV head's query heads (> 1: dK/dV partials summed after)
};
AttentionBackwardWorkspace attention_backward_cuda_workspace(const AttentionShape& shape);
int attention_backward_cuda(const AttentionShape& shape, Strided4 grad_out, Strided4 q, Strided4 k, Strided4 v,
                            Strided4 mask, const void* out, const float* lse, float* workspace, void* grad_q,
                            void* grad_k, void* grad_v, cudaStream_t stream);

}  // namespace fastlm
