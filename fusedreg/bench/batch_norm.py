"""BatchNorm benchmarks: training forward, backward, forward+backward, eval forward and eval backward
with frozen parameters (fine-tuning) on ResNet-50's BatchNorm2d shapes (NCHW and channels_last) and
a wide BatchNorm1d, against F.batch_norm (cuDNN where PyTorch picks it), torch.compile of it, and
the eager reference.

Floors (DESIGN §5), per element, in units of the data's itemsize (fp32: x4 bytes, bf16: x2):
  forward   2 (read x, write y) when one channel's N*H*W slice fits on chip, so the statistics pass
            and the normalize pass read x once; else 3 (x read twice). "Fits" here: the slice is at
            most 128 KiB (a share of an H100 SM's 228 KB shared memory, or a CPU core's L2).
            Of the cuda sizes, C=2048 7x7 and BatchNorm1d (N=8192) fit; 56x56 and 28x28 do not.
  backward  3 (read dy and x, write dx; the two per-channel sums and dx again need x and dy twice
            unless they fit, which the floor does not assume).
  eval      2 (one elementwise pass).
  eval bwd (frozen)  2 (read dy, write dx: the statistics are constants and weight/bias need no
            gradient, so grad_input = dy * invstd * weight and x is not read).
Per-channel vectors (weight, bias, running stats: O(C)) are not counted. Parameters and running
statistics are float32 for every data dtype, as in mixed-precision training.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import fusedreg

from .registry import Case, Impl, register

MOMENTUM, EPS = 0.1, 1e-5
ON_CHIP_BYTES = 128 * 1024

# (N, C, H, W, layout) for BatchNorm2d, (N, C, layout) for BatchNorm1d
_RESNET50 = [(64, 56), (256, 56), (512, 28), (2048, 7)]
SIZES = {
    "cuda": [(256, c, hw, hw, layout) for c, hw in _RESNET50 for layout in ("nchw", "nhwc")]
    + [(8192, 1024, "nc")],
    "cpu": [(8, c, hw, hw, layout) for c, hw in _RESNET50 for layout in ("nchw", "nhwc")]
    + [(1024, 1024, "nc")],
}
QUICK_SIZES = {
    # every quick GPU size >= 2**26 elements: large enough to show bandwidth, not launch latency
    "cuda": [(512, 64, 56, 56, "nchw"), (512, 64, 56, 56, "nhwc"), (1024, 2048, 7, 7, "nhwc"),
             (65536, 1024, "nc")],
    "cpu": [(8, 64, 56, 56, "nchw"), (8, 64, 56, 56, "nhwc"), (1024, 1024, "nc")],
}


def _label(size) -> str:
    *shape, layout = size
    return "x".join(map(str, shape)) + " " + layout.upper()


def _numel(size) -> int:
    n = 1
    for extent in size[:-1]:
        n *= extent
    return n


def _channel_fits_on_chip(size, dtype) -> bool:
    return _numel(size) // size[1] * dtype.itemsize <= ON_CHIP_BYTES


def _forward_floor(size, dtype) -> int:
    return (2 if _channel_fits_on_chip(size, dtype) else 3) * _numel(size) * dtype.itemsize


def _backward_floor(size, dtype) -> int:
    return 3 * _numel(size) * dtype.itemsize


def _make(size, dtype, device):
    *shape, layout = size
    channels = shape[1]
    x = torch.randn(shape, device=device).to(dtype)
    if layout == "nhwc":
        x = x.contiguous(memory_format=torch.channels_last)
    params = [torch.rand(channels, device=device) + 0.5, torch.randn(channels, device=device)]
    running = [torch.zeros(channels, device=device), torch.ones(channels, device=device)]
    return x, *params, *running


def _fusedreg(backend):
    def batch_norm(x, weight, bias, running_mean, running_var, training):
        return fusedreg.batch_norm(x, running_mean, running_var, weight, bias, training, MOMENTUM, EPS,
                                   backend=backend)
    return batch_norm


def _torch(x, weight, bias, running_mean, running_var, training):
    return F.batch_norm(x, running_mean, running_var, weight, bias, training, MOMENTUM, EPS)


def _compiled():
    compiled = torch.compile(_torch)
    return lambda *args: compiled(*args)


def _train_forward(make_fn):
    def setup(inputs):
        fn = make_fn()
        return lambda: fn(*inputs, True)
    return setup


def _eval_forward(make_fn):
    def setup(inputs):
        fn = make_fn()
        return lambda: fn(*inputs, False)
    return setup


def _leaves(inputs):
    """Fresh leaves, and running statistics of the implementation's own: implementations are
    timed interleaved, and a graph kept for backward (torch saves the running statistics) must
    not see another implementation's forward update them in place."""
    x, weight, bias, running_mean, running_var = inputs
    leaves = [t.detach().requires_grad_() for t in (x, weight, bias)]
    return leaves, (running_mean.clone(), running_var.clone())


