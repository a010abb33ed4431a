// The seam between the forward's launcher (attention.cu) and its Hopper tier (attention_sm90.cu):
// attention_forward_cuda asks attention_sm90_why_not (attention.h) and, where it has no objection,
// launches forward_sm90 instead of the sm_80 kernel.
#pragma once
#include "attention_common.cuh"

namespace fastlm::cuda::attn {
// The FlashAttention-3 style forward on p's dense layouts (out and lse as set_layouts kDense).
int forward_sm90(const Params& p, cudaStream_t stream);
}  // namespace fastlm::cuda::attn
