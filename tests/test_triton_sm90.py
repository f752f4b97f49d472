"""Every Triton kernel of fusedreg/triton compiled for sm_90 (H100/H200) with the specialisations
its launcher produces, without a GPU: the compiles succeed, nothing spills, aligned fast paths use
16-byte vector accesses, operands known misaligned at compile time (a kernel argument's address, or
a host-checked ALIGNED flag) get none, and no address offset is a 32-bit product of the program id
(which wraps past 2**31 elements).

cases() below is the matrix: each op through its registered launcher with every dtype it takes,
aligned and misaligned (odd storage offset) operands, sizes with tails, counts of exactly 1 (Triton
makes an int argument equal to 1 a constexpr, which the interpreter never does), channels_last,
the AdamW and clipping variants, BatchNorm train/eval, forward/backward, 1d/2d/3d in both layouts,
and sizes of 2**31+ elements on meta tensors (no memory behind them). tests/triton_sm90.py compiles
it in a subprocess (kernels compile only when TRITON_INTERPRET is unset, and conftest sets it on
machines without CUDA), keeping Triton's cache under .pytest_cache: about 370 specialisations, some
80 s of CPU on a cold cache, seconds on a warm one.
"""
import importlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
CL, CL3D = torch.channels_last, torch.channels_last_3d
HUGE = 2**31 + 16
_DROPOUT, _ADAMW = "_dropout_kernel", "_adamw_kernel"
_POW_SUM, _SCALE = "_pow_sum_chunks_kernel", "_scale_kernel"
_PARTIAL, _ELEMENTWISE = "_bn_partial_kernel", "_bn_elementwise_kernel"


def tensor(shape, dtype=torch.float32, fmt=None, misaligned=False, device="cpu"):
    """Uninitialised (nothing runs). fmt: channels_last(_3d); misaligned: storage offset 1."""
    order = list(range(len(shape))) if fmt is None else [0, *range(2, len(shape)), 1]
    base = torch.empty(math.prod(shape) + misaligned, dtype=dtype, device=device)[int(misaligned):]
    return base.view([shape[i] for i in order]).permute(sorted(range(len(shape)), key=order.__getitem__))


def name(dtype):
    return str(dtype).removeprefix("torch.")


def op(op_name, device="cpu"):
    """The registered op for CPU tensors; meta tensors (2**31+ elements) call the launcher itself,
    since the dispatcher would send them to the fake kernel."""
    if device == "cpu":
        return getattr(torch.ops.fusedreg, op_name + "_triton")
    module = {"dropout": "dropout", "batch": "batch_norm"}[op_name.split("_")[0]]
    return getattr(importlib.import_module(f"fusedreg.triton.{module}"), op_name)


def seed(device="cpu"):
    return torch.zeros(1, dtype=torch.int64, device=device)


