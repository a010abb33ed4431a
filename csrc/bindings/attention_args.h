// Argument checks and views shared by the attention bindings (CPU: attention.cpp, CUDA:
// attention_cuda.cpp). Messages name the argument and the value.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <cmath>
#include <limits>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "common.h"
#include "fastlm/attention.h"

namespace fastlm::bind {

inline constexpr Strided4 kNoMask{nullptr, {0, 0, 0, 0}};

inline Strided4 strided(const at::Tensor& t) {
  Strided4 r{t.data_ptr(), {0, 0, 0, 0}};
  for (int d = 0; d < 4; ++d) r.s[d] = t.size(d) == 1 ? 0 : t.stride(d);
  return r;
}

// Window, ALiBi slopes and sinks into sh (its batch and heads already set), shared by the dense
// and the varlen checks.
inline void check_options(const char* op, AttentionShape& sh, const at::Tensor& q, int64_t window_left,
                          int64_t window_right, const std::optional<at::Tensor>& alibi_slopes,
                          const std::optional<at::Tensor>& sinks) {
  TORCH_CHECK_VALUE(window_left >= -1 && window_right >= -1, op,
                    ": window_left and window_right must be >= 0, or -1 for unbounded, got ", window_left, " and ",
                    window_right);
  sh.window_left = window_left;
  sh.window_right = window_right;
  if (alibi_slopes.has_value()) {
    const at::Tensor& a = *alibi_slopes;
    TORCH_CHECK_VALUE(a.device() == q.device(), op, ": alibi_slopes is on ", a.device().str(), " but q is on ",
                      q.device().str());
    TORCH_CHECK_TYPE(a.scalar_type() == at::kFloat, op, ": alibi_slopes must be float32, got ", a.scalar_type());
    const bool per_head = a.dim() == 1 && a.size(0) == sh.heads;
    const bool per_batch = a.dim() == 2 && a.size(0) == sh.batch && a.size(1) == sh.heads;
    TORCH_CHECK_VALUE(per_head || per_batch, op, ": alibi_slopes must be (H,) = (", sh.heads, ",) or (",
                      is_varlen(sh) ? "num_seqs" : "B", ", H) = (", sh.batch, ", ", sh.heads, "), got ", a.sizes());
    TORCH_CHECK_VALUE(a.is_contiguous(), op, ": alibi_slopes must be contiguous");
    sh.alibi_slopes = a.data_ptr<float>();
    sh.alibi_batch_stride = per_batch ? sh.heads : 0;
  }
  if (sinks.has_value()) {
    const at::Tensor& t = *sinks;
    TORCH_CHECK_VALUE(t.device() == q.device(), op, ": sinks is on ", t.device().str(), " but q is on ",
                      q.device().str());
    TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, op, ": sinks must be float32, got ", t.scalar_type());
    TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == sh.heads && t.is_contiguous(), op,
                      ": sinks must be a contiguous (H,) = (", sh.heads, ",) tensor, got ", t.sizes());
    sh.sinks = t.data_ptr<float>();
  }
}

// dropout_p in [0, 1) and the Philox seed into sh; a backend without dropout (supported = false)
// refuses dropout_p > 0, naming itself.
inline void dropout_args(const char* op, AttentionShape& sh, double dropout_p, int64_t seed, bool supported = true,
                         const char* backend = "cpu") {
  TORCH_CHECK_VALUE(dropout_p >= 0.0 && dropout_p < 1.0, op, ": dropout_p must be in [0, 1), got ", dropout_p);
  TORCH_CHECK_VALUE(supported || dropout_p == 0.0, op, ": dropout_p > 0 is not supported by the ", backend,
                    " kernels, got ", dropout_p);
  sh.dropout_p = static_cast<float>(dropout_p);
  sh.dropout_seed = seed;
}

