// attention: op schemas and CPU implementations (the CUDA forward is in attention_cuda.cpp). The Python op (fastlm/ops/attention.py) has
// already validated the call torch's way; these checks guard direct torch.ops.fastlm calls.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <limits>
#include <vector>

#include "attention_args.h"

namespace fastlm::bind {
namespace {

std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                     const std::optional<at::Tensor>& mask, int64_t causal,
                                                     double scale, double softcap, int64_t window_left,
                                                     int64_t window_right,
                                                     const std::optional<at::Tensor>& alibi_slopes,
                                                     const std::optional<at::Tensor>& sinks, double dropout_p,
                                                     int64_t seed) {
  TORCH_CHECK_VALUE(q.device().is_cpu(), "attention: q must be a CPU tensor here, got ", q.device().str());
  AttentionShape sh = check_args("attention", q, k, v, mask, causal, scale, softcap, /*allow_half=*/false,
                                 window_left, window_right, alibi_slopes, sinks);
  dropout_args("attention", sh, dropout_p, seed);
  at::Tensor out = at::empty({sh.batch, sh.heads, sh.tq, sh.value_dim}, q.options());
  at::Tensor lse = at::empty({sh.batch, sh.heads, sh.tq}, q.options().dtype(at::kFloat));
  if (out.numel() == 0 && lse.numel() == 0) return {out, lse};
  if (nothing_to_attend(sh, out, lse, sinks)) return {out, lse};
  attention_forward_cpu(sh, strided(q), strided(k), strided(v), mask ? strided(*mask) : kNoMask, out.data_ptr(),
                        lse.data_ptr<float>());
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& mask, const at::Tensor& out, const at::Tensor& lse, int64_t causal,
    double scale, double softcap, int64_t window_left, int64_t window_right,
    const std::optional<at::Tensor>& alibi_slopes, double dropout_p, int64_t seed) {
  constexpr const char* op = "attention_backward";
  TORCH_CHECK_VALUE(q.device().is_cpu(), op, ": q must be a CPU tensor here, got ", q.device().str());
  AttentionShape sh = check_args(op, q, k, v, mask, causal, scale, softcap, /*allow_half=*/false,
                                 window_left, window_right, alibi_slopes);
  dropout_args(op, sh, dropout_p, seed);
  check_backward_args(op, sh, grad_out, q, out, lse);
  at::Tensor gq = at::empty(q.sizes(), q.options()), gk = at::empty(k.sizes(), k.options());
  at::Tensor gv = at::empty(v.sizes(), v.options());
  if (sh.tq == 0 || sh.tk == 0 || sh.value_dim == 0 || sh.head_dim == 0 || sh.batch == 0 || sh.heads == 0) {
    return {gq.zero_(), gk.zero_(), gv.zero_()};
  }
  const at::Tensor lse_c = lse.contiguous();
  attention_backward_cpu(sh, strided(grad_out), strided(q), strided(k), strided(v), mask ? strided(*mask) : kNoMask,
                         strided(out), lse_c.data_ptr<float>(), gq.data_ptr(), gk.data_ptr(), gv.data_ptr());
  return {gq, gk, gv};
}

// Variable-length packed sequences (FlashAttention's flash_attn_varlen_func): each sequence of
// cu_seqlens_q / cu_seqlens_k is its own attention problem; out (total_q, H, Dv), lse (H, total_q).
std::tuple<at::Tensor, at::Tensor> attention_varlen_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, int64_t causal, double scale,
    double softcap, int64_t window_left, int64_t window_right, const std::optional<at::Tensor>& alibi_slopes,
    const std::optional<at::Tensor>& sinks) {
  constexpr const char* op = "attention_varlen";
  TORCH_CHECK_VALUE(q.device().is_cpu(), op, ": q must be a CPU tensor here, got ", q.device().str());
  const AttentionShape sh =
      check_varlen_args(op, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, softcap,
                        /*allow_half=*/false, window_left, window_right, alibi_slopes, sinks);
  at::Tensor out = at::empty({q.size(0), sh.heads, sh.value_dim}, q.options());
  at::Tensor lse = at::empty({sh.heads, q.size(0)}, q.options().dtype(at::kFloat));
  if (out.numel() == 0 && lse.numel() == 0) return {out, lse};
  attention_forward_cpu(sh, strided_varlen(q), strided_varlen(k), strided_varlen(v), kNoMask, out.data_ptr(),
                        lse.data_ptr<float>());
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_varlen_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
    const at::Tensor& out, const at::Tensor& lse, int64_t causal, double scale, double softcap, int64_t window_left,
    int64_t window_right, const std::optional<at::Tensor>& alibi_slopes) {
  constexpr const char* op = "attention_varlen_backward";
  TORCH_CHECK_VALUE(q.device().is_cpu(), op, ": q must be a CPU tensor here, got ", q.device().str());
  const AttentionShape sh =
      check_varlen_args(op, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, softcap,
                        /*allow_half=*/false, window_left, window_right, alibi_slopes);
  check_varlen_backward_args(op, sh, grad_out, q, out, lse);
  at::Tensor gq = at::empty(q.sizes(), q.options()), gk = at::empty(k.sizes(), k.options());
  at::Tensor gv = at::empty(v.sizes(), v.options());
  if (q.size(0) == 0 || k.size(0) == 0 || sh.heads == 0) return {gq.zero_(), gk.zero_(), gv.zero_()};
  const at::Tensor lse_c = lse.contiguous();
  attention_backward_cpu(sh, strided_varlen(grad_out), strided_varlen(q), strided_varlen(k), strided_varlen(v),
                         kNoMask, strided_varlen(out), lse_c.data_ptr<float>(), gq.data_ptr(), gk.data_ptr(),
                         gv.data_ptr());
  return {gq, gk, gv};
}

