"""rope: rotary position embedding applied to q and k in one pass, forward and backward.

    q, k = fastlm.ops.rope(q, k, cos, sin)                        # HF's tables
    q, k = fastlm.ops.rope(q, k, positions=pos, theta=500000.0,   # tables computed in the kernel
                           scaling={"rope_type": "llama3", ...})
    inv_freq, attention_scale = fastlm.ops.rope_frequencies(rotary_dim, theta, scaling)

q (B, Hq, T, D) and k (B, Hk, T, D) with any strides (HF's transposed views of the (B, T, H*D)
projections included); heads_dim=2 takes (B, T, H, D) instead (handled as transposed views, no
copies). GQA (Hq != Hk) is fine. The outputs are new tensors with q's and k's layouts.

The rotation, per token and frequency i < R/2 (R = rotary_dim <= D, even): a pair (x1, x2) of
every head becomes (x1 c - x2 s, x2 c + x1 s). Pairs are (x[i], x[i + R/2]) in the rotate-half
layout (LLaMA, GPT-NeoX; the default) and (x[2i], x[2i + 1]) with interleaved=True (GPT-J).
Dims R..D-1 pass through unchanged (partial rotary: GPT-NeoX, Phi, Falcon).

Where c, s come from (exactly one of):
- cos, sin: HF's tables, (T, R) or (Bc, T, R) with Bc in {1, B}, any float dtype. HF repeats each
  frequency in both halves for rotate-half ([f0..f_{R/2-1}, f0..f_{R/2-1}]) and per pair for
  interleaved ([f0, f0, f1, f1, ...]); the kernels read one value per pair through the views
  cos[..., :R/2] or cos[..., ::2] (no copies). R is cos.shape[-1]. No gradient flows to the
  tables: a cos or sin that requires grad is refused rather than silently dropped.
- positions: (T,) or (B | 1, T) integers, with theta and scaling (HF's rope_scaling /
  rope_parameters dict: rope_type "default", "linear", "dynamic", "yarn" or "llama3"). The
  kernels compute angle = position * inv_freq[i] in fp32, as HF does, and its cos and sin times
  the attention scale (yarn's attention_factor) themselves: no table in memory. rotary_dim
  defaults to D, or D * scaling["partial_rotary_factor"]. scaling["rope_theta"], when present,
  overrides theta (HF's rope_parameters carry it). Dynamic NTK depends on the sequence length:
  pass seq_len=, or it defaults to max(positions) + 1, which reads the positions back to the
  host (a device sync, and a graph break under torch.compile). Its scaled base is computed in
  fp64, as HF's init function does for an int seq_len (HF's forward hands it a tensor seq_len,
  which makes that one step fp32 math: angles then differ from ours by ~1e-4 rad at 4k positions).

The backward is the inverse rotation of the incoming gradients (the same kernel with s negated);
cos/sin/positions get no gradient. All backends compute in fp32 (the reference in fp64 for fp64
inputs) and round once.

Backends: cuda and triton (fp32/fp16/bf16 q, k; CUDA tensors), cpu (fp32/bf16 q, k; tables of
fp32/fp16/bf16), reference (plain PyTorch, any float dtype).
"""
from __future__ import annotations

import math

import torch

from fastlm import _ext
from fastlm import backend as _backend

OP = "rope"
ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")
GPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CPU_DTYPES = (torch.float32, torch.bfloat16)
TABLE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CUDA_MAX_HALF_ROTARY = 4096  # csrc/include/fastlm/rope.h: kRopeCudaMaxHalfRotary


# ---------------------------------------------------------------- frequencies (HF's init functions)
def _powers(dim: int, base: float, device) -> torch.Tensor:
    """base ** (2i / dim) for i < dim/2, in fp32 as HF computes it."""
    return base ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).to(torch.float32) / dim)


def _need(scaling: dict, key: str, rope_type: str):
    if scaling.get(key) is None:
        raise ValueError(f"rope: scaling of rope_type {rope_type!r} needs {key!r}; got keys {sorted(scaling)}")
    return scaling[key]