// q, k, v of one call agree: device, dtype, rank, head dims (<= 256), GQA head counts; causal and
// softcap in range. Dense calls are (B, H, T, D); packed (varlen) ones (total, H, D).
inline void check_qkv(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool packed,
                      int64_t causal, double softcap) {
  const int64_t rank = packed ? 3 : 4, t_axis = packed ? 0 : 2, d_axis = rank - 1;
  const char* layout = packed ? "3-D (total, H, D)" : "4-D (B, H, T, D)";
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"k", k}, {"v", v}}) {
    TORCH_CHECK_VALUE(t.device() == q.device(), op, ": ", name, " is on ", t.device().str(), " but q is on ",
                      q.device().str());
    TORCH_CHECK_TYPE(t.scalar_type() == q.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(),
                     " but q has dtype ", q.scalar_type());
    TORCH_CHECK_VALUE(t.dim() == rank, op, ": ", name, " must be ", layout, ", got shape ", t.sizes());
  }
  TORCH_CHECK_VALUE(q.dim() == rank, op, ": q must be ", layout, ", got shape ", q.sizes());
  TORCH_CHECK_VALUE(k.size(d_axis) == q.size(d_axis), op, ": k head dim ", k.size(d_axis), " != q head dim ",
                    q.size(d_axis));
  TORCH_CHECK_VALUE(v.size(1) == k.size(1) && v.size(t_axis) == k.size(t_axis), op, ": v shape ", v.sizes(),
                    " does not match k shape ", k.sizes(), packed ? " in (total_k, H_kv)" : " in (H_kv, Tk)");
  TORCH_CHECK_VALUE(k.size(1) > 0 && q.size(1) % k.size(1) == 0, op, ": q has ", q.size(1),
                    " heads, not a multiple of k's ", k.size(1));
  TORCH_CHECK_VALUE(q.size(d_axis) <= 256 && v.size(d_axis) <= 256, op, ": head dims up to 256 on ",
                    q.device().str(), ", got q ", q.size(d_axis), " and v ", v.size(d_axis));
  TORCH_CHECK_VALUE(causal >= 0 && causal <= 2, op, ": causal must be 0 (none), 1 (top-left) or 2 (bottom-right), got ",
                    causal);
  TORCH_CHECK_VALUE(std::isfinite(softcap) && softcap >= 0.0, op,
                    ": softcap must be a finite float >= 0 (0 = off), got ", softcap);
}

// Checks a direct torch.ops.fastlm.attention_* call (the device check is the caller's).
inline AttentionShape check_args(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const std::optional<at::Tensor>& mask, int64_t causal, double scale, double softcap,
                                 bool allow_half, int64_t window_left = -1, int64_t window_right = -1,
                                 const std::optional<at::Tensor>& alibi_slopes = std::nullopt,
                                 const std::optional<at::Tensor>& sinks = std::nullopt) {
  const DType dtype = dtype_arg(op, "q", q, allow_half);
  check_qkv(op, q, k, v, /*packed=*/false, causal, softcap);
  TORCH_CHECK_VALUE(k.size(0) == q.size(0) && v.size(0) == q.size(0), op, ": batch sizes differ: q ", q.size(0),
                    ", k ", k.size(0), ", v ", v.size(0));
  AttentionShape sh{dtype, q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), q.size(3), v.size(3),
                    static_cast<Causal>(causal), MaskKind::kNone, static_cast<float>(scale),
                    static_cast<float>(softcap)};
  if (mask.has_value()) {
    const at::Tensor& m = *mask;
    TORCH_CHECK_VALUE(m.device() == q.device(), op, ": mask is on ", m.device().str(), " but q is on ",
                      q.device().str());
    TORCH_CHECK_TYPE(m.scalar_type() == at::kBool || m.scalar_type() == q.scalar_type(), op,
                     ": mask must be bool or q's dtype ", q.scalar_type(), ", got ", m.scalar_type());
    const int64_t full[4] = {sh.batch, sh.heads, sh.tq, sh.tk};
    bool ok = m.dim() == 4;
    for (int d = 0; ok && d < 4; ++d) ok = m.size(d) == 1 || m.size(d) == full[d];
    TORCH_CHECK_VALUE(ok, op, ": mask of shape ", m.sizes(), " does not broadcast to ", at::IntArrayRef(full));
    sh.mask_kind = m.scalar_type() == at::kBool ? MaskKind::kBool : MaskKind::kAdditive;
  }
  check_options(op, sh, q, window_left, window_right, alibi_slopes, sinks);
  return sh;
}

