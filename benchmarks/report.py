"""Writes what the benchmark modules measured: a table on stdout, results.json, report.md,
dispatch.json (per op and size bucket, each fastlm backend's time and torch's op's: what
fastlm's `auto` picks from on a GPU, see fastlm/dispatch) and one PNG per op (throughput
against size, one line per implementation) when matplotlib is there."""
from __future__ import annotations

import dataclasses
import json
import os
import re

from benchmarks.common import Row
from fastlm import backend, dispatch


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def table(rows: list[Row]) -> list[str]:
    head = f"{'op':<10} {'case':<26} {'impl':<18} {'mode':<8} {'ms':>9} {'GB/s':>8} {'TFLOP/s':>8} {'%ceil':>6} {'vs eager':>8}  note"
    out = [head, "-" * len(head)]
    for r in rows:
        out.append(
            f"{r.op:<10} {r.case:<26} {r.impl:<18} {r.mode:<8} {_fmt(r.ms, '9.3f')} {_fmt(r.gbps, '8.1f')} "
            f"{_fmt(r.tflops, '8.2f')} {_fmt(r.pct_ceiling, '6.1f')} {_fmt(r.vs_eager, '7.2f') + ('x' if r.vs_eager else '')}  {r.note}"
        )
    return out


def markdown(meta: dict, rows: list[Row]) -> str:
    lines = [f"# fastlm benchmark report: {meta['device_name']}", ""]
    lines += [f"- {k}: {v}" for k, v in meta.items()]
    lines += ["", "| op | case | impl | mode | ms | GB/s | TFLOP/s | % ceiling | vs eager | note |", "|" + "---|" * 10]
    for r in rows:
        lines.append(
            f"| {r.op} | {r.case} | {r.impl} | {r.mode} | {_fmt(r.ms, '.3f')} | {_fmt(r.gbps, '.1f')} | "
            f"{_fmt(r.tflops, '.2f')} | {_fmt(r.pct_ceiling, '.1f')} | {_fmt(r.vs_eager, '.2f')} | {r.note} |"
        )
    return "\n".join(lines) + "\n"


