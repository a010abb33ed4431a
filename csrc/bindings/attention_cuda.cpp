// attention: the CUDA implementations of attention_fwd / attention_bwd, attention_varlen_fwd /
// attention_varlen_bwd and attention_decode_fwd (schemas.h; tensor cores, fp16/bf16; head dims up
// to 256 forward and backward: check_args' limit). Varlen's cu_seqlens and decode's cache_seqlens and
// block_table stay on the device: the kernels read them there, so these checks look at their
// dtype, shape and device only (values too under the emulator, where they are host memory).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "attention_args.h"
#include "gpu_binding.h"

namespace fastlm::bind {
namespace {

void cuda_args(const char* op, const at::Tensor& q) {
  TORCH_CHECK_VALUE(q.device().type() == kGpu, op, ": q must be a ", kGpuName, " tensor here, got ", q.device().str());
  TORCH_CHECK_TYPE(q.scalar_type() != at::kFloat, op, ": q must be float16 or bfloat16 on ", q.device().str(),
                   " (the cuda attention kernels run on tensor cores), got ", q.scalar_type());
}

// The kernels load rows as 16-byte cp.async chunks, so the last dim must be contiguous and the
// base and every other stride (of a dim longer than 1) a multiple of 16 bytes: for a paged KV
// cache (num_pages, page_size, H_kv, D) that makes every page's rows aligned too. Any other
// layout is copied once into rows padded to 8 elements, as FlashAttention asks of its callers.
at::Tensor rows_16b_aligned(const at::Tensor& t) {
  const int64_t last = t.dim() - 1;
  bool ok = (t.size(last) <= 1 || t.stride(last) == 1) && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  for (int64_t d = 0; ok && d < last; ++d) ok = t.size(d) <= 1 || t.stride(d) % 8 == 0;
  if (ok) return t;
  std::vector<int64_t> sizes = t.sizes().vec();
  sizes[last] = (sizes[last] + 7) / 8 * 8;
  at::Tensor rows = at::empty(sizes, t.options()).narrow(last, 0, t.size(last));
  rows.copy_(t);
  return rows;
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                      const std::optional<at::Tensor>& mask, int64_t causal,
                                                      double scale, double softcap, int64_t window_left,
                                                      int64_t window_right,
                                                      const std::optional<at::Tensor>& alibi_slopes,
                                                      const std::optional<at::Tensor>& sinks,
                                                      double dropout_p, int64_t seed) {
  constexpr const char* op = "attention";
  cuda_args(op, q);
  AttentionShape sh = check_args(op, q, k, v, mask, causal, scale, softcap, /*allow_half=*/true,
                                 window_left, window_right, alibi_slopes, sinks);
  dropout_args(op, sh, dropout_p, seed, /*supported=*/false, "cuda");
  const GpuGuard guard(q.device());
  at::Tensor out = at::empty({sh.batch, sh.heads, sh.tq, sh.value_dim}, q.options());
  at::Tensor lse = at::empty({sh.batch, sh.heads, sh.tq}, q.options().dtype(at::kFloat));
  if (out.numel() == 0 && lse.numel() == 0) return {out, lse};
  if (nothing_to_attend(sh, out, lse, sinks)) return {out, lse};
  const int64_t scratch = attention_forward_cuda_workspace(sh);
  at::Tensor workspace = at::empty({scratch}, q.options().dtype(at::kFloat));
  const at::Tensor qa = rows_16b_aligned(q), ka = rows_16b_aligned(k), va = rows_16b_aligned(v);
  check_launch(op, attention_forward_cuda(sh, strided(qa), strided(ka), strided(va), mask ? strided(*mask) : kNoMask,
                                          out.data_ptr(), lse.data_ptr<float>(),
                                          scratch > 0 ? workspace.data_ptr<float>() : nullptr,
                                          gpu_stream()));
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& mask, const at::Tensor& out, const at::Tensor& lse, int64_t causal,
    double scale, double softcap, int64_t window_left, int64_t window_right,
    const std::optional<at::Tensor>& alibi_slopes, double dropout_p, int64_t seed) {
  constexpr const char* op = "attention_backward";
  cuda_args(op, q);
  AttentionShape sh = check_args(op, q, k, v, mask, causal, scale, softcap, /*allow_half=*/true,
                                 window_left, window_right, alibi_slopes);
  dropout_args(op, sh, dropout_p, seed, /*supported=*/false, "cuda");
  check_backward_args(op, sh, grad_out, q, out, lse);
  const GpuGuard guard(q.device());
  at::Tensor gq = at::empty(q.sizes(), q.options()), gk = at::empty(k.sizes(), k.options());
  at::Tensor gv = at::empty(v.sizes(), v.options());
  if (sh.tq == 0 || sh.tk == 0 || sh.value_dim == 0 || sh.head_dim == 0 || sh.batch == 0 || sh.heads == 0) {
    return {gq.zero_(), gk.zero_(), gv.zero_()};
  }
  const at::Tensor go = rows_16b_aligned(grad_out), o = out.contiguous(), ls = lse.contiguous();
  const at::Tensor qa = rows_16b_aligned(q), ka = rows_16b_aligned(k), va = rows_16b_aligned(v);
  at::Tensor workspace = at::empty({attention_backward_cuda_workspace(sh).floats}, q.options().dtype(at::kFloat));
  check_launch(op, attention_backward_cuda(sh, strided(go), strided(qa), strided(ka), strided(va),
                                           mask ? strided(*mask) : kNoMask, o.data_ptr(), ls.data_ptr<float>(),
                                           workspace.data_ptr<float>(), gq.data_ptr(), gk.data_ptr(), gv.data_ptr(),
                                           gpu_stream()));
  return {gq, gk, gv};
}

// Variable-length packed sequences, one launch for the whole batch (attention.cu).
std::tuple<at::Tensor, at::Tensor> attention_varlen_fwd_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, int64_t causal, double scale,
    double softcap, int64_t window_left, int64_t window_right, const std::optional<at::Tensor>& alibi_slopes,
    const std::optional<at::Tensor>& sinks) {
  constexpr const char* op = "attention_varlen";
  cuda_args(op, q);
  const AttentionShape sh =
      check_varlen_args(op, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, softcap,
                        /*allow_half=*/true, window_left, window_right, alibi_slopes, sinks);
  const GpuGuard guard(q.device());
  at::Tensor out = at::empty({q.size(0), sh.heads, sh.value_dim}, q.options());
  at::Tensor lse = at::empty({sh.heads, q.size(0)}, q.options().dtype(at::kFloat));
  if (out.numel() == 0 && lse.numel() == 0) return {out, lse};
  if (k.size(0) == 0 || sh.tk == 0 || sh.value_dim == 0) {
    fill_nothing_attended(out, lse, sinks);
    return {out, lse};
  }
  const at::Tensor qa = rows_16b_aligned(q), ka = rows_16b_aligned(k), va = rows_16b_aligned(v);
  // no split-KV under varlen: the workspace is empty
  check_launch(op, attention_forward_cuda(sh, strided_varlen(qa), strided_varlen(ka), strided_varlen(va), kNoMask,
                                          out.data_ptr(), lse.data_ptr<float>(), nullptr, gpu_stream()));
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_varlen_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
    const at::Tensor& out, const at::Tensor& lse, int64_t causal, double scale, double softcap, int64_t window_left,
    int64_t window_right, const std::optional<at::Tensor>& alibi_slopes) {
  constexpr const char* op = "attention_varlen_backward";
  cuda_args(op, q);
  const AttentionShape sh =
      check_varlen_args(op, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, softcap,
                        /*allow_half=*/true, window_left, window_right, alibi_slopes);
  check_varlen_backward_args(op, sh, grad_out, q, out, lse);
  const GpuGuard guard(q.device());
  at::Tensor gq = at::empty(q.sizes(), q.options()), gk = at::empty(k.sizes(), k.options());
  at::Tensor gv = at::empty(v.sizes(), v.options());
  if (q.size(0) == 0 || k.size(0) == 0 || sh.tq == 0 || sh.tk == 0 || sh.heads == 0 || sh.head_dim == 0 ||
      sh.value_dim == 0) {
    return {gq.zero_(), gk.zero_(), gv.zero_()};
  }
  const at::Tensor go = rows_16b_aligned(grad_out), o = out.contiguous(), ls = lse.contiguous();
  const at::Tensor qa = rows_16b_aligned(q), ka = rows_16b_aligned(k), va = rows_16b_aligned(v);
  // sized by (num_seqs, H, max_seqlen_q/k), never by the lengths (which stay on the device)
  at::Tensor workspace = at::empty({attention_backward_cuda_workspace(sh).floats}, q.options().dtype(at::kFloat));
  check_launch(op, attention_backward_cuda(sh, strided_varlen(go), strided_varlen(qa), strided_varlen(ka),
                                           strided_varlen(va), kNoMask, o.data_ptr(), ls.data_ptr<float>(),
                                           workspace.data_ptr<float>(), gq.data_ptr(), gk.data_ptr(), gv.data_ptr(),
                                           gpu_stream()));
  return {gq, gk, gv};
}

// Decode against a paged or contiguous KV cache (attention.cu's decode_kernel).
std::tuple<at::Tensor, at::Tensor> attention_decode_fwd_cuda(
    const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
    const std::optional<at::Tensor>& block_table, const at::Tensor& cache_seqlens, bool causal, double scale,
    double softcap, int64_t window_left, int64_t window_right, const std::optional<at::Tensor>& alibi_slopes,
    const std::optional<at::Tensor>& sinks) {
  constexpr const char* op = "attention_decode";
  cuda_args(op, q);
  const DecodeArgs a = check_decode_args(op, q, k_cache, v_cache, block_table, cache_seqlens, causal, scale, softcap,
                                         /*allow_half=*/true, window_left, window_right, alibi_slopes, sinks);
  const AttentionShape& sh = a.shape;
  const GpuGuard guard(q.device());
  at::Tensor out = at::empty({sh.batch, sh.tq, sh.heads, sh.value_dim}, q.options());
  at::Tensor lse = at::empty({sh.batch, sh.heads, sh.tq}, q.options().dtype(at::kFloat));
  if (lse.numel() == 0) return {out, lse};
  if (sh.tk == 0 || sh.value_dim == 0 || k_cache.size(0) == 0) {  // no cache rows: every sequence is empty
    fill_nothing_attended(out, lse, sinks);
    return {out, lse};
  }
  const at::Tensor qa = rows_16b_aligned(q), kc = rows_16b_aligned(k_cache), vc = rows_16b_aligned(v_cache);
  const int64_t scratch = attention_decode_forward_cuda_workspace(sh);
  at::Tensor workspace = at::empty({scratch}, q.options().dtype(at::kFloat));
  check_launch(op, attention_decode_forward_cuda(sh, a.cache, strided(qa), strided(kc), strided(vc), out.data_ptr(),
                                                 lse.data_ptr<float>(),
                                                 scratch > 0 ? workspace.data_ptr<float>() : nullptr, gpu_stream()));
  return {out, lse};
}

// Which kernel attention_fwd would launch for these arguments on a GPU of compute capability
// major.minor: "sm90" (attention_sm90.cu) or "sm80: " and why the Hopper tier declines. The same
// argument checks and row alignment as the forward; nothing is launched (tests call it on any
// device's tensors).
std::string attention_cuda_tier(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const std::optional<at::Tensor>& mask, int64_t causal, double scale, double softcap,
                                int64_t window_left, int64_t window_right,
                                const std::optional<at::Tensor>& alibi_slopes, const std::optional<at::Tensor>& sinks,
                                int64_t major, int64_t minor) {
  constexpr const char* op = "attention_cuda_tier";
  const AttentionShape sh = check_args(op, q, k, v, mask, causal, scale, softcap, /*allow_half=*/true, window_left,
                                       window_right, alibi_slopes, sinks);
  const at::Tensor qa = rows_16b_aligned(q), ka = rows_16b_aligned(k), va = rows_16b_aligned(v);
  const char* why = attention_sm90_why_not(sh, int(major), int(minor), strided(qa), strided(ka), strided(va),
                                           mask ? strided(*mask) : kNoMask);
  return why == nullptr ? std::string("sm90") : std::string("sm80: ") + why;
}

int64_t attention_sm90_launch_count() { return attention_sm90_launches(); }

// Shared memory the kernels need per block, [forward, backward] bytes: the Python dispatcher
// routes around a device whose opt-in limit is smaller (fastlm/ops/attention.py).
std::vector<int64_t> attention_cuda_smem(int64_t head_dim, int64_t value_dim) {
  TORCH_CHECK_VALUE(head_dim > 0 && value_dim > 0, "attention_cuda_smem: head dims must be positive, got ", head_dim,
                    " and ", value_dim);
  return {attention_forward_cuda_smem(head_dim, value_dim), attention_backward_cuda_smem(head_dim, value_dim)};
}

// The kernels' index math for a shape (see attention.h), for tests; causal, mask_kind and the
// window as in AttentionShape (mask kind 0 none, 1 bool, 2 additive; window sides -1: unbounded).
std::vector<int64_t> attention_cuda_plan(int64_t batch, int64_t heads, int64_t kv_heads, int64_t tq, int64_t tk,
                                         int64_t head_dim, int64_t causal, int64_t mask_kind, double scale,
                                         bool backward, int64_t window_left, int64_t window_right) {
  TORCH_CHECK_VALUE(batch > 0 && heads > 0 && kv_heads > 0 && heads % kv_heads == 0 && tq > 0 && tk > 0 &&
                        head_dim > 0 && head_dim <= 256,
                    "attention_cuda_plan: bad shape B ", batch, ", H ", heads, ", H_kv ", kv_heads, ", Tq ", tq,
                    ", Tk ", tk, ", D ", head_dim);
  TORCH_CHECK_VALUE(causal >= 0 && causal <= 2 && mask_kind >= 0 && mask_kind <= 2,
                    "attention_cuda_plan: causal must be 0..2 and mask_kind 0..2, got ", causal, " and ", mask_kind);
  TORCH_CHECK_VALUE(window_left >= -1 && window_right >= -1,
                    "attention_cuda_plan: window sides must be >= 0 or -1, got ", window_left, " and ", window_right);
  AttentionShape sh{DType::kFloat16, batch, heads, kv_heads, tq, tk, head_dim, head_dim,
                    static_cast<Causal>(causal), static_cast<MaskKind>(mask_kind), static_cast<float>(scale)};
  sh.window_left = window_left, sh.window_right = window_right;
  return backward ? attention_backward_index_plan(sh) : attention_forward_index_plan(sh);
}

}  // namespace
}  // namespace fastlm::bind