def _max_positions(scaling: dict, rope_type: str) -> int:
    for key in ("max_position_embeddings", "original_max_position_embeddings"):
        if scaling.get(key) is not None:
            return scaling[key]
    raise ValueError(f"rope: scaling of rope_type {rope_type!r} needs 'max_position_embeddings' (the config's, "
                     f"or 'original_max_position_embeddings'); got keys {sorted(scaling)}")


def _rope_type(scaling) -> str:
    if scaling is None:
        return "default"
    if not isinstance(scaling, dict):
        raise TypeError(f"rope: scaling must be a dict (HF's rope_scaling / rope_parameters) or None, "
                        f"got {type(scaling).__name__}")
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"rope: unknown rope_type {rope_type!r}; expected one of {', '.join(ROPE_TYPES)}")
    return rope_type


def rope_frequencies(rotary_dim: int, theta: float = 10000.0, scaling: dict | None = None, *,
                     seq_len: int | None = None, device=None) -> tuple[torch.Tensor, float]:
    """(inv_freq fp32 (rotary_dim/2,), attention_scale) as HF's ROPE_INIT_FUNCTIONS compute them
    (transformers.modeling_rope_utils) for rope_type default, linear, dynamic (NTK; seq_len, and
    the config's max_position_embeddings in scaling), yarn and llama3."""
    if isinstance(rotary_dim, bool) or not isinstance(rotary_dim, int) or rotary_dim <= 0 or rotary_dim % 2:
        raise ValueError(f"rope: rotary_dim must be a positive even int, got {rotary_dim!r}")
    rope_type = _rope_type(scaling)
    scaling = scaling or {}
    base = float(scaling.get("rope_theta") or theta)
    dim = rotary_dim
    if rope_type == "default":
        return 1.0 / _powers(dim, base, device), 1.0
    if rope_type == "linear":
        return 1.0 / _powers(dim, base, device) / _need(scaling, "factor", rope_type), 1.0
    if rope_type == "dynamic":
        factor, max_pos = _need(scaling, "factor", rope_type), _max_positions(scaling, rope_type)
        n = max_pos if seq_len is None else max(int(seq_len), max_pos)
        base = base * ((factor * n / max_pos) - (factor - 1)) ** (dim / (dim - 2))
        return 1.0 / _powers(dim, base, device), 1.0
    if rope_type == "yarn":
        original = _need(scaling, "original_max_position_embeddings", rope_type)
        factor = scaling.get("factor")
        if factor is None:  # HF (DeepSeek-V3 configs): the ratio of the config's lengths
            factor = _need(scaling, "max_position_embeddings", rope_type) / original

        def mscale_of(scale, m=1.0):
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        attention = scaling.get("attention_factor")
        if attention is None:
            m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
            attention = float(mscale_of(factor, m) / mscale_of(factor, m_all)) if m and m_all else mscale_of(factor)
        beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

        def correction_dim(rotations):
            return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

        low, high = correction_dim(beta_fast), correction_dim(beta_slow)
        if scaling.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001  # HF's guard against a zero-width ramp
        ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1).to(device)
        extrapolation = 1 - ramp  # 1: keep the original frequency (fast dims), 0: interpolate
        powers = _powers(dim, base, device)
        inv = (1.0 / (factor * powers)) * (1 - extrapolation) + (1.0 / powers) * extrapolation
        return inv, float(attention)
    # llama3
    factor = _need(scaling, "factor", rope_type)
    low_f, high_f = _need(scaling, "low_freq_factor", rope_type), _need(scaling, "high_freq_factor", rope_type)
    old = _need(scaling, "original_max_position_embeddings", rope_type)
    inv = 1.0 / _powers(dim, base, device)
    wavelen = 2 * math.pi / inv
    low_wavelen, high_wavelen = old / low_f, old / high_f
    scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old / wavelen - low_f) / (high_f - low_f)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled), 1.0


