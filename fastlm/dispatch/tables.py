"""Measured dispatch tables: size buckets, the JSON files, and the choice an entry supports.

One file per device class, <class>.json: shipped next to this module (written by
`python -m fastlm.bench` on a GPU) and in the user's cache (written by `python -m fastlm tune`,
$FASTLM_CACHE_DIR or $XDG_CACHE_HOME/fastlm or ~/.cache/fastlm, then dispatch/<class>.json).
A user entry replaces the shipped entry for the same op and bucket. Format:

    {"format": 1, "device_class": "h100",
     "entries": {"attention": {"bf16 d128 causal prefill T2^12 fwd+bwd": {
         "ms": {"cuda": 1.9, "triton": 2.4},          # the fastlm backends measured, median ms
         "torch": {"impl": "sdpa:flash", "ms": 1.7},  # torch's own op, information only
         "peers": {"sdpa:flash": 1.7, ...},           # every other implementation timed
         "source": {"device_name": ..., "commit": ..., "date": ..., "cases": [...]}}}}}
"""
from __future__ import annotations

import itertools
import json
import os

FORMAT = 1
SHIPPED_DIR = os.path.dirname(os.path.abspath(__file__))
_DTYPES = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32", "float64": "fp64"}
_loaded: dict[tuple[str, str, str], dict] = {}


# ---------------------------------------------------------------- size buckets
def _log2(n: int) -> int:
    """ceil(log2(n)) for n >= 1, 0 below: sizes in (2^(k-1), 2^k] share bucket k."""
    return max(int(n) - 1, 0).bit_length()


def _dt(dtype) -> str:
    name = str(dtype).replace("torch.", "")
    return _DTYPES.get(name, name)


def _pass(train: bool) -> str:
    return "fwd+bwd" if train else "fwd"  # the benchmark's mode names


def attention_bucket(dtype, head_dim: int, value_dim: int, mask: str, tq: int, tk: int, train: bool) -> str:
    """mask: "causal", "full" or "masked" (an attn_mask tensor). Decode is Tq == 1."""
    if mask not in ("causal", "full", "masked"):
        raise ValueError(f"attention_bucket: mask must be 'causal', 'full' or 'masked', got {mask!r}")
    dims = f"d{head_dim}" if value_dim == head_dim else f"d{head_dim}v{value_dim}"
    phase = "decode" if tq == 1 else "prefill"
    return f"{_dt(dtype)} {dims} {mask} {phase} T2^{_log2(tk)} {_pass(train)}"


def rowwise_bucket(dtype, width: int, train: bool) -> str:
    return f"{_dt(dtype)} n2^{_log2(width)} {_pass(train)}"


def matmul_bucket(dtype, m: int, k: int, n: int, train: bool) -> str:
    return f"{_dt(dtype)} m2^{_log2(m)} k2^{_log2(k)} n2^{_log2(n)} {_pass(train)}"


# ---------------------------------------------------------------- files
def cache_dir() -> str:
    if os.environ.get("FASTLM_CACHE_DIR"):
        return os.environ["FASTLM_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "fastlm")


def shipped_path(device_class: str) -> str:
    return os.path.join(SHIPPED_DIR, f"{device_class}.json")


def user_path(device_class: str) -> str:
    return os.path.join(cache_dir(), "dispatch", f"{device_class}.json")


def read(path: str) -> dict:
    """A table file's contents ({} when absent); a malformed file is an error naming it."""
    from fastlm.backend import BACKENDS

    if not os.path.exists(path):
        return {}
    def bad(problem):
        return ValueError(f"dispatch table {path}: {problem}; fix or delete it (re-run `python -m fastlm tune`)")
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        raise bad(f"can't be read as JSON ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise bad(f"format must be {FORMAT}, got {data.get('format') if isinstance(data, dict) else data!r}")
    for op, buckets in data.get("entries", {}).items():
        for key, entry in (buckets.items() if isinstance(buckets, dict) else [(None, buckets)]):
            ms = entry.get("ms") if isinstance(entry, dict) else None
            if not isinstance(ms, dict) or not all(
                    b in BACKENDS and isinstance(t, (int, float)) and t > 0 for b, t in ms.items()):
                raise bad(f"entry {op!r} / {key!r} needs 'ms': {{backend: positive ms}}, got {ms!r}")
    return data


def entries(device_class: str) -> dict[str, dict[str, dict]]:
    """op -> bucket -> entry for a class: the shipped table overlaid by the user's cache. Read
    once per (class, paths); clear_cache() after writing a file."""
    key = (device_class, shipped_path(device_class), user_path(device_class))
    if key not in _loaded:
        merged: dict[str, dict[str, dict]] = {}
        for path, origin in ((key[1], "shipped table"), (key[2], "user cache")):
            for op, buckets in read(path).get("entries", {}).items():
                for bucket, entry in buckets.items():
                    merged.setdefault(op, {})[bucket] = dict(entry, origin=f"{origin} {path}")
        _loaded[key] = merged
    return _loaded[key]


def clear_cache() -> None:
    _loaded.clear()


def write(path: str, device_class: str, new: dict[str, dict[str, dict]]) -> None:
    """Merge `new` (op -> bucket -> entry) into the table at `path`; a new entry replaces the
    old one for its op and bucket. Written to a temporary file, then renamed into place."""
    data = read(path) or {"format": FORMAT, "device_class": device_class, "entries": {}}
    if data.get("device_class") != device_class:
        raise ValueError(f"dispatch table {path} is for {data.get('device_class')!r}, not {device_class!r}")
    for op, buckets in new.items():
        data["entries"].setdefault(op, {}).update(buckets)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
    os.replace(tmp, path)
    clear_cache()


# ---------------------------------------------------------------- the choice
def choose(entry: dict, candidates, reference_is: tuple[str, ...] = ()) -> tuple[str | None, str]:
    """(backend, reason) from a table entry, or (None, why the entry can't decide).

    `candidates` are the backends that can serve the call, in static order. Only measured
    backends compete, and only as a leading run of that order: a backend the estimates rank
    ahead of a measured one but that was not measured itself blocks the entry (it might be
    faster), and a run of one decides nothing (a backend never wins by being the only one asked).
    Backends after the run keep their static place behind it."""
    ms = entry["ms"]
    run = list(itertools.takewhile(lambda c: c in ms, candidates))
    missing = [c for c in candidates if c not in ms]
    if len(run) < 2:
        return None, (f"the table entry did not measure {', '.join(missing)}" if missing
                      else "only one backend can serve")
    ranked = sorted(run, key=ms.get)
    reason = "measured: " + " < ".join(f"{b} {ms[b]:.3g} ms" for b in ranked)
    if missing:
        reason += f" ({', '.join(missing)} not measured; after them in the static order)"
    best, torch_op = ranked[0], entry.get("torch")
    if torch_op and torch_op["ms"] < ms[best]:
        faster = f"torch's {torch_op['impl']} is faster ({torch_op['ms']:.3g} ms)"
        if torch_op["impl"] in reference_is and "reference" in candidates:
            return "reference", f"{reason}; {faster} and the reference backend calls it"
        reason += f"; {faster}, but the reference backend does not call it"
    return best, reason