def _backward(make_fn):
    def setup(inputs):
        fn = make_fn()
        leaves, running = _leaves(inputs)
        y = fn(*leaves, *running, True)
        dy = torch.randn_like(y)
        return lambda: torch.autograd.grad(y, leaves, dy, retain_graph=True)
    return setup


def _eval_backward_frozen(make_fn):
    def setup(inputs):
        fn = make_fn()
        x, *rest = inputs
        x = x.detach().requires_grad_()
        y = fn(x, *rest, False)
        dy = torch.randn_like(y)
        return lambda: torch.autograd.grad(y, x, dy, retain_graph=True)
    return setup


def _forward_backward(make_fn):
    def setup(inputs):
        fn = make_fn()
        leaves, running = _leaves(inputs)
        dy = torch.randn_like(inputs[0])
        return lambda: torch.autograd.grad(fn(*leaves, *running, True), leaves, dy)
    return setup


def _impls(wrap):
    """The same implementations for every mode; `wrap(make_fn)` builds the timed setup, where
    make_fn() returns fn(x, weight, bias, running_mean, running_var, training)."""
    return {
        "fusedreg[cuda]": Impl(wrap(lambda: _fusedreg("cuda")), devices=("cuda",)),
        "fusedreg[cpu]": Impl(wrap(lambda: _fusedreg("cpu")), devices=("cpu",)),
        "fusedreg[triton]": Impl(wrap(lambda: _fusedreg("triton")), devices=("cuda",)),
        "torch F.batch_norm": wrap(lambda: _torch),
        "torch.compile(F.batch_norm)": Impl(wrap(_compiled), devices=("cuda",), quick=False),
        "reference (eager)": Impl(wrap(lambda: _fusedreg("reference")), quick=False, paired=False),
    }


_FLOOR_NOTE = ("fwd floor 2 x itemsize B/elem where one channel's slice is <= 128 KiB, else 3 x "
               "itemsize (N=256: 3x for 56x56 and 28x28, 2x for 7x7 and BatchNorm1d)")

for mode, wrap, floor, note in (
        ("fwd", _train_forward, _forward_floor, f"training; {_FLOOR_NOTE}"),
        ("bwd", _backward, _backward_floor, "floor 3 x itemsize B/elem (read dy, x; write dx)"),
        ("fwd+bwd", _forward_backward,
         lambda size, dtype: _forward_floor(size, dtype) + _backward_floor(size, dtype),
         f"training; {_FLOOR_NOTE}, plus 3 x itemsize for backward"),
        ("eval", _eval_forward, lambda size, dtype: 2 * _numel(size) * dtype.itemsize,
         "running statistics, one elementwise pass: floor 2 x itemsize B/elem"),
        ("eval bwd (frozen)", _eval_backward_frozen,
         lambda size, dtype: 2 * _numel(size) * dtype.itemsize,
         "running statistics, weight and bias without gradients: grad_input only, floor 2 x "
         "itemsize B/elem (read dy, write dx)"),
):
    register(Case(
        op="batch_norm", name=mode, make=_make, bytes_moved=floor, impls=_impls(wrap),
        sizes=SIZES, quick_sizes=QUICK_SIZES, size_label=_label,
        measure_memory=mode == "fwd+bwd",
        note=f"{note}; parameters and running stats float32",
    ))