TORCH_LIBRARY_FRAGMENT(FASTLM_GPU_NAMESPACE, m) {
  m.def("attention_cuda_smem(int head_dim, int value_dim) -> int[]", &fastlm::bind::attention_cuda_smem);
  m.def("attention_cuda_plan(int batch, int heads, int kv_heads, int tq, int tk, int head_dim, int causal, "
        "int mask_kind, float scale, bool backward, int window_left=-1, int window_right=-1) -> int[]",
        &fastlm::bind::attention_cuda_plan);
  m.def("attention_cuda_tier(Tensor q, Tensor k, Tensor v, Tensor? mask, int causal, float scale, float softcap=0., "
        "int window_left=-1, int window_right=-1, Tensor? alibi_slopes=None, Tensor? sinks=None, int major=9, "
        "int minor=0) -> str",
        &fastlm::bind::attention_cuda_tier);
  m.def("attention_sm90_launches() -> int", &fastlm::bind::attention_sm90_launch_count);
}

TORCH_LIBRARY_IMPL(FASTLM_GPU_NAMESPACE, FASTLM_GPU_KEY, m) {
  m.impl("attention_fwd", &fastlm::bind::attention_fwd_cuda);
  m.impl("attention_bwd", &fastlm::bind::attention_bwd_cuda);
  m.impl("attention_varlen_fwd", &fastlm::bind::attention_varlen_fwd_cuda);
  m.impl("attention_varlen_bwd", &fastlm::bind::attention_varlen_bwd_cuda);
  m.impl("attention_decode_fwd", &fastlm::bind::attention_decode_fwd_cuda);
}
