#!/usr/bin/env python3
"""Static report of the compiled CUDA kernels (SASS) in fastlm's extension, no GPU needed.

Per kernel and arch: registers, static shared memory, local memory and spill instructions
(STL/LDL), theoretical occupancy, and the loops of the SASS with their instruction mix. The
"main loop" is the outermost loop holding the most tensor-core instructions; its instructions
per MMA, its MMA-free inner loops and its global load widths are what a kernel rewrite is
judged by, so `main_loop_figures` returns exactly those for tests to assert on.

Memory-bound kernels (--memory; `memory_figures` for tests) are judged instead by their global
access widths, the bytes of global loads each thread has in flight (the largest batch of loads
issued in one basic block before any instruction reads what they load), and Little's law: with
those bytes in flight per thread and the occupancy's threads per SM, the estimated share of the
copy bandwidth is min(1, bytes in flight per SM / (bandwidth x latency / SMs)), H100 figures:
3.0 TB/s x 600 ns / 132 SMs = 13.6 KB per SM.

    python scripts/sass_report.py [SO] [--arch sm_80] [--kernel attention] [--loops] [--memory] [--json]
"""
import argparse
import importlib.machinery
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from functools import lru_cache
from pathlib import Path

# Per-SM limits (CUDA occupancy calculator values for compute capability 8.0 and 9.0).
REGS_PER_SM, REGS_PER_THREAD, REG_GRANULE, SUBPARTITIONS = 65536, 255, 256, 4
WARPS_PER_SM, CTAS_PER_SM, SMEM_PER_CTA_RESERVED, SMEM_GRANULE = 64, 32, 1024, 128
SMEM_PER_SM = {"sm_80": 164 * 1024, "sm_90": 228 * 1024}
SMEM_PER_CTA = {"sm_80": 163 * 1024, "sm_90": 227 * 1024}
MMA_OPS = ("HMMA", "HGMMA", "IMMA", "QMMA")
# A global load's width is in its opcode: LDG.E.128, LDGSTS.E.BYPASS.64, LDG.E.U16, ...
# (tokens such as LTC128B are cache hints, not widths, hence whole-token matching).
WIDTH_TOKENS = {"128": 16, "64": 8, "U16": 2, "S16": 2, "U8": 1, "S8": 1}


def find_tool(name="cuobjdump"):
    """FASTLM_CUOBJDUMP, then PATH, then the copy in Triton's wheel, then CUDA_HOME/bin."""
    candidates = [os.environ.get("FASTLM_" + name.upper()), shutil.which(name)]
    spec = importlib.util.find_spec("triton")  # locates the wheel without importing it
    if spec and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            candidates.append(os.path.join(loc, "backends", "nvidia", "bin", name))
    if os.environ.get("CUDA_HOME"):
        candidates.append(os.path.join(os.environ["CUDA_HOME"], "bin", name))
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def default_extension():
    """fastlm/_C.<abi>.so, found without importing fastlm (which would import torch)."""
    spec = importlib.util.find_spec("fastlm")
    for loc in (spec.submodule_search_locations or []) if spec else []:
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            if os.path.exists(os.path.join(loc, "_C" + suffix)):
                return os.path.join(loc, "_C" + suffix)
    return None


def tool_lines(tool, *args):
    """Stream a tool's stdout as (module, line); module is the stem of the cubin's source."""
    proc = subprocess.Popen([tool, *args], stdout=subprocess.PIPE, text=True, errors="replace")
    module = None
    for line in proc.stdout:
        if line.startswith("identifier = "):
            module = Path(line.split("=", 1)[1].strip()).stem
        yield module, line
    if proc.wait():
        raise RuntimeError(f"{Path(tool).name} {' '.join(args)} exited with {proc.returncode}")


# ---------------------------------------------------------------- SASS text -> instructions
INSN = re.compile(r"^\s*/\*([0-9a-f]+)\*/\s+(@!?U?P(?:T|\d)\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")


