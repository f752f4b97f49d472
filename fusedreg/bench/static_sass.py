"""`fusedreg bench --static`: the issue budget of the CUDA kernels, read from their sm_90 SASS.

No GPU needed: the sm_90 objects of fusedreg_cuda (the build cache's, brought up to date first) are
disassembled with cuobjdump. Per hot kernel and dtype the report gives registers, local-memory
instructions (spills), whether the aligned path moves its data with 128-bit LDG/STG, and the SASS
instructions issued per element in its steady-state loop, against the H200's issue budget at the
memory floor: 132 SMs x 4 schedulers x 32 lanes x 1.98 GHz / (4.3 TB/s / bytes per element).

How sass_cfg.py finds the steady state (generically, so the kernels may change under it):
- A CFG per function from the branch targets; CALL falls through (its callees are the slow paths
  of IEEE division and sqrt); code unreachable from the entry (subroutines, the trailing
  self-branch) is ignored. Loops are natural loops: a branch back to a block that dominates it.
- Hot loops are the innermost loops with a 128-bit access (LDG/STG/LDS/STS .128). An iteration's
  path runs from the header to the back edge, chosen by (most 128-bit accesses, fewest blocks that
  CALL a slow path, most instructions): the full vector path, and on rare branches the longer
  side, so the count is an upper bound. The path that also avoids narrower global loads (a bias
  column, reloaded coefficients) is reported as a variant when it keeps every vector access.
- Elements per iteration: each 128-bit access carries 16 bytes of one operand, so a kind of
  access (LDG, STG, LDS/STS) gives 16 x count / (bytes per element the op moves that way: reads,
  writes, or the on-chip cache). The largest is the iteration's elements; a kind that implies
  fewer is only partly vectorised ("part"). Unrolling by the compiler changes nothing.
- Loops with the same kinds are alternatives (remainder loops, runtime-chosen variants such as
  dropout's p = 0 and p = 1 loops, which run no Philox): the one with the most elements per
  iteration counts, ties to the dearer. Loops of different kinds are successive passes over the
  same elements (on-chip BatchNorm): their instr/elem add up. Dropout's vector kernel for operands
  that share an offset from a 16-byte boundary ("peeled head": the elements before the boundary
  are edges, one per thread, and a unit may straddle one more Philox group, with one loop per
  skew of the unit within its first group) is listed on its own.
- Check: the global bytes the counted loops move with 128-bit accesses per element must equal the
  op's floor (reads + writes); a mismatch means a scalar access on the hot path.

Trade-off: static counts ignore latency, dual issue and how often a rare branch runs; they bound
the issue cost, and a kernel near 100% of its budget is compute-bound whatever its bytes.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .sass_cfg import CFG, Function, Loop, elems_per_iter, parse_sass, vector_loops

SMS, SCHEDULERS, LANES, CLOCK_HZ, COPY_BPS = 132, 4, 32, 1.98e9, 4.3e12  # H200
_ELEM = {"float": 4, "double": 8, "c10::BFloat16": 2, "c10::Half": 2}
_DTYPE = {"float": "float32", "double": "float64", "c10::BFloat16": "bfloat16", "c10::Half": "float16"}


def budget(bytes_per_elem: float) -> float:
    """Instructions per element an H200 issues while its copy bandwidth moves the bytes."""
    return SMS * SCHEDULERS * LANES * CLOCK_HZ * bytes_per_elem / COPY_BPS


# ----------------------------------------------------------------------------- which kernel is what

@dataclass
class Kernel:
    op: str
    dtype: str
    reads: int = 0    # global bytes per element read (the floor's; a bias column is not counted)
    writes: int = 0   # ... and written
    cached: int = 0   # shared-memory bytes per element (on-chip paths)
    variant: str | None = None  # the row name of the path without side loads
    others: str = "alternative loop"  # what the kernel's cheaper loops of the same kind are

    @property
    def floor(self) -> int | None:
        return self.reads + self.writes or None  # None: no elementwise work to budget


def _enums() -> dict[str, list[str]]:
    """csrc's `enum class`es, so that (Pass)2 in a demangled name reads Pass::kBackwardEval."""
    from fusedreg import _build

    found = {}
    for path in _build.csrc_dir().rglob("*"):
        if path.suffix in (".h", ".cuh", ".cu"):
            for name, body in re.findall(r"enum class (\w+)[^{;]*\{([^}]*)\}", path.read_text()):
                found[name] = [e.split("=")[0].strip() for e in body.split(",") if e.strip()]
    return found