// grad_out and out shaped like the output, on q's device with q's dtype; lse fp32 (B, H, Tq).
inline void check_backward_args(const char* op, const AttentionShape& sh, const at::Tensor& grad_out,
                                const at::Tensor& q, const at::Tensor& out, const at::Tensor& lse) {
  const std::vector<int64_t> out_shape{sh.batch, sh.heads, sh.tq, sh.value_dim};
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"grad_out", grad_out}, {"out", out}}) {
    same_place_arg(op, name, t, q);
    TORCH_CHECK_VALUE(t.sizes() == at::IntArrayRef(out_shape), op, ": ", name, " has shape ", t.sizes(),
                      " but the output's is ", at::IntArrayRef(out_shape));
  }
  TORCH_CHECK_VALUE(lse.device() == q.device(), op, ": lse is on ", lse.device().str(), " but q is on ",
                    q.device().str());
  TORCH_CHECK_TYPE(lse.scalar_type() == at::kFloat, op, ": lse must be float32, got ", lse.scalar_type());
  TORCH_CHECK_VALUE(lse.sizes() == at::IntArrayRef({sh.batch, sh.heads, sh.tq}), op, ": lse has shape ",
                    lse.sizes(), " but expected ", at::IntArrayRef({sh.batch, sh.heads, sh.tq}));
}

// Variable-length packed attention (attention_varlen_*): q (total_q, H, D), k (total_k, H_kv, D),
// v (total_k, H_kv, Dv) as the kernels' Strided4 (batch stride 0, T = the packed rows).
inline Strided4 strided_varlen(const at::Tensor& t) {
  return Strided4{t.data_ptr(), {0, t.stride(1), t.stride(0), t.stride(2)}};
}

// cu_seqlens_<x>: int32 (num_seqs + 1,) contiguous on q's device, 0 first, `total` last,
// nondecreasing, every length at most max_seqlen_<x>. The values are checked only where they can
// be read without a device sync (a CPU tensor: the cpu kernels, and the emulated cuda backend,
// whose device memory is host memory); a CUDA kernel reads them on the device, and the Python ops
// layer has checked them before the call.
inline const int32_t* cu_seqlens_arg(const char* op, const char* name, const at::Tensor& cu, const at::Tensor& q,
                                     const char* total_name, int64_t total, const char* max_name,
                                     int64_t max_seqlen) {
  TORCH_CHECK_VALUE(cu.device() == q.device(), op, ": ", name, " is on ", cu.device().str(), " but q is on ",
                    q.device().str());
  TORCH_CHECK_TYPE(cu.scalar_type() == at::kInt, op, ": ", name, " must be int32, got ", cu.scalar_type());
  TORCH_CHECK_VALUE(cu.dim() == 1 && cu.size(0) >= 1, op, ": ", name, " must be 1-D (num_seqs + 1,), got shape ",
                    cu.sizes());
  TORCH_CHECK_VALUE(cu.is_contiguous(), op, ": ", name, " must be contiguous, got strides ", cu.strides());
  TORCH_CHECK_VALUE(max_seqlen >= 0, op, ": ", max_name, " must be >= 0, got ", max_seqlen);
  if (!cu.device().is_cpu()) return cu.data_ptr<int32_t>();
  const int32_t* c = cu.data_ptr<int32_t>();
  const int64_t n = cu.size(0);
  TORCH_CHECK_VALUE(c[0] == 0, op, ": ", name, "[0] must be 0, got ", c[0]);
  for (int64_t b = 0; b + 1 < n; ++b) {
    const int64_t len = int64_t(c[b + 1]) - int64_t(c[b]);
    TORCH_CHECK_VALUE(len >= 0, op, ": ", name, " must be nondecreasing, got ", name, "[", b, "] = ", c[b], " > ",
                      name, "[", b + 1, "] = ", c[b + 1]);
    TORCH_CHECK_VALUE(len <= max_seqlen, op, ": sequence ", b, " has length ", len, " (from ", name, ") > ", max_name,
                      " = ", max_seqlen);
  }
  TORCH_CHECK_VALUE(c[n - 1] == total, op, ": ", name, "[-1] = ", c[n - 1], " must equal ", total_name, " = ", total);
  return c;
}

