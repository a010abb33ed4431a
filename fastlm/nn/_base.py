"""The backend plumbing shared by every fastlm.nn module, in one place.

Each fastlm module subclasses its torch.nn namesake (same constructor, same parameters,
buffers and state_dict keys, so `isinstance(m, torch.nn.Linear)` still holds) and mixes in
`FastModule`, which adds:
- `backend`: None (the usual selection: `fastlm.use_backend`, FASTLM_BACKEND, auto) or a
  backend name pinned for every fastlm op the module calls;
- `_run(fn, ...)`: call a fastlm op under that pin;
- `from_torch(module)`: a fastlm twin of an existing torch module that shares its Parameter
  and buffer objects (what `fastlm.patch` uses).
"""
from __future__ import annotations

import contextlib

import torch

from fastlm.backend import CHOICES, use_backend

ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "silu")


def check_backend(backend: str | None) -> str | None:
    if backend is not None and backend not in CHOICES:
        raise ValueError(f"backend must be None or one of {', '.join(CHOICES)}; got {backend!r}")
    return backend


def check_activation(activation: str | None, allow_none: bool = True) -> str | None:
    if activation is None and allow_none:
        return None
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be {'None or ' if allow_none else ''}one of {', '.join(ACTIVATIONS)}; got {activation!r}")
    return activation


def activation_name(act) -> str | None:
    """The fused-activation name of a torch activation (module, functional or string), else None."""
    import torch.nn.functional as F

    if isinstance(act, str):
        return act if act in ACTIVATIONS else None
    if act is F.relu or type(act) in (torch.nn.ReLU,):
        return "relu"
    if act is F.silu or type(act) in (torch.nn.SiLU,):
        return "silu"
    if act is F.gelu:
        return "gelu"
    if isinstance(act, torch.nn.GELU):
        return "gelu" if act.approximate == "none" else "gelu_tanh"
    return None


class FastModule:
    """Mixin for fastlm.nn modules; see the module docstring."""

    backend: str | None = None

    def _run(self, fn, *args, **kwargs):
        if self.backend is None:
            return fn(*args, **kwargs)
        with use_backend(self.backend):
            return fn(*args, **kwargs)

    def _pin(self):
        """A context that pins `self.backend` for a block of fastlm op calls (no-op when None)."""
        return contextlib.nullcontext() if self.backend is None else use_backend(self.backend)

    @classmethod
    def from_torch(cls, module: torch.nn.Module, *, backend: str | None = None, **extra):
        """The fastlm twin of `module` (an instance of the torch.nn base class), sharing its
        Parameter and buffer objects; `module` itself is left unchanged."""
        base = next(b for b in cls.__mro__ if b.__module__.startswith("torch.nn"))
        if not isinstance(module, base):
            raise TypeError(f"{cls.__name__}.from_torch expects a {base.__name__}, got {type(module).__name__}")
        new = cls.__new__(cls)
        state = dict(module.__dict__)
        for key in ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set"):
            if key in state:
                state[key] = state[key].copy()
        new.__dict__.update(state)
        new.backend = check_backend(backend)
        new._fastlm_adopt(**extra)
        return new

    def _fastlm_adopt(self, **extra) -> None:
        """Set the fastlm-only attributes after `from_torch` (subclasses validate theirs)."""
        if extra:
            raise TypeError(f"{type(self).__name__}.from_torch got unexpected arguments {sorted(extra)}")

    def _backend_repr(self) -> str:
        return "" if self.backend is None else f", backend={self.backend!r}"
