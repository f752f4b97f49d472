"""Global-norm gradient clipping benchmarks: clip_grad_norm_ over many small gradients (launch-bound,
also timed as CUDA-graph replays), a GPT-2-124M-shaped gradient list, and one large tensor, against
torch.nn.utils.clip_grad_norm_ with foreach=True (PyTorch's fastest) and foreach=False.

Floor (DESIGN §5): read every gradient for the norm, then read and write it to scale: 3 x itemsize
bytes per element (12 for float32). When the norm is below max_norm the coefficient is exactly 1
and fusedreg skips the scaling pass: the floor is then 1 x itemsize (the "no clip" case).

How the clipping cases keep clipping: a positive max_norm would be reached after the first call,
after which the coefficient rounds to exactly 1 (and fusedreg would skip the work that PyTorch
still does). These cases pass max_norm = -(initial norm) instead: the coefficient is then about -1
on every call, so every implementation does the full norm + scale work on every call, including
CUDA-graph replays whose max_norm is frozen, and the gradients keep their magnitude (each call's
coefficient is computed from the current norm, so the sign flips cannot drift into over- or
underflow).
"""
from __future__ import annotations

import math

import torch

import fusedreg

from .registry import Case, Impl, register


def _params(shapes, dtype, device, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    params = []
    for shape in shapes:
        p = torch.nn.Parameter(torch.empty(shape, device=device, dtype=dtype))
        p.grad = torch.randn(shape, device=device, generator=gen).to(dtype)
        params.append(p)
    return params


def _small_shapes(count, mean_numel):
    """`count` 1-d sizes spread over [mean/2, 3 mean/2], odd numbers (no size is a vector multiple)."""
    return [(mean_numel // 2 + (k * 7919) % mean_numel) | 1 for k in range(count)]


def _gpt2_shapes(d_model, n_layer, vocab, n_ctx):
    """GPT-2's parameters (Hugging Face layout, Conv1D weights [in, out]): 148 tensors."""
    shapes = [(vocab, d_model), (n_ctx, d_model)]
    for _ in range(n_layer):
        shapes += [(d_model,), (d_model,),                               # ln_1
                   (d_model, 3 * d_model), (3 * d_model,),               # attn.c_attn
                   (d_model, d_model), (d_model,),                       # attn.c_proj
                   (d_model,), (d_model,),                               # ln_2
                   (d_model, 4 * d_model), (4 * d_model,),               # mlp.c_fc
                   (4 * d_model, d_model), (d_model,)]                   # mlp.c_proj
    return shapes + [(d_model,), (d_model,)]                             # ln_f


def _shapes(size):
    kind = size[0]
    if kind == "small":
        return [(n,) for n in _small_shapes(size[1], size[2])]
    if kind == "gpt2":
        return _gpt2_shapes(*size[1:])
    return [(size[1],)]


def _numel(size) -> int:
    return sum(math.prod(s) for s in _shapes(size))


def _label(size) -> str:
    kind = size[0]
    if kind == "small":
        return f"{size[1]} x ~{size[2]}"
    if kind == "gpt2":
        return f"GPT-2 d={size[1]} L={size[2]} V={size[3]} ({_numel(size) / 1e6:.1f}M)"
    return f"2^{int(math.log2(size[1]))}" if size[1] & (size[1] - 1) == 0 else str(size[1])


def _make(clip: bool):
    def make(size, dtype, device):
        params = _params(_shapes(size), dtype, device)
        norm = torch.nn.utils.get_total_norm([p.grad for p in params], 2.0).double().item()
        return params, (-norm if clip else math.inf)
    return make


def _ours(backend):
    def setup(inputs):
        params, max_norm = inputs
        return lambda: fusedreg.clip_grad_norm_(params, max_norm, backend=backend)
    return setup


def _torch(foreach):
    def setup(inputs):
        params, max_norm = inputs
        return lambda: torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=foreach)
    return setup


def _torch_compiled(inputs):
    params, max_norm = inputs
    compiled = torch.compile(lambda: torch.nn.utils.clip_grad_norm_(params, max_norm))
    return compiled


def _reference(inputs):
    params, max_norm = inputs
    return lambda: fusedreg.clip_grad_norm_(params, max_norm, backend="reference")


def _impls():
    return {
        "fusedreg[cuda]": Impl(_ours("cuda"), devices=("cuda",)),
        "fusedreg[cpu]": Impl(_ours("cpu"), devices=("cpu",)),
        "fusedreg[triton]": Impl(_ours("triton"), devices=("cuda",)),
        "torch clip_grad_norm_(foreach=True)": _torch(True),
        "torch clip_grad_norm_(foreach=False)": _torch(False),
        # CUDA only: on the CPU, Inductor compiles C++ for every one of 1000 tensors (minutes)
        "torch.compile(clip_grad_norm_)": Impl(_torch_compiled, devices=("cuda",), quick=False),
        "reference (eager)": Impl(_reference, quick=False, paired=False),
    }


_GPT2 = {"cuda": ("gpt2", 768, 12, 50257, 1024), "cpu": ("gpt2", 192, 12, 12564, 256)}
_CASES = [
    # name, sizes per device, quick sizes, CUDA graphs, clipping
    ("1000 small tensors", {"cuda": [("small", 1000, 1024), ("small", 1000, 8192)], "cpu": [("small", 1000, 256)]},
     {"cuda": [("small", 1000, 1024)], "cpu": [("small", 1000, 256)]}, True, True),
    ("GPT-2 124M grads", {d: [s] for d, s in _GPT2.items()}, None, False, True),
    ("GPT-2 124M grads, no clip", {d: [s] for d, s in _GPT2.items()}, None, False, False),
    ("one tensor", {"cuda": [("one", 2**27)], "cpu": [("one", 2**22)]},
     {"cuda": [("one", 2**27)], "cpu": [("one", 2**20)]}, False, True),
]

for name, sizes, quick_sizes, graph, clips in _CASES:
    floor = 3 if clips else 1
    register(Case(
        op="clip", name=name, make=_make(clips),
        bytes_moved=lambda size, dtype, floor=floor: floor * _numel(size) * dtype.itemsize,
        impls=_impls(), sizes=sizes, quick_sizes=quick_sizes, size_label=_label, cuda_graph=graph,
        note=(f"norm_type=2, max_norm=-(initial norm): coefficient ~ -1, full work every call; "
              f"floor 3 x itemsize bytes/element" if clips else
              "norm_type=2, max_norm=inf: coefficient exactly 1 (fusedreg skips the scale pass, "
              "torch does not); floor 1 x itemsize bytes/element"),
    ))