# ---------------------------------------------------------------- reference (the oracle)
def _rope_core_ref(q, k, cos, sin, positions, inv_freq, scale: float, interleaved: bool, inverse: bool):
    """The registered op's math in plain PyTorch: q, k 4-D; cos/sin (Bc, T, R/2) or positions
    (Bp, T) int64 with inv_freq (R/2,) fp32. fp32 compute (fp64 for fp64 q), one rounding."""
    cd = torch.float64 if q.dtype == torch.float64 else torch.float32
    if cos is not None:
        c, s = cos.to(cd), sin.to(cd)
    else:
        angle = positions.to(cd if cd == torch.float64 else torch.float32)[..., None] * inv_freq.to(cd)
        c, s = angle.cos(), angle.sin()  # (Bp, T, R/2)
    c, s = (c * scale)[:, None], (s * scale)[:, None]  # (Bc, 1, T, R/2): broadcast over heads
    if inverse:
        s = -s
    half = c.shape[-1]

    def rotate(x):
        x = x.to(cd)
        if interleaved:
            x1, x2 = x[..., 0:2 * half:2], x[..., 1:2 * half:2]
        else:
            x1, x2 = x[..., :half], x[..., half:2 * half]
        y1, y2 = x1 * c - x2 * s, x2 * c + x1 * s
        rot = torch.stack((y1, y2), -1).flatten(-2) if interleaved else torch.cat((y1, y2), -1)
        return torch.cat((rot, x[..., 2 * half:]), -1)

    outs = []
    for x in (q, k):
        out = torch.empty_like(x)  # the layout the kernels and the fake impl give
        outs.append(out.copy_(rotate(x)))
    return outs[0], outs[1]


# ---------------------------------------------------------------- per-backend kernels
def _triton_rope(q, k, cos, sin, positions, inv_freq, scale, interleaved, inverse):
    from fastlm.triton import rope as kernels  # imported late: TRITON_INTERPRET is read at import

    q_out, k_out = torch.empty_like(q), torch.empty_like(k)
    kernels.rope(q, k, cos, sin, positions, inv_freq, scale, interleaved, inverse, q_out, k_out)
    return q_out, k_out


_IMPL = _backend.implementations(reference=_rope_core_ref, triton=_triton_rope, ext="rope_fwd")


