// Schemas of the ops that have CPU and CUDA kernels, in one place: module.cpp defines them as
// torch.ops.fastlm.*, and the emulator build (csrc/emu/module.cpp) as torch.ops.fastlm_emu.*, so
// the two can never drift apart. Implementations register from csrc/bindings/<op>[_cuda].cpp.
#pragma once

namespace fastlm::bind {

inline constexpr const char* kKernelSchemas[] = {
    "attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? mask, int causal, float scale, float softcap=0.0, "
    "int window_left=-1, int window_right=-1, Tensor? alibi_slopes=None, Tensor? sinks=None, float dropout_p=0.0, "
    "int seed=0) -> (Tensor, Tensor)",
    "attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor? mask, Tensor out, Tensor lse, "
    "int causal, float scale, float softcap=0.0, int window_left=-1, int window_right=-1, "
    "Tensor? alibi_slopes=None, float dropout_p=0.0, int seed=0) -> (Tensor, Tensor, Tensor)",
    "attention_varlen_fwd(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
    "int max_seqlen_q, int max_seqlen_k, int causal, float scale, float softcap=0.0, int window_left=-1, "
    "int window_right=-1, Tensor? alibi_slopes=None, Tensor? sinks=None) -> (Tensor, Tensor)",
    "attention_varlen_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
    "int max_seqlen_q, int max_seqlen_k, Tensor out, Tensor lse, int causal, float scale, float softcap=0.0, "
    "int window_left=-1, int window_right=-1, Tensor? alibi_slopes=None) -> (Tensor, Tensor, Tensor)",
    "attention_decode_fwd(Tensor q, Tensor k_cache, Tensor v_cache, Tensor? block_table, Tensor cache_seqlens, "
    "bool causal, float scale, float softcap=0.0, int window_left=-1, int window_right=-1, "
    "Tensor? alibi_slopes=None, Tensor? sinks=None) -> (Tensor, Tensor)",
    "bias_act_fwd(Tensor x, Tensor? bias, str activation) -> Tensor",
    "bias_act_bwd(Tensor grad_out, Tensor x, Tensor? bias, str activation) -> (Tensor, Tensor)",
    "cross_entropy_fwd(Tensor logits, Tensor target, Tensor? weight, int ignore_index, float label_smoothing)"
    " -> (Tensor, Tensor)",
    "cross_entropy_bwd(Tensor grad_loss, Tensor logits, Tensor target, Tensor? weight, Tensor lse, "
    "int ignore_index, float label_smoothing) -> Tensor",
    "linear_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor? residual, str activation, bool save_preact)"
    " -> (Tensor, Tensor)",
    "norm_fwd(Tensor x, Tensor? residual, Tensor? weight, Tensor? bias, float eps, bool rms)"
    " -> (Tensor, Tensor, Tensor, Tensor)",
    "norm_bwd(Tensor grad_y, Tensor? grad_sum, Tensor h, Tensor? weight, Tensor mean, Tensor rstd,"
    " bool rms, bool bias_grad) -> (Tensor, Tensor, Tensor)",
    "rope_fwd(Tensor q, Tensor k, Tensor? cos, Tensor? sin, Tensor? positions, Tensor? inv_freq, float scale,"
    " bool interleaved, bool inverse) -> (Tensor, Tensor)",
    "softmax_fwd(Tensor x, Tensor? mask, float scale, int causal_rows, bool log) -> Tensor",
    "softmax_bwd(Tensor grad_y, Tensor y, float scale, bool log) -> Tensor",
};

// The mixture-of-experts ops (CPU kernels only so far): defined with TORCH_LIBRARY_FRAGMENT from
// csrc/bindings/moe_router.cpp, so the emulator module does not declare ops it has no kernel
// for. Move them into kKernelSchemas when CUDA kernels land.
inline constexpr const char* kMoeSchemas[] = {
    "moe_router_fwd(Tensor logits, int top_k, bool sigmoid=False, bool normalize=True, int capacity=-1)"
    " -> (Tensor expert_ids, Tensor weights, Tensor counts, Tensor aux_loss, Tensor z_loss)",
    "moe_router_bwd(Tensor grad_weights, Tensor grad_aux, Tensor grad_z, Tensor logits, int top_k, bool sigmoid,"
    " bool normalize, int capacity) -> Tensor grad_logits",
    "moe_permute_fwd(Tensor x, Tensor expert_ids, int num_experts)"
    " -> (Tensor x_sorted, Tensor row_index, Tensor offsets)",
    "moe_permute_bwd(Tensor grad_sorted, Tensor row_index) -> Tensor grad_x",
    "moe_unpermute_fwd(Tensor y_sorted, Tensor row_index, Tensor weights) -> Tensor out",
    "moe_unpermute_bwd(Tensor grad_out, Tensor y_sorted, Tensor row_index, Tensor weights)"
    " -> (Tensor grad_y_sorted, Tensor grad_weights)",
    "moe_base_assignment(Tensor scores, int[] capacity, float eps=0.0, int max_rounds=1000000)"
    " -> (Tensor expert_ids, Tensor prices)",
    "grouped_linear_fwd(Tensor x, Tensor weight, Tensor offsets, Tensor? bias, str activation=\"none\","
    " bool save_pre=True)"
    " -> (Tensor out, Tensor pre)",
    "grouped_linear_bwd(Tensor grad_out, Tensor x, Tensor weight, Tensor offsets, Tensor pre, str activation,"
    " bool has_bias) -> (Tensor grad_x, Tensor grad_weight, Tensor grad_bias)",
};

}  // namespace fastlm::bind