def parse_sass(lines):
    """{(module, mangled): [(addr, guarded, opcode, operands)]} from `cuobjdump -sass` text."""
    kernels, insns = {}, None
    for module, line in lines:
        if "Function : " in line:
            insns = kernels.setdefault((module, line.split("Function : ", 1)[1].strip()), [])
        elif insns is not None and (m := INSN.match(line)):
            guarded = bool(m[2]) and m[2].strip() != "@PT"  # @PT: always true
            insns.append((int(m[1], 16), guarded, m[3], m[4].strip()))
    return kernels


def _target(operands):
    hexes = re.findall(r"0x[0-9a-f]+", operands)
    return int(hexes[-1], 16) if hexes else None


def basic_blocks(insns):
    """Blocks as index ranges [start, end) and their successors (by block start index)."""
    index = {a: i for i, (a, *_) in enumerate(insns)}
    leaders, succ_of_last = {0}, {}
    for i, (addr, guarded, op, args) in enumerate(insns):
        base, nxt = op.split(".")[0], i + 1
        if base in ("BRA", "JMP", "CALL"):
            t = index.get(_target(args))
            # conditional: guarded, BRA.DIV (divergence test), or a predicate operand (BRA P4, x)
            cond = guarded or base == "CALL" or op != base or "," in args
            succ_of_last[i] = [s for s in (t, nxt if cond else None) if s is not None]
        elif base in ("EXIT", "RET", "BRX", "JMX"):  # RET/indirect: no known successor
            succ_of_last[i] = [nxt] if guarded else []
        else:
            continue
        leaders.update(s for s in succ_of_last[i] if s < len(insns))
        leaders.add(nxt)
    starts = sorted(s for s in leaders if s < len(insns))
    blocks = {}
    for s, e in zip(starts, starts[1:] + [len(insns)]):
        succ = succ_of_last.get(e - 1, [e])  # a block not ending in a branch falls through
        blocks[s] = (e, [x for x in succ if x < len(insns)])
    return blocks


def find_loops(insns):
    """Natural loops: back edges u->h where h dominates u (Cooper-Harvey-Kennedy dominators).

    Dominance, rather than "any backward BRA", drops the out-of-line BRA.DIV fallbacks that
    jump back into straight-line code, and unreachable code such as the final `BRA self`."""
    if not insns:
        return []
    blocks = basic_blocks(insns)
    order, seen, stack = [], {0}, [(0, iter(blocks[0][1]))]
    while stack:  # iterative DFS for postorder
        b, it = stack[-1]
        nxt = next((s for s in it if s not in seen), None)
        if nxt is None:
            order.append(stack.pop()[0])
        else:
            seen.add(nxt)
            stack.append((nxt, iter(blocks[nxt][1])))
    rpo = order[::-1]
    num = {b: i for i, b in enumerate(rpo)}
    preds = {b: [] for b in rpo}
    for b in rpo:
        for s in blocks[b][1]:
            preds[s].append(b)
    idom = {0: 0}
    changed = True
    while changed:
        changed = False
        for b in rpo[1:]:
            done = [p for p in preds[b] if p in idom]
            new = done[0]
            for p in done[1:]:
                a, c = p, new
                while a != c:
                    while num[a] > num[c]:
                        a = idom[a]
                    while num[c] > num[a]:
                        c = idom[c]
                new = a
            if idom.get(b) != new:
                idom[b], changed = new, True

    def dominates(h, b):
        while b != h and b != 0:
            b = idom[b]
        return b == h

    bodies = {}
    for u in rpo:
        for h in blocks[u][1]:
            if dominates(h, u):
                body, work = bodies.setdefault(h, {h}), [u]
                while work:
                    b = work.pop()
                    if b not in body:
                        body.add(b)
                        work.extend(preds[b])
    loops = []
    for h, body in bodies.items():
        idx = [i for b in body for i in range(b, blocks[b][0])]
        loops.append({"start": insns[h][0], "end": max(insns[i][0] for i in idx),
                      "header": h, "blocks": body, **insn_mix([insns[i] for i in idx])})
    for lp in loops:  # nesting: the loops whose body holds this loop's header
        outer = [o for o in loops if o is not lp and lp["header"] in o["blocks"]]
        lp["depth"] = len(outer)
        lp["parent"] = min(outer, key=lambda o: len(o["blocks"]))["start"] if outer else None
    loops.sort(key=lambda lp: lp["start"])
    return loops