def plots(out_dir: str, rows: list[Row]) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    for op in sorted({r.op for r in rows}):
        mine = [r for r in rows if r.op == op and r.ms]
        panels = list(dict.fromkeys((r.mode, r.dtype) for r in mine))
        if not panels:
            continue
        cols = min(len(panels), 3)
        nrows = (len(panels) + cols - 1) // cols
        fig, axes = plt.subplots(nrows, cols, figsize=(5.5 * cols, 4.2 * nrows), squeeze=False)
        for ax in axes.flat[len(panels):]:
            ax.set_visible(False)
        for ax, (mode, dtype) in zip(axes.flat, panels):
            sel = [r for r in mine if r.mode == mode and r.dtype == dtype]
            sizes = list(dict.fromkeys(r.size or r.case for r in sel))
            unit, field = next(((u, f) for u, f in (("GB/s", "gbps"), ("TFLOP/s", "tflops"), ("tokens/s", "tokens_per_s"))
                                if any(getattr(r, f) for r in sel)), ("1000 / ms", None))
            for impl in dict.fromkeys(r.impl for r in sel):
                pts = {(r.size or r.case): (getattr(r, field) if field else 1e3 / r.ms) for r in sel if r.impl == impl}
                ax.plot(range(len(sizes)), [pts.get(c) for c in sizes], marker="o", label=impl)
            ax.set_xticks(range(len(sizes)), sizes, rotation=20, ha="right", fontsize=8)
            ax.set_ylabel(unit)
            ax.set_ylim(bottom=0)
            ax.set_title(f"{op} {mode} {dtype}".strip())
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        path = os.path.join(out_dir, f"{op}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def write(out_dir: str, meta: dict, rows: list[Row]) -> list[str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, "results.json"), os.path.join(out_dir, "report.md")]
    with open(paths[0], "w") as f:
        json.dump({"meta": meta, "rows": [dataclasses.asdict(r) for r in rows]}, f, indent=1)
    with open(paths[1], "w") as f:
        f.write(markdown(meta, rows))
    return paths + plots(out_dir, rows)


# ---------------------------------------------------------------- dispatch tables
_DT = r"(float16|bfloat16|float32|float64)"


def bucket_of(r: Row) -> tuple[str, str] | None:
    """(registry op, bucket) of a forward or forward+backward row, from the case strings the
    benchmark modules write (a row may carry its own in r.bucket); None where no op dispatches."""
    if r.mode not in ("fwd", "fwd+bwd"):
        return None
    train = r.mode == "fwd+bwd"
    if r.bucket:
        return r.op, r.bucket
    if r.op == "attention":
        if m := re.fullmatch(rf"decode \d+x\d+x(\d+)x(\d+)x(\d+) {_DT}", r.case):
            return r.op, dispatch.attention_bucket(m[4], int(m[3]), int(m[3]), "full", int(m[1]), int(m[2]), train)
        if m := re.fullmatch(rf"\d+x\d+x(\d+)x(\d+) {_DT}( causal)?", r.case):
            t, d = int(m[1]), int(m[2])
            return r.op, dispatch.attention_bucket(m[3], d, d, "causal" if m[4] else "full", t, t, train)
    elif r.op == "linear":
        if m := re.match(rf"M(\d+) K(\d+) N(\d+) {_DT}", r.case):
            return r.op, dispatch.matmul_bucket(m[4], int(m[1]), int(m[2]), int(m[3]), train)
    elif m := re.match(rf"(?:(\w+) )?\d+x(\d+) {_DT}", r.case):  # row-wise; norms name the op first
        op = m[1] if r.op == "norms" else r.op
        if op in backend.ops():
            return op, dispatch.rowwise_bucket(m[3], int(m[2]), train)
    return None


def _is_torch_op(impl: str) -> bool:
    """torch's own op (an SDPA backend, eager torch), as opposed to torch.compile or a library."""
    return impl.startswith(("sdpa:", "torch eager", "torch._"))


def dispatch_entries(rows: list[Row], meta: dict) -> dict[str, dict[str, dict]]:
    """op -> bucket -> table entry (format in fastlm/dispatch/tables.py). Cases sharing a bucket
    are summed, over the implementations timed in all of them."""
    groups: dict[tuple[str, str], list[dict[str, float]]] = {}
    cases: dict[tuple[str, str], list[str]] = {}
    for case in dict.fromkeys((r.op, r.case, r.mode) for r in rows):
        timed = {r.impl: r.ms for r in rows if (r.op, r.case, r.mode) == case and r.ms}
        key = next((bucket_of(r) for r in rows if (r.op, r.case, r.mode) == case), None)
        if key and timed:
            groups.setdefault(key, []).append(timed)
            cases.setdefault(key, []).append(case[1])
    out: dict[str, dict[str, dict]] = {}
    for (op, bucket), timings in groups.items():
        common = set.intersection(*(set(t) for t in timings))
        total = {impl: sum(t[impl] for t in timings) for impl in sorted(common)}
        ours = {i.split(":", 1)[1]: ms for i, ms in total.items() if i.startswith("fastlm:") and i[7:] in backend.BACKENDS}
        if not ours:
            continue
        peers = {i: ms for i, ms in total.items() if not i.startswith("fastlm:")}
        entry = {"ms": ours, "peers": peers, "winner": min(ours, key=ours.get),
                 "source": {k: meta.get(k) for k in ("device_name", "commit", "date", "mode")} | {"cases": cases[op, bucket]}}
        torch_ops = {i: ms for i, ms in peers.items() if _is_torch_op(i)}
        if torch_ops:
            best = min(torch_ops, key=torch_ops.get)
            entry["torch"] = {"impl": best, "ms": torch_ops[best]}
            entry["slower_than_torch"] = torch_ops[best] < ours[entry["winner"]]
        out.setdefault(op, {})[bucket] = entry
    return out


def dispatch_lines(entries: dict[str, dict[str, dict]]) -> list[str]:
    lines = []
    for op, buckets in entries.items():
        for bucket, e in buckets.items():
            line = f"{op} [{bucket}]: " + " < ".join(f"{b} {ms:.3g} ms" for b, ms in sorted(e["ms"].items(), key=lambda x: x[1]))
            if e.get("slower_than_torch"):
                line += f"; torch's own op is faster: {e['torch']['impl']} {e['torch']['ms']:.3g} ms"
            lines.append(line)
    return lines


def write_dispatch(out_dir: str, device_class: str, entries: dict) -> str:
    """This run's entries alone (a shipped table merges runs: fastlm.dispatch.tables.write)."""
    path = os.path.join(out_dir, "dispatch.json")
    with open(path, "w") as f:
        json.dump({"format": 1, "device_class": device_class, "entries": entries}, f, indent=1, sort_keys=True)
    return path
