"""The compute-sanitizer selection: every kernel of every op, on both GPU backends, once, small.

`benchmarks/gpu_check.sh` tier 2 runs `pytest -m sanitizer` under compute-sanitizer memcheck and
racecheck. Each case is small (the sanitizer slows kernels 10-100x) but reaches the paths where an
out-of-bounds or misaligned access would hide: vector bodies with ragged tails, operands one element
past a 16-byte boundary (the scalar or peeled path), a count of one, channels_last, and BatchNorm
shapes for both the on-chip and the split reduction. Each result is also checked against the eager
reference on the same CUDA tensors, so a case that ran the wrong path is not silently clean.
"""
import importlib
import math
import pkgutil

import pytest
import torch

import fusedreg.triton
from conftest import TOLERANCES
from fusedreg import _build, _library
from fusedreg.reference import adamw as ref_adamw
from fusedreg.reference import batch_norm as ref_bn
from fusedreg.reference import clip as ref_clip
from fusedreg.reference import dropout as ref_dropout
from fusedreg.reference import philox as ref_philox

pytestmark = [pytest.mark.gpu, pytest.mark.sanitizer]

BACKENDS = ["cuda", "triton"]
DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(autouse=True, scope="module")
def _kernels_registered():
    """Both GPU backends' kernels registered: the CUDA library loaded, every Triton op imported."""
    _build.load_library("cuda")
    for module in pkgutil.iter_modules(fusedreg.triton.__path__):
        importlib.import_module(f"fusedreg.triton.{module.name}")


def _randn(shape, dtype, offset=0, seed=0):
    """A CUDA tensor of `shape`; offset=1 starts it one element past a 16-byte aligned address."""
    gen = torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    flat = torch.randn(n + offset, generator=gen).to("cuda", dtype)
    return flat[offset:].view(shape)


def _seed():
    return torch.tensor([0x5EED_1234_ABCD], dtype=torch.int64, device="cuda")


def _clone(args):
    return [[t.clone() for t in a] if isinstance(a, list) else a.clone() if isinstance(a, torch.Tensor) else a
            for a in args]


def _assert_same(ours, expected, dtype):
    """Outputs (a tensor, a tuple, or None for in-place ops) equal within the dtype's tolerance."""
    if ours is None or expected is None:
        assert ours is None and expected is None
        return
    if isinstance(expected, torch.Tensor):
        ours, expected = (ours,), (expected,)
    assert len(ours) == len(expected)
    for o, e in zip(ours, expected):
        if not o.is_floating_point():  # seeds, counters: exact
            assert torch.equal(o, e)
            continue
        atol, rtol = TOLERANCES[dtype if o.dtype == dtype else o.dtype]
        torch.testing.assert_close(o, e, atol=atol, rtol=rtol, equal_nan=True)


def _run_both(name, backend, reference_fn, args, dtype):
    """Runs op `name` on `backend` and `reference_fn` on clones; compares outputs and every
    tensor the op may mutate (all tensor arguments are compared: unmutated ones trivially)."""
    ours_args, ref_args = _clone(args), _clone(args)
    ours = _library.op(name, backend)(*ours_args)
    expected = reference_fn(*ref_args)
    torch.cuda.synchronize()
    _assert_same(ours, expected, dtype)
    for a, e in zip(ours_args, ref_args):
        if isinstance(a, list):
            for x, y in zip(a, e):
                _assert_same(x, y, dtype)
        elif isinstance(a, torch.Tensor):
            _assert_same(a, e, dtype)


# ----------------------------------------------------------------------------- dropout

DROPOUT_INPUTS = {
    "one": lambda dt: _randn((1,), dt),
    "tail": lambda dt: _randn((4099,), dt),                     # vector body + ragged tail
    "misaligned": lambda dt: _randn((1031,), dt, offset=1),     # peeled / scalar path
    "channels_last": lambda dt: _randn((2, 3, 5, 7), dt).to(memory_format=torch.channels_last),
}