def insn_mix(insns):
    """Instruction counts that matter for a loop body (or a whole kernel)."""
    mix = {"insts": len(insns), "mma": 0, "mma_ops": {}, "gld_bytes": {}, "lds": 0, "ldsm": 0, "shfl": 0,
           "bar": 0, "ex2": 0, "stl": 0, "ldl": 0}
    for _, _, op, _ in insns:
        tok = op.split(".")
        if tok[0] in MMA_OPS:  # mma_ops: which tensor-core instructions (HMMA: mma.sync, HGMMA: wgmma)
            mix["mma"] += 1
            mix["mma_ops"][tok[0]] = mix["mma_ops"].get(tok[0], 0) + 1
        elif tok[0] in ("LDG", "LDGSTS"):
            width = next((WIDTH_TOKENS[t] for t in tok[1:] if t in WIDTH_TOKENS), 4)
            mix["gld_bytes"][width] = mix["gld_bytes"].get(width, 0) + 1
        elif tok[0] in ("UTMALDG", "UBLKCP"):  # TMA: the copy size is in a descriptor
            mix["gld_bytes"]["tma"] = mix["gld_bytes"].get("tma", 0) + 1
        else:
            key = {"LDS": "lds", "LDSM": "ldsm", "SHFL": "shfl", "BAR": "bar", "STL": "stl",
                   "LDL": "ldl"}.get(tok[0], "ex2" if op.startswith("MUFU.EX2") else None)
            if key:
                mix[key] += 1
    mix["insts_per_mma"] = round(mix["insts"] / mix["mma"], 2) if mix["mma"] else None
    return mix


# Little's law for the memory-bound estimate: bytes that must be in flight per SM to reach the
# copy bandwidth (H100 SXM: ~3.0 TB/s at ~600 ns load latency, over 132 SMs).
COPY_BYTES_PER_S, LOAD_LATENCY_S, SMS = 3.0e12, 600e-9, 132
NEEDED_IN_FLIGHT_PER_SM = COPY_BYTES_PER_S * LOAD_LATENCY_S / SMS
REG = re.compile(r"\bR(\d+)\b")
STORE_OPS = ("STG", "STS", "ST", "STL", "RED", "REDG", "ATOM", "ATOMG", "ATOMS")


def _load_width(op):
    return next((WIDTH_TOKENS[t] for t in op.split(".")[1:] if t in WIDTH_TOKENS), 4)


