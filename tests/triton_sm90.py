"""Compile-only build of every Triton kernel in fusedreg/triton for sm_90, without a GPU.

`python tests/triton_sm90.py REPORT.json` (tests/test_triton_sm90.py runs it in a subprocess and
checks the report). For the run, triton's JITFunction.run is replaced by a stand-in that binds the
arguments with Triton's own binder (create_function_from_signature + _pack_args: int arguments equal
to 1 become constexprs, pointers and ints divisible by 16 get tt.divisibility), then triton.compile()s
the kernel for GPUTarget("cuda", 90, 32) instead of launching it; ptxas ships in the triton wheel.
The launchers are driven through their registered ops with CPU tensors (_common.compile_only lets
them take CPU tensors without the interpreter) over the matrix of cases() in
tests/test_triton_sm90.py, so what is compiled is exactly what each launcher specialises. Identical
specialisations compile once.

Each compiled kernel is summarised: registers and local memory (spills) from cuobjdump -res-usage,
the vector widths of its global loads and stores from the PTX, and the places where an address
offset comes from a 32-bit product of the program id (TTIR dataflow, int32_pid_offsets).

Trade-off: kernels are JITFunctions only when TRITON_INTERPRET is unset at import, hence a separate
process. Nothing runs: this proves what the compiler accepted and emitted, not that results are
right (the interpreter and GPU tests do that).
"""
from __future__ import annotations

import contextlib
import importlib
import json
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
import traceback

TARGET_SMS = 132  # H100 SXM / H200: the launchers size their grids from the SM count

_SSA = re.compile(r"%[\w$.-]+")                    # a value; "#1" (result index) stays outside
_LOC = re.compile(r"loc\((?:[^()]|\((?:[^()]|\([^()]*\))*\))*\)")
_I32 = re.compile(r":\s*(?:tensor<(?:\d+x)*)?i32>?\s*$")
_ACCESS = re.compile(r"\b(ld|st)\.global((?:\.[\w:]+)*)")


def int32_pid_offsets(ttir: str) -> list[str]:
    """Source locations of 32-bit products (arith.muli / shli on i32) of a value derived from
    tt.get_program_id that reach a tt.addptr offset: `tl.program_id(0) * BLOCK` style offsets,
    which wrap once the product passes 2**31. A deliberate narrowing (arith.trunci) ends the
    program-id dependence; a loaded value starts none. One pass in text order: SSA defines before
    use, except loop-carried values, which no offset here depends on."""
    locs = dict(re.findall(r"^(#loc\d*) = (.*)$", ttir, flags=re.M))
    pid, product_at, found = set(), {}, set()  # product_at: value -> where its 32-bit product is
    for line in ttir.splitlines():
        ref = re.search(r"loc\((#loc\d*)\)[\s{]*$", line)
        code = _LOC.sub("", re.sub(r'"[^"]*"', '""', line))
        head = re.match(r"\s*(%[\w$.-]+)(?::\d+)?\s*=\s*([\w.]+)", code)
        op = head.group(2) if head else (code.split() or [""])[0]
        defined = set(re.findall(r"(%[\w$.-]+)(?::\d+)?\s*=", code))  # results, loop ivs, iter_args
        used = set(_SSA.findall(code)) - defined
        if op == "tt.get_program_id":
            pid |= defined
        elif op not in ("arith.trunci", "tt.load") and used & pid:
            pid |= defined
        origins = sorted(product_at[v] for v in used if v in product_at)
        if op in ("arith.muli", "arith.shli") and _I32.search(code) and used & pid:
            product_at.update(dict.fromkeys(defined, _source(ref.group(1) if ref else None, locs)))
        elif origins and op != "tt.load":
            product_at.update(dict.fromkeys(defined, origins[0]))
            if op == "tt.addptr":
                found.update(origins)
    return sorted(found)


def _source(ref: str | None, locs: dict[str, str], depth: int = 0) -> str:
    """file:line of a #loc reference (following name and call-site locations)."""
    text = locs.get(ref or "", "")
    m = re.search(r'"([^"]+\.py)":(\d+)', text)
    if m:
        return f"{os.path.basename(m.group(1))}:{m.group(2)}"
    inner = re.search(r"(#loc\d*)", text)
    return _source(inner.group(1), locs, depth + 1) if inner and depth < 20 else "?"