// Decode against a KV cache (FlashAttention's flash_attn_with_kvcache): q (B, Tq, H, D), a paged
// cache with block_table or a contiguous one; out (B, Tq, H, Dv) in q's dtype, lse (B, H, Tq) fp32.
std::tuple<at::Tensor, at::Tensor> attention_decode_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
    const std::optional<at::Tensor>& block_table, const at::Tensor& cache_seqlens, bool causal, double scale,
    double softcap, int64_t window_left, int64_t window_right, const std::optional<at::Tensor>& alibi_slopes,
    const std::optional<at::Tensor>& sinks) {
  constexpr const char* op = "attention_decode";
  TORCH_CHECK_VALUE(q.device().is_cpu(), op, ": q must be a CPU tensor here, got ", q.device().str());
  const DecodeArgs a = check_decode_args(op, q, k_cache, v_cache, block_table, cache_seqlens, causal, scale, softcap,
                                         /*allow_half=*/false, window_left, window_right, alibi_slopes, sinks);
  const AttentionShape& sh = a.shape;
  at::Tensor out = at::empty({sh.batch, sh.tq, sh.heads, sh.value_dim}, q.options());
  at::Tensor lse = at::empty({sh.batch, sh.heads, sh.tq}, q.options().dtype(at::kFloat));
  if (lse.numel() == 0) return {out, lse};
  attention_decode_forward_cpu(sh, a.cache, strided(q), strided(k_cache), strided(v_cache), out.data_ptr(),
                               lse.data_ptr<float>());
  return {out, lse};
}

}  // namespace
}  // namespace fastlm::bind

TORCH_LIBRARY_IMPL(fastlm, CPU, m) {
  m.impl("attention_fwd", &fastlm::bind::attention_fwd_cpu);
  m.impl("attention_bwd", &fastlm::bind::attention_bwd_cpu);
  m.impl("attention_varlen_fwd", &fastlm::bind::attention_varlen_fwd_cpu);
  m.impl("attention_varlen_bwd", &fastlm::bind::attention_varlen_bwd_cpu);
  m.impl("attention_decode_fwd", &fastlm::bind::attention_decode_fwd_cpu);
}