def loads_in_flight(insns):
    """(bytes, 16-byte loads) of the largest batch of global loads one thread issues in a basic
    block before any instruction reads a register one of them writes: what it has in flight."""
    best = (0, 0)
    for start, (end, _) in basic_blocks(insns).items() if insns else ():
        pending, nbytes, n16 = set(), 0, 0
        for i in range(start, end):
            op, regs = insns[i][2], [int(r) for r in REG.findall(insns[i][3])]
            base = op.split(".")[0]
            sources = regs if base in STORE_OPS else regs[1:]
            if pending & set(sources):  # the first use: the batch ends here
                best = max(best, (nbytes, n16))
                pending, nbytes, n16 = set(), 0, 0
            if base == "LDG" and regs:
                width = _load_width(op)
                pending |= set(range(regs[0], regs[0] + max(1, width // 4)))
                nbytes, n16 = nbytes + width, n16 + (width == 16)
        best = max(best, (nbytes, n16))
    return {"bytes": best[0], "loads16": best[1]}


def memory_estimate(kernel):
    """Bytes in flight per SM and the share of copy bandwidth Little's law allows them."""
    occ = kernel["occupancy"] or {}
    per_sm = kernel["in_flight"]["bytes"] * occ.get("warps_per_sm", 0) * 32
    return {"in_flight_per_sm": per_sm, "bw_share": round(min(1.0, per_sm / NEEDED_IN_FLIGHT_PER_SM), 3)}


def _width_order(w):
    return (w == "tma", 0 if w == "tma" else w)


def main_loop(loops):
    """The loop whose body issues the tensor-core work, and its MMA-free inner loops; None
    without MMA loops. That is the innermost loop holding MMAs (one that holds no MMA-holding
    loop) with the most MMAs; among equals, the one with the fewest instructions: kernels that
    compile the same tile step twice, maskless and masked, run the maskless one on all but the
    edge tiles (the masked copy is listed with --loops)."""
    def holds_mma_loop(lp):
        return any(o is not lp and o["header"] in lp["blocks"] and o["mma"] for o in loops)

    inner = [lp for lp in loops if lp["mma"] and not holds_mma_loop(lp)]
    if not inner:
        return None
    m = min(inner, key=lambda lp: (-lp["mma"], lp["insts"]))
    inner = [lp for lp in loops if lp is not m and lp["header"] in m["blocks"] and not lp["mma"]]
    return {**_public(m), "mma_free_inner_loops": [_public(lp) for lp in inner]}


def _public(loop):
    return {k: v for k, v in loop.items() if k not in ("blocks", "header")}


# ---------------------------------------------------------------- resources and occupancy
def occupancy(arch, regs, smem, threads, smem_static=0):
    """CTAs and warps per SM, and the limiting resource (as the CUDA occupancy calculator)."""
    if not threads:
        return None
    family = arch[:5] if arch[:5] in SMEM_PER_SM else "sm_80"
    # sm_90 cubins already count the 1 KB per-CTA reservation in a kernel's static shared size
    # (a 2 KB __shared__ array shows as 3 KB) whenever the kernel uses shared memory at all
    reserved = 0 if family == "sm_90" and smem_static else SMEM_PER_CTA_RESERVED
    warps = -(-threads // 32)
    regs_per_warp = -(-max(regs, 1) * 32 // REG_GRANULE) * REG_GRANULE
    # registers are split over the SM's four sub-partitions; a warp lives in one of them
    by_regs = (REGS_PER_SM // SUBPARTITIONS // regs_per_warp) * SUBPARTITIONS // warps
    smem_cta = -(-smem // SMEM_GRANULE) * SMEM_GRANULE + reserved
    by_smem = SMEM_PER_SM[family] // smem_cta if smem <= SMEM_PER_CTA[family] else 0
    limits = {"regs": by_regs if regs <= REGS_PER_THREAD else 0, "smem": by_smem,
              "warps": WARPS_PER_SM // warps, "ctas": CTAS_PER_SM}
    ctas = min(limits.values())
    return {"threads": threads, "ctas_per_sm": ctas, "warps_per_sm": ctas * warps,
            "limited_by": [k for k, v in limits.items() if v == ctas]}


def parse_res_usage(lines):
    res, key = {}, None
    for module, line in lines:
        if line.startswith(" Function "):
            key = (module, line.split()[1].rstrip(":"))
        elif key and "REG:" in line:
            res[key] = {k.lower(): int(v) for k, v in re.findall(r"(\w+):(\d+)", line)
                        if k in ("REG", "STACK", "SHARED", "LOCAL")}
            key = None
    return res


def parse_block_sizes(lines):
    """{(module, mangled): threads} from REQNTID / MAX_THREADS (launch bounds) in .nv.info."""
    sizes, key, attr = {}, None, None
    for module, line in lines:
        if line.startswith("."):  # a section: only .nv.info.<kernel> holds its attributes
            info = line.startswith(".nv.info.")
            key = (module, line[len(".nv.info."):].strip()) if info else None
        elif key and "Attribute:" in line:
            attr = line.split()[-1]
        elif key and attr in ("EIATTR_REQNTID", "EIATTR_MAX_THREADS") and "Value:" in line:
            x, y, z = (int(v, 16) for v in line.split()[1:4])
            if attr == "EIATTR_REQNTID" or key not in sizes:
                sizes[key] = x * y * z
            attr = None
    return sizes


def demangle(names):
    """Through c++filt where there is one (one name per line in, one out); else mangled."""
    tool, out = shutil.which("c++filt"), []
    if tool and names:
        out = subprocess.run([tool], input="\n".join(names), capture_output=True,
                             text=True).stdout.splitlines()
    return dict(zip(names, out if len(out) == len(names) else names))


@lru_cache(maxsize=8)
def _arch_report(so, mtime, arch, tool):
    with tempfile.TemporaryDirectory() as tmp:  # one snapshot, even if a rebuild replaces it
        so = shutil.copy(so, tmp)
        sass = parse_sass(tool_lines(tool, "-sass", "-arch", arch, so))
        res = parse_res_usage(tool_lines(tool, "-res-usage", "-arch", arch, so))
        sizes = parse_block_sizes(tool_lines(tool, "-elf", "-arch", arch, so))
    names = demangle([m for _, m in sass])
    out = []
    for (module, mangled), insns in sass.items():
        loops = find_loops(insns)
        r = res.get((module, mangled), {})
        out.append({"arch": arch, "module": module, "name": names[mangled], "mangled": mangled,
                    "regs": r.get("reg"), "smem_static": r.get("shared"),
                    "local_bytes": r.get("local"), "stack_bytes": r.get("stack"),
                    "launch_bound_threads": sizes.get((module, mangled)),
                    **{k: v for k, v in insn_mix(insns).items() if k != "insts_per_mma"},
                    "loops": [_public(lp) for lp in loops], "main_loop": main_loop(loops),
                    "in_flight": loads_in_flight(insns)})
    return out


def sass_archs(so, tool):
    return sorted({m[1] for _, line in tool_lines(tool, "-lelf", so)
                   if (m := re.search(r"\.(sm_\w+)\.cubin", line))})


def report(so=None, archs=None, pattern=None, threads=None, dyn_smem=0):
    """One dict per kernel and arch; occupancy uses the launch bound, else `threads`."""
    so, tool = so or default_extension(), find_tool()
    if not so or not os.path.exists(so):
        raise FileNotFoundError(f"no extension binary at {so!r}")
    if not tool:
        raise FileNotFoundError("cuobjdump not found (set FASTLM_CUOBJDUMP)")
    so = os.path.abspath(so)
    out = []
    for arch in archs or sass_archs(so, tool):
        for k in _arch_report(so, os.stat(so).st_mtime_ns, arch, tool):
            # the module (source file stem) counts too: `attention` has kernels named attn::
            if pattern and not any(re.search(pattern, t or "") for t in (k["name"], k["module"])):
                continue
            block = k["launch_bound_threads"] or threads
            static = k["smem_static"] or 0
            occ = occupancy(arch, k["regs"] or 0, static + dyn_smem, block, static)
            out.append({**k, "occupancy": occ})
    return out


def memory_figures(pattern, arch, so=None):
    """{kernel name: figures} of memory-bound kernels: global load widths (bytes: count), bytes and
    16-byte loads in flight per thread, registers, spills (STL + LDL), warps per SM and the
    Little's-law share of copy bandwidth."""
    out = {}
    for k in report(so, [arch], pattern):
        occ = k["occupancy"] or {}
        out[k["name"]] = {"load_widths": k["gld_bytes"], "in_flight": k["in_flight"]["bytes"],
                          "loads16_in_flight": k["in_flight"]["loads16"], "regs": k["regs"],
                          "spills": k["stl"] + k["ldl"], "warps_per_sm": occ.get("warps_per_sm"),
                          **memory_estimate(k)}
    return out


def main_loop_figures(pattern, arch, so=None):
    """{kernel name: (instructions per MMA, global load widths in bytes, MMA-free inner loops)}
    of each kernel's main loop, for tests that hold a kernel rewrite to its targets."""
    figures = {}
    for k in report(so, [arch], pattern):
        m = k["main_loop"]
        figures[k["name"]] = (m["insts_per_mma"], sorted(m["gld_bytes"], key=_width_order),
                              len(m["mma_free_inner_loops"])) if m else None
    return figures


# ---------------------------------------------------------------- output
def short(name):
    """`void ns::(anonymous namespace)::f<__nv_bfloat16, 128>(Params)` -> `f<bfloat16, 128>`"""
    name = re.sub(r"^void |\(anonymous namespace\)::|\w+::|__nv_", "", name)
    return name[:name.rindex(">") + 1] if ">" in name else name.split("(")[0]


def widths(d):
    return " ".join(f"{k}{'B' * (k != 'tma')}:{d[k]}" for k in sorted(d, key=_width_order)) or "-"


def print_table(kernels, show_loops=False):
    cols = "arch module kernel regs smem stl/ldl thr cta/SM w/SM loops main:ins mma op ins/mma free"
    fmt = "{:7}{:14}{:44}" + "{:>5}{:>7}{:>8}{:>5}{:>7}{:>5}{:>6}{:>9}{:>5}{:>6}{:>8}{:>5}  {}"
    print(fmt.format(*cols.split(), "main-loop global loads"))
    for k in kernels:
        occ, m = k["occupancy"] or {}, k["main_loop"] or {}
        row = [k["arch"], k["module"], short(k["name"])[:43], k["regs"], k["smem_static"],
               f"{k['stl']}/{k['ldl']}", occ.get("threads"), occ.get("ctas_per_sm"),
               occ.get("warps_per_sm"), len(k["loops"]), m.get("insts"), m.get("mma"),
               "+".join(m.get("mma_ops", {})), m.get("insts_per_mma"), m and len(m["mma_free_inner_loops"]),
               m and widths(m["gld_bytes"])]
        print(fmt.format(*("-" if v is None or v == {} else v for v in row)))
        for lp in k["loops"] if show_loops else []:
            print(f"{'':9}loop {lp['start']:#07x}-{lp['end']:#07x} depth {lp['depth']} "
                  f"ins {lp['insts']} mma {lp['mma']} ins/mma {lp['insts_per_mma'] or '-'} "
                  f"gld {widths(lp['gld_bytes'])} lds {lp['lds']} ldsm {lp['ldsm']} "
                  f"shfl {lp['shfl']} bar {lp['bar']} ex2 {lp['ex2']}")


def print_memory_table(kernels):
    fmt = "{:7}{:14}{:48}{:>5}{:>8}{:>5}{:>9}{:>7}{:>9}{:>7}  {}"
    print(fmt.format("arch", "module", "kernel", "regs", "stl/ldl", "w/SM", "B/thread", "16B/t",
                     "KB/SM", "share", "global loads"))
    for k in kernels:
        est, occ = memory_estimate(k), k["occupancy"] or {}
        print(fmt.format(k["arch"], k["module"] or "-", short(k["name"])[:47], k["regs"] or "-", f"{k['stl']}/{k['ldl']}",
                         occ.get("warps_per_sm", "-"), k["in_flight"]["bytes"], k["in_flight"]["loads16"],
                         round(est["in_flight_per_sm"] / 1024, 1), f"{100 * est['bw_share']:.0f}%",
                         widths(k["gld_bytes"])))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("so", nargs="?", help="extension binary (default: the installed fastlm._C)")
    ap.add_argument("--arch", action="append", help="sm_80, sm_90a (default: every SASS arch)")
    ap.add_argument("--kernel", help="regex on the demangled kernel name or its source file")
    ap.add_argument("--threads", type=int, help="block size where no launch bound is compiled in")
    ap.add_argument("--dyn-smem", type=int, default=0, help="dynamic shared memory per CTA, bytes")
    ap.add_argument("--loops", action="store_true", help="list every loop")
    ap.add_argument("--memory", action="store_true", help="memory-bound figures: loads in flight, share of bandwidth")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    kernels = report(a.so, a.arch, a.kernel, a.threads, a.dyn_smem)
    if a.json:
        json.dump(kernels, sys.stdout, indent=1, default=str)
        print()
    elif a.memory:
        print_memory_table(kernels)
    else:
        print_table(kernels, a.loops)
    return 0 if kernels else 1


if __name__ == "__main__":
    sys.exit(main())
