"""What every Triton op module here shares: op registration, interpreter detection, and bfloat16
rounding that does not depend on the interpreter's casts."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def float32_to_bfloat16_rne(y):
    """float32 -> bfloat16 rounded to nearest even by integer ops, as torch rounds (NaN stays NaN).

    Compiled kernels get this from the hardware conversion; the interpreter's cast truncates, so
    kernels take this path only when `interpreted()`."""
    bits = y.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    rounded = tl.where(y != y, 0x7FC0, rounded)
    return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)


def interpreted() -> bool:
    """Whether kernels decorated in this process run in the Triton interpreter (TRITON_INTERPRET=1
    when fusedreg.triton was imported), the only way they take CPU tensors."""
    return not isinstance(float32_to_bfloat16_rne, triton.runtime.JITFunction)


# Set by the sm_90 compile-only check (tests/test_triton_sm90.py), which replaces kernel launches by
# compiles and so lets the launchers take CPU tensors without the interpreter.
compile_only = False


def cpu_tensors_allowed() -> bool:
    """Whether launchers may take CPU tensors: under the interpreter, or when launches only compile."""
    return compile_only or interpreted()


def registered_as(op_name: str):
    """Registers the decorated launcher as fusedreg::<op_name> for CPU and CUDA tensors and keeps it
    importable under its own name (torch.library.impl's decorator form returns None)."""
    def register(fn):
        torch.library.impl(f"fusedreg::{op_name}", ("CPU", "CUDA"), fn)
        return fn
    return register