def template(demangled: str, enums: dict | None = None) -> tuple[str, list[str]]:
    """'void ns::name<a, f<b, c>, (ns::E)1>(...)' -> ('name', ['a', 'f<b, c>', 'E::k1'])."""
    enums = _enums() if enums is None else enums

    def enumerator(m):
        names = enums.get(m[1], [])
        return f"{m[1]}::{names[int(m[2])] if int(m[2]) < len(names) else m[2]}"

    head = re.sub(r"\((?:\w+::)*(\w+)\)(\d+)", enumerator,
                  demangled.replace("(anonymous namespace)::", "")).removeprefix("void ")
    lt = head.find("<")
    if lt < 0:
        return head.split("(")[0].split("::")[-1], []
    args, depth, cur = [], 0, ""
    for ch in head[lt + 1:]:
        if ch == ">" and depth == 0:
            break
        depth += {"<": 1, ">": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            args, cur = args + [cur.strip()], ""
        else:
            cur += ch
    return head[:lt].split("::")[-1], args + [cur.strip()]


def classify(demangled: str, enums: dict | None = None) -> Kernel | bool | None:
    """The op a kernel instantiation implements and the bytes it must move per element; False for
    a fallback instantiation (misaligned operands, element-wise: no 128-bit path to budget); None
    when unknown."""
    try:
        return _classify(*template(demangled, enums), enums)
    except (IndexError, KeyError):  # template arguments changed: unknown until taught here
        return None


def _classify(name: str, args: list[str], enums: dict | None) -> Kernel | bool | None:
    types = [t for a in args for t in re.findall(r"c10::BFloat16|c10::Half|\bdouble\b|\bfloat\b", a)]
    if not types:
        return None
    e, dt = _ELEM[types[0]], _DTYPE[types[0]]
    vec = len(args) > 1 and args[1] == str(16 // e)  # BatchNorm's V: the 16-byte instantiation
    layout = "rows" if "rows" in name or (len(args) > 2 and args[2] == "true") else "planes"
    flag = [a == "true" for a in args]
    if name == "dropout_fwd_kernel":  # <scalar_t, kAdd, kFast, kVec>
        if not flag[3]:
            return False  # the scalar kernel: operands at different offsets within 16 bytes
        # The vector kernel takes operands that share an offset from a 16-byte boundary: the head
        # before it is peeled off as edge elements, and its units straddle one Philox group more.
        peeled = "" if flag[2] else ", peeled head"
        # Its other loops are the RNG modes': p = 0 (keep all) and p = 1 (drop all) run no Philox;
        # the vector kernel has one Philox loop per skew (lead % 4) as well.
        rng_free = "p = 0 or p = 1 loop, no Philox" + ("" if flag[2] else "; or another skew's loop")
        if flag[1]:
            return Kernel(f"dropout_add +bias{peeled}", dt, 2 * e, e, variant=f"dropout_add, no bias{peeled}",
                          others=rng_free)
        return Kernel(f"dropout (fwd = bwd){peeled}", dt, e, e, others=rng_free)
    if name == "adamw_kernel":
        es, ams = _ELEM[types[1]], args[0] == "5"
        states = "" if types[1] == types[0] else f" ({_DTYPE[types[1]]} states)"
        moments = (3 if ams else 2) * es  # m, v (and max_v) read and written
        sr = " +SR" if len(args) > 3 and args[3] == "true" else ""  # stochastic-rounding variant
        return Kernel("adamw" + " amsgrad" * ams + sr, dt + states, 2 * e + moments, e + moments)
    if name == "multi_tensor_apply_kernel" and len(args) == 3:
        functor, fargs = template(args[2], enums)
        if functor == "ChunkPowSumFunctor":
            return Kernel(f"clip norm {fargs[1].split('::')[-1].removeprefix('k')}", dt, e)
        return Kernel("clip scale", dt, e, e) if functor == "ScaleFunctor" else None
    if name == "combine_partials_kernel":
        return Kernel(f"clip combine ({template(args[1], enums)[0]})", dt)
    if name == "bn_finalize_kernel":
        return Kernel(f"bn finalize {'bwd' if flag[1] else 'fwd'}", dt)
    if name.startswith("bn_") and not vec:
        return False
    if name == "bn_reduce_kernel":
        return Kernel(f"bn {'bwd reduce' if flag[3] else 'fwd stats'} (split), {layout}", dt, (2 if flag[3] else 1) * e)
    if name in ("bn_elemt_planes_kernel", "bn_elemt_rows_kernel"):
        what, reads = {"kForward": ("fwd (eval; split 2nd pass)", e), "kBackward": ("bwd", 2 * e),
                       "kBackwardEval": ("bwd eval", e)}[args[2].split("::")[-1]]
        op = f"bn elementwise {what}, {layout}"
        return Kernel(op, dt, reads, e, variant=f"{op} (coefficients kept)")
    if name == "bn_onchip_kernel":
        reads = (2 if flag[3] else 1) * e
        return Kernel(f"bn on-chip {'bwd' if flag[3] else 'fwd'}, {layout}", dt, reads, e, cached=reads)
    return None


# ----------------------------------------------------------------------------- tools and objects

def _tool(name: str) -> str | None:
    """`name` from the CUDA toolkit fusedreg builds with, else PATH, else the triton wheel's copy."""
    from fusedreg import _build

    home = _build.cuda_home()
    candidates = [os.path.join(home, "bin", name)] if home else []
    candidates.append(shutil.which(name) or "")
    spec = importlib.util.find_spec("triton")
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidates.append(os.path.join(location, "backends", "nvidia", "bin", name))
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def missing_tools() -> str | None:
    """Why the analysis cannot run here, or None."""
    from fusedreg import _build

    if _tool("cuobjdump") is None:
        return "no cuobjdump (CUDA toolkit, PATH or triton/backends/nvidia/bin)"
    if _tool("cu++filt") is None and shutil.which("c++filt") is None:
        return "no cu++filt or c++filt to demangle kernel names"
    return _build.unbuildable_reason("cuda")


def sm90_objects(log=print) -> list[Path]:
    """The sm_90 objects of fusedreg_cuda (one per csrc/*.cu) in the build cache, brought up to
    date first (ninja recompiles only what changed). A cache built for other GPUs gets an sm_90
    sibling."""
    from fusedreg import _build

    root, arch = _build.cache_root(), _build.cuda_arch_list()
    has_sm90 = any(a.strip().startswith("9.0") for a in re.split(r"[; ]", arch))
    return _build.built_objects("cuda", root if has_sm90 else root / "static-sass-sm90",
                                arch if has_sm90 else "9.0",
                                on_build=lambda d: log(f"building the sm_90 objects of {d.name} into {d} ..."))


def _run(cmd: list[str], stdin: str | None = None) -> str:
    return subprocess.run(cmd, input=stdin, capture_output=True, text=True, check=True, timeout=600).stdout


def _demangle(names: list[str]) -> list[str]:
    out = _run([_tool("cu++filt") or shutil.which("c++filt")], "\n".join(names) + "\n").splitlines()
    return out if len(out) == len(names) else names


def _resource_usage(text: str) -> dict[str, dict[str, int]]:
    """`cuobjdump --dump-resource-usage`: mangled name -> {REG, STACK, SHARED, LOCAL, ...}."""
    usage, name = {}, None
    for line in text.splitlines():
        if m := re.match(r"\s*Function (\S+):", line):
            name = m[1]
        elif name and "REG:" in line:
            usage[name], name = {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", line)}, None
    return usage


# ----------------------------------------------------------------------------- analysis

def _passes(loops: list[Loop], kernel: Kernel) -> tuple[list, list[str]]:
    """[(loop, elems/iter, share per kind)] counted for the kernel, and notes on the loops left out:
    loops with the same kinds of vector access are alternatives, the most elements per iteration
    (then the dearest) counts; different kinds are successive passes."""
    by_kind = {"reads": kernel.reads, "writes": kernel.writes, "cached": kernel.cached}
    groups: dict[frozenset, list] = {}
    for lp in loops:
        elems, share = elems_per_iter(lp.vector, by_kind)
        if elems:
            groups.setdefault(frozenset(lp.vector), []).append((lp, elems, share))
    chosen, notes = [], []
    for group in groups.values():
        best = max(group, key=lambda t: (t[1], t[0].instrs / t[1]))
        chosen.append(best)
        notes += [f"also {lp.instrs}/{elems} ({kernel.others})" for lp, elems, _ in group
                  if lp is not best[0] and elems == best[1]]  # remainder loops (fewer elements) unsaid
    return sorted(chosen, key=lambda t: t[0].header_addr), notes


def _coverage(chosen: list, kind: str, needed: int) -> str:
    shares = [share[kind] for _, _, share in chosen if kind in share]
    return "n/a" if not needed else "NO" if not shares else "yes" if min(shares) > 0.999 else "part"


def analyse_kernel(fn: Function, kernel: Kernel, usage: dict) -> list[dict]:
    """The kernel's row, and its variant's (the path without side loads) when it has one."""
    cfg = CFG(fn.instrs)
    loops = vector_loops(cfg)
    chosen, notes = _passes(loops, kernel)
    local = sum(i.base in ("LDL", "STL") for i in fn.instrs)
    spills = sum(i.base in ("LDL", "STL") for b in cfg.dom for i in cfg.blocks[b])  # in the kernel body
    row = {"kernel": kernel.op, "dtype": kernel.dtype, "regs": usage.get("REG"), "stack": usage.get("STACK"),
           "spills": spills, "subroutine_spills": local - spills, "bytes_per_elem": kernel.floor,
           "vec": f"{_coverage(chosen, 'reads', kernel.reads)}/{_coverage(chosen, 'writes', kernel.writes)}"
           if kernel.floor else None, "mangled": fn.name,
           "loops": [{"header": f"{lp.header_addr:#x}", "instrs": lp.instrs, "vector": lp.vector, "calls": lp.calls,
                      "local": lp.local, "variant_instrs": lp.variant_instrs} for lp in loops]}
    if not chosen:
        row["note"] = "no 128-bit loop: " + ("NOT VECTORISED" if kernel.floor else
                                             "no elementwise loop (partials / one value per channel)")
        return [row]
    notes += ["CALL on the path (callee not counted)"] * any(lp.calls for lp, _, _ in chosen)
    notes += ["LDL/STL in the loop"] * any(lp.local for lp, _, _ in chosen)
    notes += [f"{local - spills} LDL/STL in CALLed slow paths"] * (local > spills)
    row |= {"loop_instrs": [lp.instrs for lp, _, _ in chosen], "elems_per_iter": [e for _, e, _ in chosen],
            "instr_per_elem": sum(lp.instrs / e for lp, e, _ in chosen),
            "vector_global_bytes": sum(16 * (lp.vector.get("LDG", 0) + lp.vector.get("STG", 0)) / e
                                       for lp, e, _ in chosen)}
    if kernel.floor:
        row |= {"budget": budget(kernel.floor), "pct_budget": 100 * row["instr_per_elem"] / budget(kernel.floor),
                "bytes_check": abs(row["vector_global_bytes"] - kernel.floor) < 1e-6}
        if not row["bytes_check"]:
            notes.append(f"CHECK: 128-bit accesses move {row['vector_global_bytes']:g} of {kernel.floor} B/elem")
    row["note"] = "; ".join(notes)
    if all(lp.variant_instrs is None for lp, _, _ in chosen):
        return [row]
    instrs = [lp.variant_instrs or lp.instrs for lp, _, _ in chosen]
    variant = dict(row, kernel=kernel.variant or f"{kernel.op} (side loads avoided)", loop_instrs=instrs,
                   instr_per_elem=sum(i / e for i, (_, e, _) in zip(instrs, chosen)), note="")
    if kernel.floor:
        variant["pct_budget"] = 100 * variant["instr_per_elem"] / variant["budget"]
    return [row, variant]


_ORDER = ["dropout", "adamw", "clip", "bn"]
_DTYPES = ["float32", "bfloat16", "float16", "float64"]


def _order(row: dict) -> tuple:
    family = next((k for k, p in enumerate(_ORDER) if row["kernel"].startswith(p)), len(_ORDER))
    return family, row["kernel"], _DTYPES.index(row["dtype"].split()[0])


def analyse(objects: list[Path], dtypes: set[str] | None = None) -> dict:
    """Rows for every classified kernel of the objects' sm_90 code (self-test objects skipped)."""
    cuobjdump, enums = _tool("cuobjdump"), _enums()
    rows, fallbacks, unknown = [], 0, []
    for obj in objects:
        if obj.name.startswith("selftest"):
            continue
        functions = [f for f in parse_sass(_run([cuobjdump, "--dump-sass", str(obj)])) if f.arch.startswith("sm_90")]
        usage = _resource_usage(_run([cuobjdump, "--dump-resource-usage", str(obj)]))
        for fn, name in zip(functions, _demangle([f.name for f in functions])):
            kernel = classify(name, enums)
            if kernel is None:
                unknown.append(name)
            elif kernel is False:
                fallbacks += 1
            elif not dtypes or kernel.dtype.split()[0] in dtypes:
                rows += analyse_kernel(fn, kernel, usage.get(fn.name, {}))
    rows.sort(key=_order)
    return {"rows": rows, "fallback_instantiations": fallbacks, "unclassified": unknown}


# ----------------------------------------------------------------------------- report

def machine() -> dict:
    import torch

    from fusedreg import _build

    def release(tool):
        m = re.search(r"release ([\d.]+)", _run([tool, "--version"])) if tool and os.path.exists(tool) else None
        return m[1] if m else "unknown"

    nvcc = release(os.path.join(_build.cuda_home() or "", "bin", "nvcc"))
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return {"machine": f"static, sm_90 (cuobjdump, nvcc {nvcc}; {gpu})", "nvcc": nvcc, "torch": torch.__version__,
            "cuobjdump": release(_tool("cuobjdump")), "csrc_digest": _build.source_digest("cuda")[:16],
            "budget": f"{SMS} SMs x {SCHEDULERS} schedulers x {LANES} lanes x {CLOCK_HZ / 1e9:g} GHz / "
                      f"({COPY_BPS / 1e12:g} TB/s / bytes per element), H200"}


_COLUMNS = [("kernel", "kernel"), ("dtype", "dtype"), ("regs", "regs"), ("spills", "spills"),
            ("vec", "128-bit LDG/STG"), ("loop_instrs", "loop instrs"), ("elems_per_iter", "elems/iter"),
            ("instr_per_elem", "instr/elem"), ("budget", "budget"), ("pct_budget", "% budget"), ("note", "note")]


def _cell(value) -> str:
    if isinstance(value, list):
        return " + ".join(map(str, value))
    return f"{value:.1f}" if isinstance(value, float) else "—" if value is None else str(value)


def format_table(doc: dict) -> str:
    lines = [f"SASS budget, {doc['machine']}: torch {doc['torch']}, cuobjdump {doc['cuobjdump']}",
             f"budget (instr/elem) = {doc['budget']}", "",
             "| " + " | ".join(title for _, title in _COLUMNS) + " |", "|" + "---|" * len(_COLUMNS)]
    lines += ["| " + " | ".join(_cell(row.get(key)) for key, _ in _COLUMNS) + " |" for row in doc["rows"]]
    lines.append(f"\nloop instrs / elems/iter: one entry per pass (summed into instr/elem). "
                 f"{doc['fallback_instantiations']} fallback instantiations (misaligned operands, element-wise: "
                 f"BatchNorm's V = 1 kernels, dropout's scalar kernel) have no 128-bit path and are not "
                 f"listed.")
    if doc["unclassified"]:
        lines.append("UNCLASSIFIED kernels (teach classify() about them): " + "; ".join(doc["unclassified"]))
    return "\n".join(lines)


def main(json_path: str | None = None, dtypes: list | None = None) -> int:
    """`fusedreg bench --static [--dtype ...] [--json PATH]`; PATH's .md sibling gets the table."""
    reason = missing_tools()
    if reason:
        print(f"fusedreg bench --static: cannot run here: {reason}")
        return 1
    from fusedreg import _build

    names = {str(d).removeprefix("torch.") for d in dtypes} if dtypes else {"float32", "bfloat16", "float16"}
    try:
        objects = sm90_objects()
    except (_build.BuildError, FileNotFoundError) as exc:
        print(f"fusedreg bench --static: no sm_90 objects: {exc}")
        return 1
    doc = machine() | analyse(objects, names)
    table = format_table(doc)
    print(table)
    if json_path:
        path = Path(json_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(doc, indent=1) + "\n")
        method = (__doc__ or "").split("\n\n", 1)[1]
        path.with_suffix(".md").write_text(f"# Static SASS budget of the CUDA kernels\n\n{table}\n\n"
                                           f"## Method (fusedreg/bench/static_sass.py)\n\n{method}")
        print(f"\nwrote {path} and {path.with_suffix('.md')}")
    return 1 if doc["unclassified"] else 0
