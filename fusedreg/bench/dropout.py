"""Dropout benchmarks: forward, backward, forward+backward, and dropout_add, against torch.

Floors (DESIGN §5): forward reads x and writes y, backward reads dy and writes dx — 2 x itemsize
bytes per element each; nothing per element is kept between them (torch keeps a 1-byte mask, so
it moves 5 + 5 bytes per bf16 element where fusedreg moves 4 + 4). dropout_add reads input and
residual and writes the output: 3 x itemsize.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import fusedreg

from .registry import Case, Impl, register

P = 0.1
SIZES = {"cuda": [2**20, 2**22, 2**24, 2**26, 2**28], "cpu": [2**16, 2**20, 2**22]}
QUICK_SIZES = {"cuda": [2**20, 2**26], "cpu": [2**16, 2**20]}


def _make(size, dtype, device):
    return torch.randn(size, device=device).to(dtype)


def _reference_eager(x):
    seed = fusedreg.ops.dropout.draw_seed(x.device)
    return fusedreg.DropoutFunction.apply(x, P, seed, "reference")


def _compiled(wrap, x):
    # The backward-only timing replays one graph's backward (retain_graph=True), which compiled
    # autograd refuses when it donates saved buffers. AOTAutograd decides that lazily, at the first
    # backward, so donation is switched off for the run (it changes buffer reuse, not kernels).
    import torch._functorch.config as functorch_config

    functorch_config.donated_buffer = False
    return wrap(torch.compile(lambda t: F.dropout(t, P)))(x)


def _impls(wrap):
    """The same implementations for every mode; `wrap(dropout_fn)` builds the timed setup."""
    return {
        "fusedreg[cuda]": Impl(lambda x: wrap(lambda t: fusedreg.dropout(t, P, backend="cuda"))(x),
                               devices=("cuda",)),
        "fusedreg[cpu]": Impl(lambda x: wrap(lambda t: fusedreg.dropout(t, P, backend="cpu"))(x),
                              devices=("cpu",)),
        "fusedreg[triton]": Impl(lambda x: wrap(lambda t: fusedreg.dropout(t, P, backend="triton"))(x),
                                 devices=("cuda",)),
        "torch nn.Dropout": lambda x: wrap(lambda t: F.dropout(t, P))(x),
        "torch.compile(F.dropout)": Impl(lambda x: _compiled(wrap, x), quick=("cuda",)),
        "reference (eager)": Impl(lambda x: wrap(_reference_eager)(x), quick=False, paired=False),
    }


def _forward(dropout_fn):
    def setup(x):
        return lambda: dropout_fn(x)
    return setup


def _backward(dropout_fn):
    def setup(x):
        leaf = x.detach().requires_grad_()
        y = dropout_fn(leaf)
        dy = torch.randn_like(y)
        return lambda: torch.autograd.grad(y, leaf, dy, retain_graph=True)
    return setup


def _forward_backward(dropout_fn):
    def setup(x):
        leaf = x.detach().requires_grad_()
        dy = torch.randn_like(x)
        return lambda: torch.autograd.grad(dropout_fn(leaf), leaf, dy)
    return setup


for mode, wrap, floor in (("fwd", _forward, 2), ("bwd", _backward, 2), ("fwd+bwd", _forward_backward, 4)):
    register(Case(
        op="dropout", name=mode, make=_make,
        bytes_moved=lambda size, dtype, floor=floor: floor * size * dtype.itemsize,
        impls=_impls(wrap), sizes=SIZES, quick_sizes=QUICK_SIZES,
        measure_memory=mode == "fwd+bwd",
        note=f"p={P}; floor {floor} x itemsize bytes/element",
    ))


def _make_add(size, dtype, device):
    hidden = 1024
    rows = max(1, size // hidden)
    x = torch.randn(rows, hidden, device=device).to(dtype)
    return x, torch.randn_like(x), torch.randn(hidden, device=device).to(dtype)


def _add_ours(backend):
    def setup(inputs):
        x, residual, bias = inputs
        return lambda: fusedreg.dropout_add(x, residual, P, bias=bias, backend=backend)
    return setup


def _add_eager(inputs):
    x, residual, bias = inputs
    return lambda: residual + F.dropout(x + bias, P)


def _add_compiled(inputs):
    x, residual, bias = inputs
    compiled = torch.compile(lambda a, r, b: r + F.dropout(a + b, P))
    return lambda: compiled(x, residual, bias)


register(Case(
    op="dropout_add", name="fwd", make=_make_add,
    bytes_moved=lambda size, dtype: 3 * max(1, size // 1024) * 1024 * dtype.itemsize,
    impls={
        "fusedreg[cuda]": Impl(_add_ours("cuda"), devices=("cuda",)),
        "fusedreg[cpu]": Impl(_add_ours("cpu"), devices=("cpu",)),
        "fusedreg[triton]": Impl(_add_ours("triton"), devices=("cuda",)),
        "torch eager r + dropout(x + b)": _add_eager,
        "torch.compile(eager)": Impl(_add_compiled, quick=("cuda",)),
    },
    sizes=SIZES, quick_sizes=QUICK_SIZES,
    note=f"p={P}, rows x 1024 with bias; floor 3 x itemsize bytes/element",
))