// Checks a direct torch.ops.fastlm.attention_varlen_* call (the device check of q is the caller's;
// cu_seqlens values only on the CPU: cu_seqlens_arg).
// The shape's batch is num_seqs, tq / tk are max_seqlen_q / max_seqlen_k.
inline AttentionShape check_varlen_args(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                        const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                                        int64_t max_seqlen_q, int64_t max_seqlen_k, int64_t causal, double scale,
                                        double softcap, bool allow_half, int64_t window_left, int64_t window_right,
                                        const std::optional<at::Tensor>& alibi_slopes,
                                        const std::optional<at::Tensor>& sinks = std::nullopt) {
  const DType dtype = dtype_arg(op, "q", q, allow_half);
  check_qkv(op, q, k, v, /*packed=*/true, causal, softcap);
  const int32_t* cu_q = cu_seqlens_arg(op, "cu_seqlens_q", cu_seqlens_q, q, "total_q (q.size(0))", q.size(0),
                                       "max_seqlen_q", max_seqlen_q);
  const int32_t* cu_k = cu_seqlens_arg(op, "cu_seqlens_k", cu_seqlens_k, q, "total_k (k.size(0))", k.size(0),
                                       "max_seqlen_k", max_seqlen_k);
  TORCH_CHECK_VALUE(cu_seqlens_q.size(0) == cu_seqlens_k.size(0), op, ": cu_seqlens_q has ", cu_seqlens_q.size(0),
                    " entries but cu_seqlens_k has ", cu_seqlens_k.size(0), " (both num_seqs + 1)");
  AttentionShape sh{dtype, cu_seqlens_q.size(0) - 1, q.size(1), k.size(1), max_seqlen_q, max_seqlen_k, q.size(2),
                    v.size(2), static_cast<Causal>(causal), MaskKind::kNone, static_cast<float>(scale),
                    static_cast<float>(softcap)};
  sh.cu_seqlens_q = cu_q;
  sh.cu_seqlens_k = cu_k;
  sh.total_q = q.size(0);
  check_options(op, sh, q, window_left, window_right, alibi_slopes, sinks);
  return sh;
}

// Varlen backward: grad_out and out (total_q, H, Dv) on q's device with q's dtype; lse fp32 (H, total_q).
inline void check_varlen_backward_args(const char* op, const AttentionShape& sh, const at::Tensor& grad_out,
                                       const at::Tensor& q, const at::Tensor& out, const at::Tensor& lse) {
  const int64_t total_q = q.size(0);
  const std::vector<int64_t> out_shape{total_q, sh.heads, sh.value_dim};
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"grad_out", grad_out}, {"out", out}}) {
    TORCH_CHECK_VALUE(t.device() == q.device(), op, ": ", name, " is on ", t.device().str(), " but q is on ",
                      q.device().str());
    TORCH_CHECK_TYPE(t.scalar_type() == q.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(),
                     " but q has dtype ", q.scalar_type());
    TORCH_CHECK_VALUE(t.sizes() == at::IntArrayRef(out_shape), op, ": ", name, " has shape ", t.sizes(),
                      " but the output's is (total_q, H, Dv) = ", at::IntArrayRef(out_shape));
  }
  TORCH_CHECK_VALUE(lse.device() == q.device(), op, ": lse is on ", lse.device().str(), " but q is on ",
                    q.device().str());
  TORCH_CHECK_TYPE(lse.scalar_type() == at::kFloat, op, ": lse must be float32, got ", lse.scalar_type());
  TORCH_CHECK_VALUE(lse.sizes() == at::IntArrayRef({sh.heads, total_q}), op, ": lse has shape ", lse.sizes(),
                    " but expected (H, total_q) = ", at::IntArrayRef({sh.heads, total_q}));
}

// Decode against a KV cache (attention_decode_fwd): the checked shape and cache layout, and the
// int32 tensors (on q's device) the layout points into (kept alive here).
struct DecodeArgs {
  AttentionShape shape;
  KvCacheLayout cache;
  at::Tensor block_table, cache_seqlens;
};