def dropout_cases():
    for dtype in DTYPES:
        d = name(dtype)
        yield (f"dropout_fwd {d} aligned", lambda t=dtype: op("dropout_fwd")(tensor((64, 64), t), seed(), 0.1),
               {"vector": {_DROPOUT: "ld st"}})
        yield f"dropout_bwd {d} tail", lambda t=dtype: op("dropout_bwd")(tensor((4099,), t), seed(), 0.1), {}
        yield (f"dropout_fwd {d} misaligned", lambda t=dtype: op("dropout_fwd")(
            tensor((4096,), t, misaligned=True), seed(), 0.1), {"scalar": {_DROPOUT: "ld"}})
        yield (f"dropout_add_fwd {d} bias channels_last", lambda t=dtype: op("dropout_add_fwd")(
            tensor((2, 16, 4, 4), t, CL), tensor((2, 16, 4, 4), t, CL), tensor((4,), t), seed(), 0.1),
            {"vector": {_DROPOUT: "ld st"}})
    f32 = torch.float32
    yield "dropout_fwd_ one element", lambda: op("dropout_fwd_")(tensor((1,)), seed(), 0.3), {}
    for p in (0.0, 0.5, 0.9, 1.0):  # threshold 0, >= 2**31 (int64), drop-all
        yield f"dropout_fwd p={p}", lambda p=p: op("dropout_fwd")(tensor((4096,)), seed(), p), {}
    yield ("dropout_add_fwd no bias tail", lambda: op("dropout_add_fwd")(
        tensor((33, 3)), tensor((33, 3)), None, seed(), 0.2), {})
    yield ("dropout_add_fwd bias misaligned", lambda: op("dropout_add_fwd")(
        tensor((7, 5), f32, misaligned=True), tensor((7, 5)), tensor((5,), misaligned=True), seed(), 0.2), {})
    m = "meta"
    yield (f"dropout_fwd float16 {HUGE} elements", lambda: op("dropout_fwd", m)(
        tensor((HUGE,), torch.float16, device=m), seed(m), 0.1), {"vector": {_DROPOUT: "ld st"}})
    yield (f"dropout_add_fwd bfloat16 bias {HUGE} elements", lambda: op("dropout_add_fwd", m)(
        tensor((HUGE // 16, 16), torch.bfloat16, device=m), tensor((HUGE // 16, 16), torch.bfloat16, device=m),
        tensor((16,), torch.bfloat16, device=m), seed(m), 0.1), {})


def adamw(dtype, state=None, sizes=(4096, 1000), misaligned=False, amsgrad=False, maximize=False,
          scaler=False, clip=False, scalar=torch.float32, sr=False):
    def tensors(t):
        return [tensor((n,), t, misaligned=misaligned) for n in sizes]
    state = state or dtype
    hparams = torch.tensor([[1e-3, 0.9, 0.999, 1e-2, 1e-8]] * len(sizes), dtype=torch.float64)
    steps = [torch.ones((), dtype=torch.float32) for _ in sizes]
    one = torch.ones(1, dtype=scalar)
    op("adamw_step_")(tensors(dtype), tensors(dtype), tensors(state), tensors(state),
                      tensors(state) if amsgrad else [], steps, hparams, amsgrad, maximize,
                      one if scaler else None, torch.zeros(1, dtype=scalar) if scaler else None,
                      one if clip else None, seed() if sr else None)


def adamw_cases():
    variants = {"amsgrad": {"amsgrad": True}, "maximize": {"maximize": True},
                "grad scaler": {"scaler": True}, "clip": {"clip": True},
                "all": {"amsgrad": True, "maximize": True, "scaler": True, "clip": True}}
    for dtype in DTYPES:
        states = [dtype] + ([torch.float32] if dtype in (torch.float16, torch.bfloat16) else [])
        states += [torch.bfloat16] if dtype in (torch.float32, torch.float16) else []
        for state in states:
            yield (f"adamw {name(dtype)} states {name(state)}", lambda d=dtype, s=state: adamw(d, s),
                   {"vector": {_ADAMW: "ld st"}})
    for (dtype, state) in ((torch.float32, None), (torch.bfloat16, torch.float32)):
        for label, kw in variants.items():
            yield f"adamw {name(dtype)} {label}", lambda d=dtype, s=state, kw=kw: adamw(d, s, **kw), {}
        # no "scalar" expectation: the kernel picks its 16-byte path per tensor at run time
        yield f"adamw {name(dtype)} misaligned", lambda d=dtype, s=state: adamw(d, s, misaligned=True), {}
    # stochastic rounding of bfloat16 params and/or moments (pure-bf16 training)
    for dtype, state in ((torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32),
                         (torch.float32, torch.bfloat16), (torch.float16, torch.bfloat16)):
        yield (f"adamw {name(dtype)} states {name(state)} stochastic rounding",
               lambda d=dtype, s=state: adamw(d, s, sr=True), {"vector": {_ADAMW: "ld st"}})
    yield ("adamw bfloat16 all, stochastic rounding",
           lambda: adamw(torch.bfloat16, sr=True, **variants["all"]), {})
    yield ("adamw float64 all, float64 scalars",
           lambda: adamw(torch.float64, scalar=torch.float64, **variants["all"]), {})
    yield "adamw one tensor of one element", lambda: adamw(torch.float32, sizes=(1,)), {}


def clip_cases():
    def norm(dtype, p, sizes=(4096, 3000), misaligned=False):
        op("grad_norm_pow")([tensor((n,), dtype, misaligned=misaligned) for n in sizes], p)

    def scale(dtype, sizes=(4096, 3000), misaligned=False):
        op("multi_tensor_scale_")([tensor((n,), dtype, misaligned=misaligned) for n in sizes],
                                  torch.tensor(0.5))
    for dtype in DTYPES:
        for p in (2.0, 1.0, math.inf, 3.0):
            yield f"grad_norm_pow {name(dtype)} p={p}", lambda d=dtype, p=p: norm(d, p), {"vector": {_POW_SUM: "ld"}}
        yield f"multi_tensor_scale_ {name(dtype)}", lambda d=dtype: scale(d), {"vector": {_SCALE: "ld st"}}
    for dtype in (torch.float32, torch.bfloat16):
        yield (f"grad_norm_pow {name(dtype)} misaligned", lambda d=dtype: norm(d, 2.0, misaligned=True),
               {"scalar": {_POW_SUM: "ld"}})
        yield (f"multi_tensor_scale_ {name(dtype)} misaligned", lambda d=dtype: scale(d, misaligned=True),
               {"scalar": {_SCALE: "ld st"}})
    yield "grad_norm_pow p=0.5", lambda: norm(torch.float32, 0.5), {}
    yield "grad_norm_pow p=5e-324 (bits of p == 1)", lambda: norm(torch.float32, 5e-324), {}
    yield "grad_norm_pow one element", lambda: norm(torch.float32, 2.0, sizes=(1,)), {}
    yield "multi_tensor_scale_ one element", lambda: scale(torch.float32, sizes=(1,)), {}


def selftest_cases():
    def philox(n, transposed=False):
        counter = tensor((4, n), torch.int64).t() if transposed else tensor((n, 4), torch.int64)
        op("_philox4x32")(counter, tensor((n, 2), torch.int64))
    yield "_philox4x32", lambda: philox(1000), {}
    yield "_philox4x32 one row", lambda: philox(1), {}
    yield "_philox4x32 column-major counter", lambda: philox(333, transposed=True), {}


BN_OPS = ("fwd train", "fwd eval", "bwd train", "bwd eval", "stats", "elemt", "bwd_reduce", "bwd_elemt")
# kernels with 16-byte accesses per op on aligned operands whose rows are multiples of 16 elements
BN_VECTOR = {"fwd train": {_PARTIAL: "ld", _ELEMENTWISE: "ld st"}, "fwd eval": {_ELEMENTWISE: "ld st"},
             "bwd train": {_PARTIAL: "ld", _ELEMENTWISE: "ld st"},
             "bwd eval": {_PARTIAL: "ld", _ELEMENTWISE: "ld st"}, "stats": {_PARTIAL: "ld"},
             "elemt": {_ELEMENTWISE: "ld st"}, "bwd_reduce": {_PARTIAL: "ld"}, "bwd_elemt": {_ELEMENTWISE: "ld st"}}


def batch_norm(which, shape, dtype=torch.float32, fmt=None, misaligned=False, affine=True, running=True,
               device="cpu", momentum=0.1, eps=1e-5):
    x, dy = tensor(shape, dtype, fmt, misaligned, device), tensor(shape, dtype, fmt, device=device)
    c, stats = shape[1], torch.float64 if dtype == torch.float64 else torch.float32
    w, b = (tensor((c,), dtype, device=device) for _ in range(2)) if affine else (None, None)
    rm, rv = (tensor((c,), stats, device=device) for _ in range(2)) if running or "eval" in which else (None, None)
    mean, invstd, mean_dy, dot = (tensor((c,), stats, device=device) for _ in range(4))
    call = {"fwd train": lambda: op("batch_norm_fwd", device)(x, w, b, rm, rv, True, momentum, eps),
            "fwd eval": lambda: op("batch_norm_fwd", device)(x, w, b, rm, rv, False, momentum, eps),
            "bwd train": lambda: op("batch_norm_bwd", device)(dy, x, w, mean, invstd, True),
            "bwd eval": lambda: op("batch_norm_bwd", device)(dy, x, w, mean, invstd, False),
            "stats": lambda: op("batch_norm_stats", device)(x),
            "elemt": lambda: op("batch_norm_elemt", device)(x, w, b, mean, invstd),
            "bwd_reduce": lambda: op("batch_norm_bwd_reduce", device)(dy, x, mean),
            "bwd_elemt": lambda: op("batch_norm_bwd_elemt", device)(dy, x, w, mean, invstd, mean_dy, dot)}
    call[which]()


def batch_norm_suite(label, shape, ops=BN_OPS, vector=False, **kw):
    for which in ops:
        yield (f"batch_norm {which} {label}", lambda w=which: batch_norm(w, shape, **kw),
               {"vector": BN_VECTOR[which]} if vector else {})


def batch_norm_cases():
    for dtype in DTYPES:  # 32768 values per channel: two splits
        yield from batch_norm_suite(f"nchw {name(dtype)}", (8, 4, 64, 64), dtype=dtype, vector=True)
        yield from batch_norm_suite(f"nhwc {name(dtype)}", (32, 32, 32, 32), dtype=dtype, fmt=CL, vector=True)
    layouts = {"nc": ((4096, 48), None, True), "nc C=2000": ((16, 2000), None, False),
               "ncl tail": ((64, 3, 1000), None, False), "nchw tail": ((3, 5, 7, 9), None, False),
               "nhwc tail": ((3, 5, 7, 9), CL, False), "ncdhw": ((2, 3, 16, 16, 16), None, True),
               "ndhwc": ((2, 32, 8, 8, 8), CL3D, True)}
    for dtype in (torch.float32, torch.bfloat16):
        for label, (shape, fmt, vector) in layouts.items():
            yield from batch_norm_suite(f"{label} {name(dtype)}", shape, dtype=dtype, fmt=fmt, vector=vector)
        for fmt, label in ((None, "nchw"), (CL, "nhwc")):
            yield from batch_norm_suite(f"{label} {name(dtype)} misaligned", (8, 16, 16, 16), dtype=dtype,
                                        fmt=fmt, misaligned=True)
    for fmt, label in ((None, "nchw"), (CL, "nhwc")):
        yield from batch_norm_suite(f"{label} no affine, no running stats", (8, 16, 16, 16), fmt=fmt,
                                    affine=False, running=False)
    for dtype in (torch.float32, torch.bfloat16, torch.float64):  # one value per channel
        one = ("fwd eval", "bwd eval", "stats", "elemt", "bwd_reduce", "bwd_elemt")
        yield from batch_norm_suite(f"(1, 5) {name(dtype)}", (1, 5), ops=one, dtype=dtype)
        yield from batch_norm_suite(f"(1, 16, 1, 1) {name(dtype)}", (1, 16, 1, 1), ops=("stats",), dtype=dtype)
    tiny = 5e-324  # its float64 bits are the int 1
    yield from batch_norm_suite("momentum=eps=5e-324", (8, 3, 5), ops=("fwd train", "fwd eval"),
                                momentum=tiny, eps=tiny)
    huge = {"C=1": (1, 1, HUGE), "nchw inner >= 2**31": (1, 2, 2**31), "nc outer >= 2**31": (HUGE, 2)}
    for label, shape in huge.items():
        yield from batch_norm_suite(f"{label} float16", shape, ops=("fwd train", "fwd eval", "bwd train", "bwd eval"),
                                    dtype=torch.float16, device="meta")


def cases():
    """(label, call, expectations): `vector` / `scalar` map a kernel to "ld", "st" or "ld st": those
    of its accesses must include 16-byte vectors / must have no vectors at all."""
    for group in (dropout_cases, adamw_cases, clip_cases, selftest_cases, batch_norm_cases):
        yield from group()


@pytest.fixture(scope="module")
def report(request, tmp_path_factory):
    out = tmp_path_factory.mktemp("sm90") / "report.json"
    cache = getattr(request.config, "cache", None)  # None under -p no:cacheprovider
    triton_cache = cache.mkdir("triton-sm90") if cache is not None else tmp_path_factory.mktemp("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(triton_cache)
    helper = Path(__file__).with_name("triton_sm90.py")
    done = subprocess.run([sys.executable, str(helper), str(out)], env=env, capture_output=True, text=True,
                          timeout=3600)
    assert done.returncode == 0, done.stderr[-5000:]
    return json.loads(out.read_text())


def kernels_of(report, case):
    return [report["kernels"][i] for i in case["kernels"]]


def describe(kernel):
    return f"{kernel['name']} ({kernel['types']}, int args == 1: {kernel['ones']})"


def test_every_case_launches(report):
    failed = [f"{c['label']}:\n{c['error']}" for c in report["cases"] if c["error"]]
    assert not failed, "\n".join(failed)


def test_every_specialisation_compiles_for_sm90(report):
    failed = [f"{describe(k)}, from {[c['label'] for c in report['cases'] if i in c['kernels']][:3]}:\n"
              f"{k['error']}" for i, k in enumerate(report["kernels"]) if k["error"]]
    assert not failed, f"{len(failed)} of {len(report['kernels'])} failed:\n" + "\n".join(failed)


def test_every_kernel_is_compiled(report):
    compiled = {f"{k['module']}.{k['name']}" for k in report["kernels"]}
    assert set(report["kernel_names"]) - compiled == set()


def test_bindings_specialise_as_triton_does(report):
    """The harness sees what a launch would: 1 as a constexpr, alignment, int64 past 2**31."""
    def dropout_kernel(label):
        (kernel,) = kernels_of(report, next(c for c in report["cases"] if c["label"] == label))
        return kernel
    assert "n_elements" in dropout_kernel("dropout_fwd_ one element")["ones"]
    assert "x_ptr" not in dropout_kernel("dropout_fwd float32 misaligned")["divisible16"]
    assert "x_ptr" in dropout_kernel("dropout_fwd float32 aligned")["divisible16"]
    assert dropout_kernel(f"dropout_fwd float16 {HUGE} elements")["types"]["n_elements"] == "i64"


def test_no_spills(report):
    spilled = [f"{describe(k)}: {k['local']} B local, {k['stack']} B stack, {k['reg']} registers"
               for k in report["kernels"] if not k["error"] and (k["local"] or k["stack"])]
    assert not spilled, "\n".join(spilled)


def test_aligned_fast_paths_use_16_byte_accesses(report):
    missing = []
    for case in report["cases"]:
        for kernel_name, kinds in case["vector"].items():
            for kernel in (k for k in kernels_of(report, case) if k["name"] == kernel_name and not k["error"]):
                missing += [f"{case['label']}: {kernel_name} {kind} widths {kernel['vector'][kind]}"
                            for kind in kinds.split() if max(kernel["vector"][kind], default=0) < 16]
    assert not missing, "no 16-byte vector access in:\n" + "\n".join(missing)


def test_misaligned_operands_get_no_vector_accesses(report):
    vectorised = []
    for case in report["cases"]:
        for kernel_name, kinds in case["scalar"].items():
            for kernel in (k for k in kernels_of(report, case) if k["name"] == kernel_name and not k["error"]):
                vectorised += [f"{case['label']}: {kernel_name} {kind} widths {kernel['vector'][kind]}"
                               for kind in kinds.split() if kernel["vector"][kind]]
    assert not vectorised, "vector accesses on misaligned operands:\n" + "\n".join(vectorised)


def test_offsets_from_the_program_id_are_64_bit(report):
    narrow = sorted({f"{k['name']}: {loc}" for k in report["kernels"] if not k["error"]
                     for loc in k["int32_pid_offsets"]})
    assert not narrow, "32-bit products of the program id reach an address:\n" + "\n".join(narrow)
