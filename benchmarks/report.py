"""Writes what the benchmark modules measured: a table on stdout, results.json, report.md and
one PNG per op (throughput against size, one line per implementation) when matplotlib is there."""
from __future__ import annotations

import dataclasses
import json
import os

from benchmarks.common import Row


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