// Checks a direct torch.ops.fastlm.attention_decode_fwd call (the device check of q is the
// caller's): q (B, Tq, H, D); paged k_cache (num_pages, page_size, H_kv, D), v_cache (num_pages,
// page_size, H_kv, Dv) with block_table int32 (B, max_pages), or contiguous k_cache (B, max_len,
// H_kv, D) without one; cache_seqlens int32 (B,) in [0, capacity]; and every page a batch row uses
// (the first ceil(cache_seqlens[b] / page_size) entries of its table row) in [0, num_pages).
// The shape's tq is Tq, tk the capacity (max_pages * page_size or max_len).
inline DecodeArgs check_decode_args(const char* op, const at::Tensor& q, const at::Tensor& k_cache,
                                    const at::Tensor& v_cache, const std::optional<at::Tensor>& block_table,
                                    const at::Tensor& cache_seqlens, bool causal, double scale, double softcap,
                                    bool allow_half, int64_t window_left, int64_t window_right,
                                    const std::optional<at::Tensor>& alibi_slopes,
                                    const std::optional<at::Tensor>& sinks) {
  const DType dtype = dtype_arg(op, "q", q, allow_half);
  TORCH_CHECK_VALUE(q.dim() == 4, op, ": q must be 4-D (B, Tq, H, D), got shape ", q.sizes());
  const bool paged = block_table.has_value();
  const char* layout = paged ? "(num_pages, page_size, H_kv, " : "(B, max_len, H_kv, ";
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"k_cache", k_cache}, {"v_cache", v_cache}}) {
    TORCH_CHECK_VALUE(t.device() == q.device(), op, ": ", name, " is on ", t.device().str(), " but q is on ",
                      q.device().str());
    TORCH_CHECK_TYPE(t.scalar_type() == q.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(),
                     " but q has dtype ", q.scalar_type());
    TORCH_CHECK_VALUE(t.dim() == 4, op, ": ", name, " must be 4-D ", layout, name == std::string("k_cache") ? "D" : "Dv",
                      ")", paged ? "" : " (no block_table: a contiguous cache)", ", got shape ", t.sizes());
  }
  const int64_t batch = q.size(0), tq = q.size(1), heads = q.size(2), head_dim = q.size(3);
  TORCH_CHECK_VALUE(k_cache.size(3) == head_dim, op, ": k_cache head dim ", k_cache.size(3), " != q head dim ",
                    head_dim);
  TORCH_CHECK_VALUE(v_cache.size(0) == k_cache.size(0) && v_cache.size(1) == k_cache.size(1) &&
                        v_cache.size(2) == k_cache.size(2),
                    op, ": v_cache shape ", v_cache.sizes(), " does not match k_cache shape ", k_cache.sizes(), " in ",
                    paged ? "(num_pages, page_size, H_kv)" : "(B, max_len, H_kv)");
  const int64_t kv_heads = k_cache.size(2);
  TORCH_CHECK_VALUE(kv_heads > 0 && heads % kv_heads == 0, op, ": q has ", heads, " heads, not a multiple of k_cache's ",
                    kv_heads);
  TORCH_CHECK_VALUE(head_dim <= 256 && v_cache.size(3) <= 256, op, ": head dims up to 256 on ", q.device().str(),
                    ", got q ", head_dim, " and v_cache ", v_cache.size(3));
  TORCH_CHECK_VALUE(std::isfinite(softcap) && softcap >= 0.0, op,
                    ": softcap must be a finite float >= 0 (0 = off), got ", softcap);

  DecodeArgs a;
  KvCacheLayout& c = a.cache;
  int64_t capacity = 0, max_pages = 0;
  if (paged) {
    const at::Tensor& bt = *block_table;
    TORCH_CHECK_VALUE(bt.device() == q.device(), op, ": block_table is on ", bt.device().str(), " but q is on ",
                      q.device().str());
    TORCH_CHECK_TYPE(bt.scalar_type() == at::kInt, op, ": block_table must be int32, got ", bt.scalar_type());
    TORCH_CHECK_VALUE(bt.dim() == 2 && bt.size(0) == batch, op, ": block_table must be (B, max_pages) with B = ",
                      batch, ", got shape ", bt.sizes());
    TORCH_CHECK_VALUE(k_cache.size(1) >= 1, op, ": page_size (k_cache.size(1)) must be >= 1, got k_cache shape ",
                      k_cache.sizes());
    a.block_table = bt.contiguous();
    max_pages = bt.size(1);
    c.block_table = a.block_table.data_ptr<int32_t>();
    c.block_table_stride = max_pages;
    c.page_size = k_cache.size(1);
    capacity = max_pages * c.page_size;
  } else {
    TORCH_CHECK_VALUE(k_cache.size(0) == batch, op, ": without block_table k_cache is contiguous (B, max_len, H_kv, D)",
                      " with B = q.size(0) = ", batch, ", got k_cache shape ", k_cache.sizes());
    c.block_table = nullptr;
    c.block_table_stride = 0;
    c.page_size = std::max<int64_t>(1, k_cache.size(1));
    capacity = k_cache.size(1);
  }
  TORCH_CHECK_VALUE(cache_seqlens.device() == q.device(), op, ": cache_seqlens is on ", cache_seqlens.device().str(),
                    " but q is on ", q.device().str());
  TORCH_CHECK_TYPE(cache_seqlens.scalar_type() == at::kInt, op, ": cache_seqlens must be int32, got ",
                   cache_seqlens.scalar_type());
  TORCH_CHECK_VALUE(cache_seqlens.dim() == 1 && cache_seqlens.size(0) == batch, op,
                    ": cache_seqlens must be (B,) with B = ", batch, ", got shape ", cache_seqlens.sizes());
  a.cache_seqlens = cache_seqlens.contiguous();
  c.cache_seqlens = a.cache_seqlens.data_ptr<int32_t>();
  if (q.device().is_cpu()) {  // values are read on the host: only where they live there
    const int64_t num_pages = k_cache.size(0);
    for (int64_t b = 0; b < batch; ++b) {
      const int64_t len = c.cache_seqlens[b];
      TORCH_CHECK_VALUE(len >= 0 && len <= capacity, op, ": cache_seqlens[", b, "] = ", len,
                        " is out of range [0, ", capacity, "] (capacity = ",
                        paged ? "max_pages * page_size = " : "max_len = ", capacity, ")");
      if (!paged) continue;
      const int64_t used = (len + c.page_size - 1) / c.page_size;
      for (int64_t p = 0; p < used; ++p) {
        const int64_t page = c.block_table[b * max_pages + p];
        TORCH_CHECK_VALUE(page >= 0 && page < num_pages, op, ": block_table[", b, ", ", p, "] = ", page,
                          " is out of range [0, num_pages = ", num_pages, ") (batch ", b, " uses pages 0..", used - 1,
                          " for its cache_seqlens = ", len, " keys)");
      }
    }
  }
  a.shape = AttentionShape{dtype, batch, heads, kv_heads, tq, capacity, head_dim, v_cache.size(3),
                           causal ? Causal::kBottomRight : Causal::kNone, MaskKind::kNone, static_cast<float>(scale),
                           static_cast<float>(softcap)};
  check_options(op, a.shape, q, window_left, window_right, alibi_slopes, sinks);
  return a;
}

// Every row attends to nothing: out 0, lse -inf, or with sinks the sink of the row's head. lse
// is (..., H, rows) (dense, decode) or (H, rows) (varlen): the sinks broadcast along the last dim.
inline void fill_nothing_attended(at::Tensor& out, at::Tensor& lse, const std::optional<at::Tensor>& sinks) {
  out.zero_();
  if (sinks.has_value()) {
    lse.copy_(sinks->view({sinks->size(0), 1}).expand_as(lse));
  } else {
    lse.fill_(-std::numeric_limits<float>::infinity());
  }
}

// Tk == 0 or Dv == 0: every row attends to nothing (filled as above); true when so.
inline bool nothing_to_attend(const AttentionShape& sh, at::Tensor& out, at::Tensor& lse,
                              const std::optional<at::Tensor>& sinks = std::nullopt) {
  if (sh.tk != 0 && sh.value_dim != 0) return false;
  fill_nothing_attended(out, lse, sinks);
  return true;
}

}  // namespace fastlm::bind
