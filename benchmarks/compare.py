"""Diffs two results.json files: per (op, case, impl, mode) the time ratio new/old, flagging
regressions beyond a threshold. `python -m benchmarks --compare OLD.json NEW.json [--threshold 0.1]`"""
from __future__ import annotations

import json


def _index(path: str) -> dict[tuple, float]:
    with open(path) as f:
        rows = json.load(f)["rows"]
    return {(r["op"], r["case"], r["impl"], r["mode"]): r["ms"] for r in rows if r.get("ms")}


def compare(old_path: str, new_path: str, threshold: float) -> tuple[list[str], int]:
    """(report lines, number of regressions): a regression is new time > (1 + threshold) x old."""
    old, new = _index(old_path), _index(new_path)
    lines = [f"{'op':<10} {'case':<26} {'impl':<18} {'mode':<8} {'old ms':>9} {'new ms':>9} {'new/old':>8}"]
    regressions = 0
    for key in sorted(old.keys() & new.keys()):
        ratio = new[key] / old[key]
        flag = ""
        if ratio > 1 + threshold:
            flag, regressions = "  REGRESSION", regressions + 1
        elif ratio < 1 - threshold:
            flag = "  faster"
        lines.append(f"{key[0]:<10} {key[1]:<26} {key[2]:<18} {key[3]:<8} {old[key]:9.3f} {new[key]:9.3f} {ratio:8.2f}{flag}")
    for label, keys in (("only in old", old.keys() - new.keys()), ("only in new", new.keys() - old.keys())):
        if keys:
            lines.append(f"{label}: " + ", ".join(" / ".join(k) for k in sorted(keys)))
    lines.append(f"{regressions} regression(s) beyond {threshold:.0%}")
    return lines, regressions