# ---------------------------------------------------------------- custom op + autograd
@torch.library.custom_op("fastlm::rope", mutates_args=())
def _rope_op(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None,
             positions: torch.Tensor | None, inv_freq: torch.Tensor | None, scale: float, interleaved: bool,
             inverse: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return _IMPL[backend](q, k, cos, sin, positions, inv_freq, scale, interleaved, inverse)


@_rope_op.register_fake
def _(q, k, cos, sin, positions, inv_freq, scale, interleaved, inverse, backend):
    return torch.empty_like(q), torch.empty_like(k)


def _setup_context(ctx, inputs, output):
    q, k, cos, sin, positions, inv_freq, scale, interleaved, inverse, backend = inputs
    ctx.save_for_backward(cos, sin, positions, inv_freq)
    ctx.args = (scale, interleaved, inverse, backend)


def _backward(ctx, grad_q, grad_k):
    cos, sin, positions, inv_freq = ctx.saved_tensors
    scale, interleaved, inverse, backend = ctx.args
    # a rotation's gradient is the inverse rotation of the incoming gradient (scale is symmetric)
    gq, gk = _rope_op(grad_q, grad_k, cos, sin, positions, inv_freq, scale, interleaved, not inverse, backend)
    return gq, gk, None, None, None, None, None, None, None, None


_rope_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------- who can serve what
def _example(device: torch.device):
    q, k = torch.empty(1, 4, 8, 64, device=device), torch.empty(1, 2, 8, 64, device=device)
    cos, sin = torch.empty(1, 8, 32, device=device), torch.empty(1, 8, 32, device=device)
    return (q, k, cos, sin, None, None, 1.0, False, False)


def _why(name: str, allowed):
    def why(q, k, cos, sin, positions, inv_freq, *_):
        if allowed is None:
            return [] if q.dtype.is_floating_point else [f"dtype {q.dtype} is not floating point"]
        reasons = _backend.dtype_reason(q, allowed, name)
        if cos is not None and cos.dtype not in TABLE_DTYPES:
            reasons.append(f"cos/sin dtype {str(cos.dtype)[6:]} not supported by the {name} backend "
                           "(float32, float16, bfloat16)")
        half = cos.shape[-1] if cos is not None else inv_freq.shape[0]
        if name == "cuda" and half > CUDA_MAX_HALF_ROTARY:
            reasons.append(f"rotary_dim {2 * half} over the cuda kernels' {2 * CUDA_MAX_HALF_ROTARY}")
        return reasons
    return why


for _name, _allowed in (("reference", None), ("cpu", CPU_DTYPES), ("triton", GPU_DTYPES), ("cuda", GPU_DTYPES)):
    _backend.register(OP, _name, example=_example if _name == "reference" else None)(_why(_name, _allowed))


# ---------------------------------------------------------------- argument checks
def _dt(dtype) -> str:
    return str(dtype).replace("torch.", "")


def _prepare(q, k, cos, sin, positions, theta, scaling, rotary_dim, interleaved, heads_dim, seq_len):
    """Checks everything and returns the registered op's arguments (q, k as (B, H, T, D) views)."""
    for name, t in (("q", q), ("k", k)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"rope: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            layout = "(B, T, H, D)" if heads_dim == 2 else "(B, H, T, D)"
            raise ValueError(f"rope: {name} must be 4-D {layout}, got shape {tuple(t.shape)}")
    if heads_dim not in (1, 2) or isinstance(heads_dim, bool):
        raise ValueError(f"rope: heads_dim must be 1 (B, H, T, D) or 2 (B, T, H, D), got {heads_dim!r}")
    if not q.dtype.is_floating_point:
        raise TypeError(f"rope: q must be a floating-point tensor, got dtype {q.dtype}")
    if k.dtype != q.dtype:
        raise TypeError(f"rope: k has dtype {k.dtype} but q has dtype {q.dtype}")
    if k.device != q.device:
        raise ValueError(f"rope: k is on {k.device} but q is on {q.device}")
    if heads_dim == 2:
        q, k = q.transpose(1, 2), k.transpose(1, 2)
    B, _, T, D = q.shape
    if (k.shape[0], k.shape[2], k.shape[3]) != (B, T, D):
        raise ValueError(f"rope: k must match q in batch, sequence and head dim, got q {tuple(q.shape)} and "
                         f"k {tuple(k.shape)} (as (B, H, T, D))")
    if not isinstance(interleaved, bool):
        raise TypeError(f"rope: interleaved must be a bool, got {interleaved!r}")
    tables = cos is not None or sin is not None
    if tables and positions is not None:
        raise ValueError("rope: give either cos and sin, or positions, not both")
    if not tables and positions is None:
        raise ValueError("rope: give cos and sin (tables), or positions (computed tables); got neither")
    if tables:
        if cos is None or sin is None:
            raise ValueError(f"rope: cos and sin go together; got {'cos' if cos is None else 'sin'}=None")
        for name, t in (("cos", cos), ("sin", sin)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"rope: {name} must be a torch.Tensor, got {type(t).__name__}")
            if t.requires_grad and torch.is_grad_enabled():
                raise ValueError(f"rope: gradients to cos/sin are not computed, and {name} requires grad; "
                                 "pass it detached (e.g. cos.detach())")
            if not t.dtype.is_floating_point:
                raise TypeError(f"rope: {name} must be a floating-point tensor, got dtype {t.dtype}")
            if t.device != q.device:
                raise ValueError(f"rope: {name} is on {t.device} but q is on {q.device}")
            if t.dim() not in (2, 3):
                raise ValueError(f"rope: {name} must be (T, R) or (B or 1, T, R), got shape {tuple(t.shape)}")
        if sin.shape != cos.shape:
            raise ValueError(f"rope: sin has shape {tuple(sin.shape)} but cos has shape {tuple(cos.shape)}")
        if sin.dtype != cos.dtype:
            raise TypeError(f"rope: sin has dtype {sin.dtype} but cos has dtype {cos.dtype}")
        R = cos.shape[-1]
        _check_rotary_dim(R, D, "cos.shape[-1]")
        if rotary_dim is not None and rotary_dim != R:
            raise ValueError(f"rope: rotary_dim={rotary_dim!r} but cos.shape[-1] is {R}")
        if cos.dim() == 2:
            cos, sin = cos[None], sin[None]
        if cos.shape[0] not in (1, B) or cos.shape[1] != T:
            raise ValueError(f"rope: cos/sin of shape {tuple(cos.shape)} don't fit q: expected (1 or {B}, {T}, R) "
                             f"or ({T}, R)")
        half = slice(None, R // 2) if not interleaved else slice(None, None, 2)
        return q, k, cos[..., half], sin[..., half], None, None, 1.0, interleaved
    if not isinstance(positions, torch.Tensor):
        raise TypeError(f"rope: positions must be a torch.Tensor, got {type(positions).__name__}")
    if positions.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"rope: positions must be int64 or int32, got dtype {positions.dtype}")
    if positions.device != q.device:
        raise ValueError(f"rope: positions is on {positions.device} but q is on {q.device}")
    if positions.dim() == 1:
        positions = positions[None]
    if positions.dim() != 2 or positions.shape[0] not in (1, B) or positions.shape[1] != T:
        raise ValueError(f"rope: positions must be ({T},) or (1 or {B}, {T}), got shape {tuple(positions.shape)}")
    rope_type = _rope_type(scaling)
    if rotary_dim is None:
        factor = (scaling or {}).get("partial_rotary_factor") or 1.0
        rotary_dim = int(D * factor)
    _check_rotary_dim(rotary_dim, D, "rotary_dim")
    if rope_type == "dynamic" and seq_len is None and positions.numel():
        seq_len = int(positions.max()) + 1  # a device sync; pass seq_len= to avoid it
    inv_freq, scale = rope_frequencies(rotary_dim, theta, scaling, seq_len=seq_len, device=q.device)
    return q, k, None, None, positions.to(torch.int64), inv_freq, float(scale), interleaved


def _check_rotary_dim(R, D, name):
    if isinstance(R, bool) or not isinstance(R, int) or R <= 0 or R % 2 or R > D:
        raise ValueError(f"rope: {name} (the rotary dim R) must be a positive even int <= the head dim {D}, got {R!r}")


# ---------------------------------------------------------------- public entry points
def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor | None = None, sin: torch.Tensor | None = None, *,
         positions: torch.Tensor | None = None, theta: float = 10000.0, scaling: dict | None = None,
         rotary_dim: int | None = None, interleaved: bool = False, heads_dim: int = 1, seq_len: int | None = None,
         backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, k) rotated by RoPE in one pass; differentiable in q and k. See the module docstring."""
    args = _prepare(q, k, cos, sin, positions, theta, scaling, rotary_dim, interleaved, heads_dim, seq_len)
    chosen = _backend.select(OP, args[0].device, *args, False, backend=backend)
    q_out, k_out = _rope_op(*args, False, chosen)
    if heads_dim == 2:
        return q_out.transpose(1, 2), k_out.transpose(1, 2)
    return q_out, k_out


def rope_ref(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor | None = None, sin: torch.Tensor | None = None, *,
             positions: torch.Tensor | None = None, theta: float = 10000.0, scaling: dict | None = None,
             rotary_dim: int | None = None, interleaved: bool = False, heads_dim: int = 1,
             seq_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """rope in plain PyTorch ops (differentiable by autograd), computed in fp32 (fp64 for fp64 q)."""
    args = _prepare(q, k, cos, sin, positions, theta, scaling, rotary_dim, interleaved, heads_dim, seq_len)
    q_out, k_out = _rope_core_ref(*args, False)
    if heads_dim == 2:
        return q_out.transpose(1, 2), k_out.transpose(1, 2)
    return q_out, k_out


# Shapes of the raw extension op, so it too traces under torch.compile and passes opcheck.
# (An extension built before rope existed lacks the op: fastlm still imports; rebuild to use it.)
if _ext.HAS_EXTENSION and hasattr(torch.ops.fastlm, "rope_fwd"):

    @torch.library.register_fake("fastlm::rope_fwd")
    def _(q, k, cos, sin, positions, inv_freq, scale, interleaved, inverse):
        return torch.empty_like(q), torch.empty_like(k)