@pytest.mark.parametrize("layout", list(DROPOUT_INPUTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout(backend, dtype, layout):
    x = DROPOUT_INPUTS[layout](dtype)
    for p in (0.0, 0.3, 1.0):  # keep-all, random, drop-all modes
        _run_both("dropout_fwd", backend, ref_dropout.dropout_fwd, (x, _seed(), p), dtype)
        _run_both("dropout_fwd_", backend, ref_dropout.dropout_fwd_, (x, _seed(), p), dtype)
        _run_both("dropout_bwd", backend, ref_dropout.dropout_bwd, (x, _seed(), p), dtype)


@pytest.mark.parametrize("bias", ["none", "bias", "bias_misaligned"])
@pytest.mark.parametrize("misaligned", [False, True], ids=["aligned", "misaligned"])
@pytest.mark.parametrize("width", [128, 131], ids=["rows_of_8", "odd_rows"])  # bias fast path or not
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_add(backend, dtype, width, misaligned, bias):
    shape = (5, width)
    x = _randn(shape, dtype, offset=int(misaligned), seed=1)
    residual = _randn(shape, dtype, offset=int(misaligned), seed=2)
    b = None if bias == "none" else _randn((width,), dtype, offset=int(bias == "bias_misaligned"), seed=3)
    _run_both("dropout_add_fwd", backend, ref_dropout.dropout_add_fwd, (x, residual, b, _seed(), 0.3), dtype)


# ----------------------------------------------------------------------------- AdamW

@pytest.mark.parametrize("variant", ["plain", "amsgrad_maximize_scaler_clip", "misaligned_grad"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_adamw(backend, dtype, variant):
    sizes = (1, 7, 4099)
    offset = int(variant == "misaligned_grad")
    params = [_randn((n,), dtype, seed=10 + i) for i, n in enumerate(sizes)]
    grads = [_randn((n,), dtype, offset=offset, seed=20 + i) for i, n in enumerate(sizes)]
    state = torch.float32 if dtype == torch.bfloat16 else dtype
    exp_avgs = [_randn((n,), state, seed=30 + i) for i, n in enumerate(sizes)]
    exp_avg_sqs = [_randn((n,), state, seed=40 + i).abs() for i, n in enumerate(sizes)]
    steps = [torch.tensor(3.0, device="cuda") for _ in sizes]
    hparams = torch.tensor([[1e-3, 0.9, 0.999, 1e-2, 1e-8]] * len(sizes), device="cuda", dtype=torch.float64)
    if variant == "amsgrad_maximize_scaler_clip":
        one = torch.ones(1, device="cuda")
        max_sqs = [t.clone() for t in exp_avg_sqs]
        args = (params, grads, exp_avgs, exp_avg_sqs, max_sqs, steps, hparams, True, True,
                one * 2, torch.zeros(1, device="cuda"), one * 0.5)
    else:
        args = (params, grads, exp_avgs, exp_avg_sqs, [], steps, hparams, False, False, None, None, None)
    _run_both("adamw_step_", backend, ref_adamw.adamw_step_, args, dtype)


# ----------------------------------------------------------------------------- clipping

@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf, 3.0])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_clip(backend, dtype, norm_type):
    tensors = [_randn((1,), dtype), _randn((4099,), dtype, seed=1), _randn((1031,), dtype, offset=1, seed=2),
               _randn((3, 5, 7, 2), dtype, seed=3).to(memory_format=torch.channels_last)]
    _run_both("grad_norm_pow", backend, ref_clip.grad_norm_pow, (tensors, norm_type), dtype)
    scale = torch.tensor(0.37, device="cuda")
    _run_both("multi_tensor_scale_", backend, ref_clip.multi_tensor_scale_, (tensors, scale), dtype)


# ----------------------------------------------------------------------------- BatchNorm

BN_SHAPES = {
    "1d": ((6, 5), False),                   # (N, C)
    "1d_length": ((4, 3, 33), False),        # (N, C, L)
    "2d": ((4, 3, 5, 7), False),
    "2d_channels_last": ((4, 3, 5, 7), True),
    "3d": ((2, 3, 4, 3, 5), False),
    "split": ((64, 2, 4099), False),         # too large for one block per channel: split path
    "one_value": ((1, 3), False),            # one value per channel
}


def _bn_input(key, dtype):
    shape, channels_last = BN_SHAPES[key]
    x = _randn(shape, dtype, seed=7)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    return x


@pytest.mark.parametrize("key", list(BN_SHAPES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_norm(backend, dtype, key):
    x = _bn_input(key, dtype)
    c = x.shape[1]
    w, b = _randn((c,), torch.float32, seed=8), _randn((c,), torch.float32, seed=9)
    rm, rv = torch.zeros(c, device="cuda"), torch.ones(c, device="cuda")
    training = key != "one_value"  # one value per channel has no batch variance: eval only
    _run_both("batch_norm_fwd", backend, ref_bn.batch_norm_fwd, (x, w, b, rm, rv, training, 0.1, 1e-5), dtype)
    _run_both("batch_norm_fwd", backend, ref_bn.batch_norm_fwd, (x, w, b, rm, rv, False, 0.1, 1e-5), dtype)
    mean, invstd = _randn((c,), torch.float32, seed=11), _randn((c,), torch.float32, seed=12).abs() + 0.5
    dy = _randn(tuple(x.shape), dtype, seed=13).to(memory_format=torch.channels_last
                                                  if BN_SHAPES[key][1] else torch.contiguous_format)
    for train in (True, False):
        _run_both("batch_norm_bwd", backend, ref_bn.batch_norm_bwd, (dy, x, w, mean, invstd, train), dtype)
    _run_both("batch_norm_stats", backend, ref_bn.batch_norm_stats, (x,), dtype)
    _run_both("batch_norm_elemt", backend, ref_bn.batch_norm_elemt, (x, w, b, mean, invstd), dtype)
    _run_both("batch_norm_bwd_reduce", backend, ref_bn.batch_norm_bwd_reduce, (dy, x, mean), dtype)
    sum_dy, sum_dy_xmu = ref_bn.batch_norm_bwd_reduce(dy, x, mean)
    count = x.numel() // c
    _run_both("batch_norm_bwd_elemt", backend, ref_bn.batch_norm_bwd_elemt,
              (dy, x, w, mean, invstd, sum_dy / count, sum_dy_xmu / count), dtype)


# ----------------------------------------------------------------------------- self-test ops

@pytest.mark.parametrize("backend", BACKENDS)
def test_philox_selftest(backend):
    gen = torch.Generator().manual_seed(0)
    counter = torch.randint(0, 2**32, (9, 4), generator=gen, dtype=torch.int64).cuda()
    key = torch.randint(0, 2**32, (9, 2), generator=gen, dtype=torch.int64).cuda()
    ours = _library.op("_philox4x32", backend)(counter, key)
    assert torch.equal(ours, ref_philox.philox4x32(counter, key))


@pytest.mark.parametrize("backend", ["cuda"])  # the multi-tensor machinery is the C++ backend's
def test_multi_tensor_selftest(backend):
    tensors = [_randn((n,), torch.float32, seed=n) for n in (5, 129, 2, 1000)]
    ours = _library.op("_multi_tensor_sumsq", backend)(tensors)
    expected = torch.stack([t.double().pow(2).sum() for t in tensors]).to(ours.dtype)
    torch.testing.assert_close(ours.reshape(expected.shape), expected, atol=1e-5, rtol=1e-5)