def vector_accesses(ptx: str) -> dict[str, list[int]]:
    """Byte widths of the vector (.vN) global loads and stores in the PTX."""
    widths = {"ld": [], "st": []}
    for kind, mods in _ACCESS.findall(ptx):
        vec = re.search(r"\.v(\d+)", mods)
        bits = re.search(r"\.[bfsu](\d+)\b", mods)
        if vec and bits:
            widths[kind].append(int(vec.group(1)) * int(bits.group(1)) // 8)
    return widths


def resource_usage(cubin: bytes, cuobjdump: str) -> dict[str, int]:
    """REG, STACK, LOCAL (bytes of local memory per thread: spills) of the cubin's one kernel."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([cuobjdump, "-res-usage", f.name], check=True, capture_output=True,
                             text=True).stdout
    return {k.lower(): int(v) for k, v in re.findall(r"\b(REG|STACK|LOCAL):(\d+)", out)}


class Compiler:
    """The stand-in for JITFunction.run: bind as Triton does, compile for sm_90, record, return."""

    def __init__(self):
        import triton
        from triton import knobs
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource, make_backend
        from triton.runtime.jit import create_function_from_signature

        self.triton, self.knobs, self.ASTSource = triton, knobs, ASTSource
        self.target = GPUTarget("cuda", 90, 32)
        self.backend = make_backend(self.target)
        self.make_binder = lambda fn: create_function_from_signature(fn.signature, fn.params, self.backend)
        self.cuobjdump = knobs.nvidia.cuobjdump.path
        self.binders, self.index, self.kernels = {}, {}, []
        self.launched: list[int] | None = None  # kernel indices launched by the current case

    def run(self, fn, args, kwargs):
        # as JITFunction.run: these two options take part in the specialisation
        kwargs["debug"] = kwargs.get("debug", fn.debug) or self.knobs.runtime.debug
        kwargs["instrumentation_mode"] = self.knobs.compilation.instrumentation_mode
        binder = self.binders.get(fn)
        if binder is None:
            binder = self.binders[fn] = self.make_binder(fn)
        bound, specialization, options = binder(*args, **kwargs)
        key = (fn.module, fn.__name__, repr(specialization), repr(sorted(options.items())))
        index = self.index.get(key)
        if index is None:
            index = self.index[key] = len(self.kernels)
            self.kernels.append(self._compile(fn, kwargs, bound, specialization, options))
        if self.launched is not None:
            self.launched.append(index)

    def _compile(self, fn, kwargs, bound, specialization, options) -> dict:
        options, signature, constexprs, attrs = fn._pack_args(self.backend, kwargs, bound, specialization, options)
        names = fn.arg_names
        record = {
            "name": fn.__name__,
            "module": fn.module,
            "types": {n: t for n, t in signature.items() if t != "constexpr"},
            # not declared constexpr, but specialised to one (an int equal to 1, or None)
            "ones": [p.name for p in fn.params if not p.is_constexpr and signature[p.name] == "constexpr"],
            "divisible16": sorted(names[path[0]] for path, a in attrs.items()
                                  if any(x[0] == "tt.divisibility" for x in a)),
        }
        try:
            src = self.ASTSource(fn, signature, constexprs, attrs)
            kernel = self.triton.compile(src, target=self.target, options=options.__dict__)
            record.update(resource_usage(kernel.asm["cubin"], self.cuobjdump),
                          vector=vector_accesses(kernel.asm["ptx"]),
                          int32_pid_offsets=int32_pid_offsets(kernel.asm["ttir"]), error=None)
        except Exception as exc:  # recorded: the launcher goes on to its next kernel
            record["error"] = "".join(traceback.format_exception_only(type(exc), exc))[-3000:]
        return record


def kernel_names() -> list[str]:
    """module.name of every Triton kernel (a JITFunction named *_kernel) in fusedreg.triton."""
    import triton
    import fusedreg.triton as package

    found = []
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"fusedreg.triton.{info.name}")
        found += [f"{module.__name__}.{n}" for n, v in vars(module).items()
                  if isinstance(v, triton.runtime.JITFunction) and n.endswith("_kernel")]
    return sorted(found)


def main(report_path: str) -> None:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import triton
    from triton.runtime.jit import JITFunction

    import fusedreg  # noqa: F401  defines the op schemas
    from fusedreg.triton import _common, batch_norm
    import test_triton_sm90

    if _common.interpreted():
        raise SystemExit("TRITON_INTERPRET is set: kernels are not JITFunctions, nothing would compile")

    compiler = Compiler()
    JITFunction.run = lambda fn, *args, grid, warmup, **kwargs: compiler.run(fn, args, kwargs)
    _common.compile_only = True
    # CPU tensors would get the interpreter's split counts; compile the GPU's
    batch_norm._target_programs = lambda device: batch_norm._PROGRAMS_PER_SM * TARGET_SMS
    names = kernel_names()  # imports (and so registers) every fusedreg.triton module

    cases = []
    for label, call, expect in test_triton_sm90.cases():
        compiler.launched = []
        error = None
        try:
            call()
        except Exception:
            error = traceback.format_exc()[-3000:]
        cases.append({"label": label, "kernels": sorted(set(compiler.launched)), "error": error,
                      "vector": expect.get("vector", {}), "scalar": expect.get("scalar", {})})
    with open(report_path, "w") as f:
        json.dump({"triton": triton.__version__, "kernel_names": names, "kernels": compiler.kernels,
                   "cases": cases}, f, indent=1)


if __name__ == "__main__":
    with contextlib.redirect_stdout(sys.stderr):  # ptxas failures print the PTX: keep stdout clean
        main(sys.argv[1])
