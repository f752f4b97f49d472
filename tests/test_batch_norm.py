"""Fused BatchNorm through the public API (fusedreg.batch_norm, BatchNormFunction, nn.BatchNorm*d),
every backend against PyTorch's F.batch_norm / nn.BatchNorm*d contract: outputs, running stats and
gradients over several steps then eval, layouts, low precision, gradcheck, checkpoints, errors,
torch.compile."""
import re

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import fusedreg
from conftest import TOLERANCES, native_backends
from fusedreg import _backend, _library
from fusedreg.nn.batch_norm import finish_bias, torch_bias_kwargs

PAIRS = ([("cpu", b) for b in ["reference"] + native_backends("cpu")]
         + [("cuda", b) for b in native_backends("cuda")])
OPS = ("batch_norm_fwd", "batch_norm_bwd", "batch_norm_stats", "batch_norm_elemt",
       "batch_norm_bwd_reduce", "batch_norm_bwd_elemt")
EPS = 1e-5
C = 3
# (shape, memory format, torch module class, fusedreg module class)
LAYOUTS = {
    "1d_nc": ((7, C), torch.contiguous_format, torch.nn.BatchNorm1d, fusedreg.nn.BatchNorm1d),
    "1d_ncl": ((5, C, 11), torch.contiguous_format, torch.nn.BatchNorm1d, fusedreg.nn.BatchNorm1d),
    "2d": ((3, C, 5, 7), torch.contiguous_format, torch.nn.BatchNorm2d, fusedreg.nn.BatchNorm2d),
    "2d_channels_last": ((3, C, 5, 7), torch.channels_last, torch.nn.BatchNorm2d,
                         fusedreg.nn.BatchNorm2d),
    "3d": ((2, C, 3, 5, 3), torch.contiguous_format, torch.nn.BatchNorm3d, fusedreg.nn.BatchNorm3d),
    "3d_channels_last": ((2, C, 3, 5, 3), torch.channels_last_3d, torch.nn.BatchNorm3d,
                         fusedreg.nn.BatchNorm3d),
}


def _ready(device, backend):
    """Skip a native backend whose BatchNorm kernels are not registered (yet) on `device`."""
    if backend == "reference":
        return
    _backend.select(device, backend)  # builds/loads the library or registers the Triton ops
    missing = [op for op in OPS if not torch._C._dispatch_has_kernel_for_dispatch_key(
        _library.qualname(op, backend), device.upper())]
    if missing:
        pytest.skip(f"backend {backend!r} has no {device} kernel for {', '.join(missing)}")


def _input(shape, device="cpu", dtype=torch.float32, seed=0, memory_format=torch.contiguous_format):
    gen = torch.Generator().manual_seed(seed)
    # per-channel offsets and scales: a wrong reduction dimension cannot go unnoticed
    view = [1, C] + [1] * (len(shape) - 2)
    offset = torch.tensor([0.5, -2.0, 3.0]).reshape(view)
    scale = torch.tensor([1.0, 0.3, 2.5]).reshape(view)
    x = torch.randn(shape, generator=gen) * scale + offset
    return x.to(device=device, dtype=dtype).contiguous(memory_format=memory_format)


def _randn(shape, device="cpu", dtype=torch.float32, seed=7):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen).to(device=device, dtype=dtype)


def _affine(device="cpu", dtype=torch.float32, seed=1):
    gen = torch.Generator().manual_seed(seed)
    weight = 1 + 0.5 * torch.randn(C, generator=gen)
    return weight.to(device, dtype), torch.randn(C, generator=gen).to(device, dtype)


def _running(device="cpu", dtype=torch.float32, seed=2):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(C, generator=gen).to(device, dtype),
            (0.5 + torch.rand(C, generator=gen)).to(device, dtype))


def _close(actual, expected, dtype=torch.float32):
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


def _run(fn, x, weight, bias, dy):
    """Output and (input, weight, bias) grads of fn(x, weight, bias) under upstream grad dy."""
    x = x.detach().clone().requires_grad_()
    params = [None if p is None else p.detach().clone().requires_grad_() for p in (weight, bias)]
    out = fn(x, *params)
    out.backward(dy)
    return out.detach(), x.grad, *(None if p is None else p.grad for p in params)


# ----------------------------------------------------------------------------- functional

@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_functional_matches_torch(device, backend, layout, affine, training):
    _ready(device, backend)
    shape, memory_format, _, _ = LAYOUTS[layout]
    x = _input(shape, device, memory_format=memory_format)
    dy = _randn(shape, device).contiguous(memory_format=memory_format)
    weight, bias = _affine(device) if affine else (None, None)
    rm, rv = _running(device)
    rm_t, rv_t = rm.clone(), rv.clone()
    ours = _run(lambda x, w, b: fusedreg.batch_norm(x, rm, rv, w, b, training, 0.3, EPS,
                                                    backend=backend), x, weight, bias, dy)
    theirs = _run(lambda x, w, b: F.batch_norm(x, rm_t, rv_t, w, b, training, 0.3, EPS),
                  x, weight, bias, dy)
    for got, want in zip(ours, theirs):
        if want is not None:
            _close(got, want)
    _close(rm, rm_t)
    _close(rv, rv_t)
    assert ours[0].is_contiguous(memory_format=memory_format)
    assert ours[1].is_contiguous(memory_format=memory_format)


@pytest.mark.parametrize("device,backend", PAIRS)
def test_incoming_grad_in_another_layout(device, backend):
    """Autograd may hand backward a contiguous grad for a channels_last output (and vice versa)."""
    _ready(device, backend)
    for memory_format, other in ((torch.channels_last, torch.contiguous_format),
                                 (torch.contiguous_format, torch.channels_last)):
        x = _input((3, C, 4, 5), device, memory_format=memory_format)
        dy = _randn(x.shape, device).contiguous(memory_format=other)
        weight, bias = _affine(device)
        ours = _run(lambda x, w, b: fusedreg.batch_norm(x, None, None, w, b, True, backend=backend),
                    x, weight, bias, dy)
        theirs = _run(lambda x, w, b: F.batch_norm(x, None, None, w, b, True), x, weight, bias, dy)
        assert ours[1].is_contiguous(memory_format=memory_format)
        for got, want in zip(ours, theirs):
            _close(got, want)


@pytest.mark.parametrize("device,backend", PAIRS)
def test_non_dense_and_permuted_inputs(device, backend):
    _ready(device, backend)
    base = _input((5, C, 14, 3), device)
    channel_outermost = base.transpose(0, 1).contiguous().transpose(0, 1)
    for x in (base[:, :, ::2], base[1:4, :, 1:], base.permute(0, 1, 3, 2), channel_outermost):
        dy = _randn(x.shape, device)
        weight, bias = _affine(device)
        ours = _run(lambda x, w, b: fusedreg.batch_norm(x, None, None, w, b, True, backend=backend),
                    x, weight, bias, dy)
        theirs = _run(lambda x, w, b: F.batch_norm(x, None, None, w, b, True), x, weight, bias, dy)
        for got, want in zip(ours, theirs):
            _close(got, want)


@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("shape", [(0, C, 4), (0, C), (4, 0, 3)], ids=["empty_batch", "empty_nc",
                                                                     "no_channels"])
def test_empty(device, backend, shape):
    _ready(device, backend)
    channels = shape[1]
    x = torch.empty(shape, device=device, requires_grad=True)
    rm, rv = torch.randn(channels, device=device), torch.rand(channels, device=device) + 0.5
    rm_before, rv_before = rm.clone(), rv.clone()
    weight = torch.randn(channels, device=device, requires_grad=True)
    bias = torch.randn(channels, device=device, requires_grad=True)
    out = fusedreg.batch_norm(x, rm, rv, weight, bias, True, backend=backend)
    out.sum().backward()
    assert out.shape == x.shape and x.grad.shape == x.shape
    assert torch.equal(rm, rm_before) and torch.equal(rv, rv_before)
    assert torch.equal(weight.grad, torch.zeros_like(weight))
    assert torch.equal(bias.grad, torch.zeros_like(bias))
    assert fusedreg.batch_norm(x, rm, rv, weight, bias, False, backend=backend).shape == shape


def _eval_forward_op(backend: str) -> str:
    """The op an eval forward runs: batch_norm_elemt on eval_stats' statistics, or on the cpu
    backend batch_norm_fwd's eval branch, which computes the same statistics itself."""
    return "batch_norm_fwd" if backend == "cpu" else "batch_norm_elemt"


class _OpLog(TorchDispatchMode):
    """(op name, largest tensor argument's numel) of every op dispatched inside."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        sizes = [a.numel() for a in torch.utils._pytree.tree_leaves((args, kwargs))
                 if isinstance(a, torch.Tensor)]
        self.calls.append((func.name(), max(sizes, default=0)))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("device,backend", [p for p in PAIRS if p[1] != "reference"])
def test_one_kernel_per_pass(device, backend):
    """Training forward and backward are one fused op each; eval forward is one elementwise op
    (on CPU batch_norm_fwd's eval branch, which prepares its statistics itself); everything else
    touches only [C] statistics (no hidden per-element pass, no layout copy)."""
    _ready(device, backend)
    suffix = "_triton" if backend == "triton" else ""
    x = _input((4, C, 5, 3), device, memory_format=torch.channels_last).requires_grad_()
    weight, bias = (t.requires_grad_() for t in _affine(device))
    rm, rv = _running(device)
    for training, forward_op in ((True, "batch_norm_fwd"), (False, _eval_forward_op(backend))):
        with _OpLog() as log:
            out = fusedreg.batch_norm(x, rm, rv, weight, bias, training, backend=backend)
        dy = torch.ones_like(out)
        with _OpLog() as backward_log:
            torch.autograd.grad(out, (x, weight, bias), dy)
        calls = log.calls + backward_log.calls
        fused = [name for name, _ in calls if name.startswith("fusedreg::")]
        assert fused == [f"fusedreg::{forward_op}{suffix}", f"fusedreg::batch_norm_bwd{suffix}"]
        assert all(numel <= C for name, numel in calls if not name.startswith("fusedreg::")), calls


@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_parameter_grads_without_input_grad(device, backend, training):
    _ready(device, backend)
    x = _input((4, C, 5, 3), device, memory_format=torch.channels_last)
    dy = _randn(x.shape, device)
    weight, bias = (t.requires_grad_() for t in _affine(device))
    rm, rv = _running(device)
    out = fusedreg.batch_norm(x, rm, rv, weight, bias, training, backend=backend)
    got = torch.autograd.grad(out, (weight, bias), dy)
    w, b = weight.detach().clone().requires_grad_(), bias.detach().clone().requires_grad_()
    expected = torch.autograd.grad(F.batch_norm(x, rm.clone(), rv.clone(), w, b, training), (w, b), dy)
    for g, e in zip(got, expected):
        _close(g, e)


def test_double_backward_raises_instead_of_returning_zeros():
    x = _input((4, C)).requires_grad_()
    out = fusedreg.batch_norm(x, None, None, training=True, backend="reference")
    (grad,) = torch.autograd.grad((out ** 3).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|differentiate"):
        grad.sum().backward()


def _max_err(value, exact):
    return (value.double() - exact.double()).abs().max().item()


@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["1d_ncl", "2d_channels_last"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_low_precision(device, backend, dtype, layout, training):
    """Against the reference on the same inputs per TOLERANCES, and no worse than twice PyTorch's
    own error against float64 PyTorch: output, grad_input, grad_weight, grad_bias, running stats."""
    _ready(device, backend)
    shape, memory_format, _, _ = LAYOUTS[layout]
    x = _input(shape, device, dtype, memory_format=memory_format)
    dy = _randn(shape, device, dtype).contiguous(memory_format=memory_format)
    weight, bias = _affine(device, dtype)

    def with_running(fn, cast):
        rm, rv = (cast(t) for t in _running(device, dtype))
        result = _run(lambda x, w, b: fn(x, rm, rv, w, b), cast(x), cast(weight), cast(bias), cast(dy))
        return result + ((rm, rv) if training else ())

    def ours_with(name):
        return lambda x, rm, rv, w, b: fusedreg.batch_norm(x, rm, rv, w, b, training, 0.1, EPS,
                                                           backend=name)

    def same(t):
        return t

    def torch_fn(x, rm, rv, w, b):
        return F.batch_norm(x, rm, rv, w, b, training, 0.1, EPS)

    ours = with_running(ours_with(backend), same)
    reference = with_running(ours_with("reference"), same)
    theirs = with_running(torch_fn, same)
    exact = with_running(torch_fn, lambda t: t.double())
    assert ours[0].dtype == ours[1].dtype == dtype
    for got, want in zip(ours, reference):
        _close(got, want, dtype)
    for i, (o, t, e) in enumerate(zip(ours, theirs, exact)):
        err_ours, err_theirs = _max_err(o, e), _max_err(t, e)
        assert err_ours <= 2 * err_theirs, (i, err_ours, err_theirs)


@pytest.mark.parametrize("device,backend", PAIRS)
def test_low_precision_input_with_float32_module(device, backend):
    """AMP's case: bfloat16 activations through a float32 module (float32 params and buffers)."""
    _ready(device, backend)
    x = _input((4, C, 5, 3), device, torch.bfloat16)
    dy = _randn(x.shape, device, torch.bfloat16)
    ours = fusedreg.nn.BatchNorm2d(C, backend=backend).to(device)
    theirs = torch.nn.BatchNorm2d(C).to(device)
    results = []
    for module in (ours, theirs):
        xs = x.clone().requires_grad_()
        out = module(xs)
        out.backward(dy)
        assert out.dtype == torch.bfloat16 and module.running_mean.dtype == torch.float32
        results.append((out, xs.grad, module.weight.grad, module.bias.grad, module.running_mean,
                        module.running_var))
    for got, want in zip(*results):  # bfloat16 output and grad_input, float32 for the rest
        _close(got.float(), want.float(), got.dtype)


@pytest.mark.parametrize("device,backend", [p for p in PAIRS if p[1] != "triton"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", [(7, C), (3, C, 5), (2, C, 3, 3)], ids=["nc", "ncl", "nchw"])
def test_gradcheck_float64(device, backend, shape, training):
    _ready(device, backend)
    x = _input(shape, device, torch.float64).requires_grad_()
    weight, bias = (t.requires_grad_() for t in _affine(device, torch.float64))
    # running stats only in eval: in training they would change between gradcheck's evaluations
    rm, rv = _running(device, torch.float64) if not training else (None, None)

    def fn(x, w, b):
        return fusedreg.BatchNormFunction.apply(x, w, b, rm, rv, training, 0.1, EPS, backend)

    assert torch.autograd.gradcheck(fn, (x, weight, bias))
    assert fn(x, weight, bias).grad_fn is not None


# ----------------------------------------------------------------------------- modules

def _torch_module(torch_cls, *args, bias=True, **kwargs):
    """torch's module; bias=False as torch >= 2.12 builds it (no bias parameter) on older torch too."""
    module = torch_cls(*args, **torch_bias_kwargs(bias), **kwargs)
    finish_bias(module, bias)
    return module


MODULE_CONFIGS = {
    "default": {},
    "momentum_none": {"momentum": None},
    "momentum_0.5": {"momentum": 0.5},
    "no_affine": {"affine": False},
    "no_running_stats": {"track_running_stats": False},
    "no_bias": {"bias": False},
}


def _train_step(module, x, dy):
    x = x.clone().requires_grad_()
    out = module(x)
    out.backward(dy)
    grads = [x.grad] + [p.grad.clone() for p in module.parameters()]
    with torch.no_grad():  # move the parameters so later steps see other weights
        for p in module.parameters():
            p -= 0.1 * p.grad
            p.grad = None
    return [out.detach()] + grads


# every layout with the defaults, every other configuration on a 1d and a channels_last layout
MODULE_CASES = ([("default", layout) for layout in LAYOUTS]
                + [(config, layout) for config in list(MODULE_CONFIGS)[1:]
                   for layout in ("1d_ncl", "3d_channels_last")])


@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("config,layout", MODULE_CASES)
def test_module_training_steps_then_eval(device, backend, config, layout):
    _ready(device, backend)
    shape, memory_format, torch_cls, ours_cls = LAYOUTS[layout]
    kwargs = MODULE_CONFIGS[config]
    theirs = _torch_module(torch_cls, C, **kwargs).to(device)
    ours = ours_cls(C, **kwargs, backend=backend).to(device)
    ours.load_state_dict(theirs.state_dict())
    for step in range(3):
        x = _input(shape, device, seed=10 + step, memory_format=memory_format) * (1 + step)
        dy = _randn(shape, device, seed=20 + step).contiguous(memory_format=memory_format)
        for got, want in zip(_train_step(ours, x, dy), _train_step(theirs, x, dy)):
            _close(got, want)
        for name, buffer in theirs.named_buffers():
            _close(dict(ours.named_buffers())[name], buffer)
    if ours.track_running_stats:
        assert int(ours.num_batches_tracked) == 3
        assert not torch.equal(ours.running_var, torch.ones_like(ours.running_var))
    ours.eval(), theirs.eval()
    x = _input(shape, device, seed=99, memory_format=memory_format)
    dy = _randn(shape, device, seed=98).contiguous(memory_format=memory_format)
    buffers_before = [b.clone() for b in ours.buffers()]
    for got, want in zip(_train_step(ours, x, dy), _train_step(theirs, x, dy)):
        _close(got, want)
    assert all(torch.equal(a, b) for a, b in zip(buffers_before, ours.buffers()))


def test_cumulative_average_is_exact_mean_of_batch_stats():
    module = fusedreg.nn.BatchNorm1d(C, momentum=None, backend="reference")
    means, variances = [], []
    for step in range(4):
        x = _input((6, C, 5), seed=30 + step) * (step + 1)
        module(x)
        variances.append(x.var((0, 2)))
        means.append(x.mean((0, 2)))
    _close(module.running_mean, torch.stack(means).mean(0))
    _close(module.running_var, torch.stack(variances).mean(0))


@pytest.mark.parametrize("cls,torch_cls", [(fusedreg.nn.BatchNorm1d, torch.nn.BatchNorm1d),
                                           (fusedreg.nn.BatchNorm2d, torch.nn.BatchNorm2d),
                                           (fusedreg.nn.BatchNorm3d, torch.nn.BatchNorm3d)])
@pytest.mark.parametrize("kwargs", [{}, {"eps": 1e-3, "momentum": None, "affine": False},
                                    {"track_running_stats": False}, {"bias": False}])
def test_module_is_a_drop_in(cls, torch_cls, kwargs):
    ours, theirs = cls(5, **kwargs), _torch_module(torch_cls, 5, **kwargs)
    assert isinstance(ours, torch_cls)
    assert repr(ours) == repr(theirs)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    for (name, a), (_, b) in zip(ours.state_dict().items(), theirs.state_dict().items()):
        assert torch.equal(a, b) and a.dtype == b.dtype, name
    assert cls(5, backend="reference").backend == "reference"
    module = cls(4, dtype=torch.float64)
    assert module.weight.dtype == module.running_mean.dtype == torch.float64
    assert module.num_batches_tracked.dtype == torch.int64


@pytest.mark.parametrize("direction", ["torch_to_fusedreg", "fusedreg_to_torch"])
def test_checkpoints_load_both_ways(direction, tmp_path):
    theirs, ours = torch.nn.BatchNorm2d(C, momentum=None), fusedreg.nn.BatchNorm2d(C, momentum=None,
                                                                                   backend="reference")
    source, target = (theirs, ours) if direction == "torch_to_fusedreg" else (ours, theirs)
    for step in range(3):
        _train_step(source, _input((4, C, 3, 3), seed=step), _randn((4, C, 3, 3), seed=50 + step))
    torch.save(source.state_dict(), tmp_path / "bn.pt")
    target.load_state_dict(torch.load(tmp_path / "bn.pt"))
    for (name, a), (_, b) in zip(source.state_dict().items(), target.state_dict().items()):
        assert torch.equal(a, b), name
    assert int(target.num_batches_tracked) == 3
    source.eval(), target.eval()
    x = _input((2, C, 3, 3), seed=9)
    _close(target(x), source(x))
    # both keep training identically from the loaded state (the cumulative average continues)
    source.train(), target.train()
    dy = _randn(x.shape, seed=60)
    for got, want in zip(_train_step(target, x, dy), _train_step(source, x, dy)):
        _close(got, want)
    _close(target.running_var, source.running_var)


def test_bfloat16_module_keeps_bfloat16_buffers():
    ours = fusedreg.nn.BatchNorm1d(C, dtype=torch.bfloat16, backend="reference")
    theirs = torch.nn.BatchNorm1d(C, dtype=torch.bfloat16)
    x = _input((9, C), dtype=torch.bfloat16)
    _close(ours(x), theirs(x), torch.bfloat16)
    assert ours.running_mean.dtype == torch.bfloat16
    _close(ours.running_mean, theirs.running_mean, torch.bfloat16)
    _close(ours.running_var, theirs.running_var, torch.bfloat16)


# ----------------------------------------------------------------------------- errors

def _raises_like_torch(ours, theirs):
    with pytest.raises(Exception) as expected:
        theirs()
    with pytest.raises(type(expected.value), match=re.escape(str(expected.value).split("(")[0][:40])):
        ours()


ERROR_CASES = {
    "one_value_per_channel_nc": lambda f: f(torch.randn(1, C), None, None, training=True),
    "one_value_per_channel_nchw": lambda f: f(torch.randn(1, C, 1, 1), None, None, training=True),
    "running_mean_size": lambda f: f(torch.randn(4, C), torch.zeros(C + 1), torch.ones(C + 1)),
    "running_var_size": lambda f: f(torch.randn(4, C), torch.zeros(C), torch.ones(C + 2)),
    "weight_size": lambda f: f(torch.randn(4, C), None, None, torch.ones(C + 1), training=True),
    "bias_size": lambda f: f(torch.randn(4, C), None, None, None, torch.ones(2), training=True),
    "eval_without_running_mean": lambda f: f(torch.randn(4, C), None, torch.ones(C)),
    "eval_without_running_var": lambda f: f(torch.randn(4, C), torch.zeros(C), None),
    "eval_without_running_stats": lambda f: f(torch.randn(4, C), None, None),
    "running_mean_without_var": lambda f: f(torch.randn(4, C), torch.zeros(C), None, training=True),
    "eps_zero_training": lambda f: f(torch.randn(4, C), None, None, training=True, eps=0.0),
    "eps_negative": lambda f: f(torch.randn(4, C), torch.zeros(C), torch.ones(C), eps=-1e-5),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_functional_errors_like_torch(case):
    if case.startswith("eps_"):  # the same errors, worded per torch version: ours are torch 2.12's
        with pytest.raises(Exception) as expected:
            ERROR_CASES[case](F.batch_norm)
        with pytest.raises(type(expected.value), match="batch_norm eps must be"):
            ERROR_CASES[case](fusedreg.batch_norm)
        return
    _raises_like_torch(lambda: ERROR_CASES[case](fusedreg.batch_norm),
                       lambda: ERROR_CASES[case](F.batch_norm))


def test_functional_momentum_none_is_a_cumulative_average():
    """API.md: momentum=None averages over all batches, counted in num_batches_tracked."""
    theirs = torch.nn.BatchNorm1d(C, momentum=None)
    mean, var, count = torch.zeros(C), torch.ones(C), torch.tensor(0)
    for _ in range(3):
        x = torch.randn(6, C)
        theirs(x)
        fusedreg.batch_norm(x, mean, var, training=True, momentum=None, num_batches_tracked=count)
    assert count.item() == 3
    _close(mean, theirs.running_mean)
    _close(var, theirs.running_var)
    with pytest.raises(TypeError, match="num_batches_tracked"):
        fusedreg.batch_norm(x, mean, var, training=True, momentum=None)
    assert count.item() == 3
    _close(fusedreg.batch_norm(x, None, None, training=True, momentum=None),
           F.batch_norm(x, None, None, training=True))


def test_what_torch_accepts_is_accepted():
    def ours(*args, **kwargs):
        return fusedreg.batch_norm(*args, **kwargs, backend="reference")

    x = torch.randn(4, C)
    _close(ours(x, torch.zeros(C), torch.ones(C), eps=0.0), x)
    assert ours(torch.randn(1, C), torch.zeros(C), torch.ones(C)).shape == (1, C)
    x = torch.randn(1, C, 2)
    _close(ours(x, None, None, training=True), F.batch_norm(x, None, None, training=True))


@pytest.mark.parametrize("cls,torch_cls,good,bad_shapes", [
    (fusedreg.nn.BatchNorm1d, torch.nn.BatchNorm1d, (4, C, 3), [(C,), (2, C, 3, 3)]),
    (fusedreg.nn.BatchNorm2d, torch.nn.BatchNorm2d, (2, C, 3, 3), [(2, C, 3), (2, C, 3, 3, 3)]),
    (fusedreg.nn.BatchNorm3d, torch.nn.BatchNorm3d, (2, C, 3, 3, 3), [(2, C, 3, 3)]),
])
def test_module_input_checks_like_torch(cls, torch_cls, good, bad_shapes):
    for shape in bad_shapes:
        x = torch.randn(shape)
        _raises_like_torch(lambda: cls(C)(x), lambda: torch_cls(C)(x))
    wrong_channels = torch.randn((good[0], C + 1) + good[2:])
    _raises_like_torch(lambda: cls(C)(wrong_channels), lambda: torch_cls(C)(wrong_channels))
    one_value = torch.randn((1, C) + (1,) * (len(good) - 2))
    _raises_like_torch(lambda: cls(C)(one_value), lambda: torch_cls(C)(one_value))
    assert cls(C, backend="reference")(torch.randn(good)).shape == good


# ----------------------------------------------------------------------------- torch.compile

class _ConvBN(torch.nn.Module):
    def __init__(self, backend):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 5, 3, bias=False)
        self.bn = fusedreg.nn.BatchNorm2d(5, backend=backend)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


@pytest.mark.parametrize("backend", ["reference"] + native_backends("cpu"))
def test_compile_fullgraph_conv_bn(backend):
    _ready("cpu", backend)
    torch.manual_seed(0)
    module = _ConvBN(backend)
    eager = _ConvBN(backend)
    eager.load_state_dict(module.state_dict())
    torch._dynamo.reset()
    compiled = torch.compile(module, fullgraph=True)
    for step in range(2):
        x = torch.randn(4, 3, 7, 6).contiguous(memory_format=torch.channels_last)
        got, want = compiled(x), eager(x)
        got.sum().backward()
        want.sum().backward()
        _close(got, want)
        _close(module.conv.weight.grad, eager.conv.weight.grad)
        _close(module.bn.weight.grad, eager.bn.weight.grad)
        _close(module.bn.running_var, eager.bn.running_var)
    assert int(module.bn.num_batches_tracked) == 2
    module.eval(), eager.eval()
    x = torch.randn(2, 3, 7, 6)
    _close(compiled(x), eager(x))


# ----------------------------------------------------------------------------- GPU sizes

def _check_many_blocks(device, backend, shape, memory_format, dtype):
    """Thousands of values per channel, against float64: output, gradients and running stats no
    worse than twice PyTorch's own error in `dtype`. A float32 result may in addition be off by
    2**-22 of its largest magnitude (one or two ulps): a correctly rounded float32 result already
    carries up to half of that, so twice PyTorch's error alone can demand sub-ulp agreement."""
    channels = shape[1]
    gen = torch.Generator().manual_seed(5)
    x = (torch.randn(shape, generator=gen) * 2 + 5).to(dtype).contiguous(memory_format=memory_format)
    dy = torch.randn(shape, generator=gen).to(dtype).contiguous(memory_format=memory_format)
    weight, bias = torch.randn(channels, generator=gen), torch.randn(channels, generator=gen)

    def run(fn, cast):
        rm, rv = cast(torch.zeros(channels)), cast(torch.ones(channels))
        result = _run(lambda x, w, b: fn(x, rm, rv, w, b, True), cast(x), cast(weight), cast(bias),
                      cast(dy))
        return result + (rm, rv)

    ours = run(lambda *a: fusedreg.batch_norm(*a, backend=backend), lambda t: t.to(device))
    theirs = run(F.batch_norm, lambda t: t.to(device))
    exact = run(F.batch_norm, lambda t: t.to(device, torch.float64))
    assert ours[0].is_contiguous(memory_format=memory_format) and ours[0].dtype == dtype
    assert ours[1].is_contiguous(memory_format=memory_format)
    names = ["out", "grad_input", "grad_weight", "grad_bias", "running_mean", "running_var"]
    for name, o, t, e in zip(names, ours, theirs, exact):
        assert o.dtype == t.dtype, name
        allowed = 2 * _max_err(t, e)
        if o.dtype == torch.float32:
            allowed += 2.0 ** -22 * e.abs().max().item()
        assert _max_err(o, e) <= allowed, (name, _max_err(o, e), _max_err(t, e))


@pytest.mark.parametrize("backend", [b for b in ["reference"] + native_backends("cpu") if b != "triton"])
@pytest.mark.parametrize("shape,memory_format", [
    ((16, 5, 20, 21), torch.contiguous_format), ((16, 5, 20, 21), torch.channels_last),
    ((3001, 7), torch.contiguous_format)], ids=["nchw", "nhwc", "1d"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_sizes_that_need_many_blocks(backend, shape, memory_format, dtype):
    _ready("cpu", backend)
    _check_many_blocks("cpu", backend, shape, memory_format, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", native_backends("cuda") or ["cuda"])
@pytest.mark.parametrize("shape,memory_format", [
    ((32, 64, 28, 28), torch.contiguous_format), ((32, 64, 28, 28), torch.channels_last),
    ((8, 2048, 7, 7), torch.channels_last), ((4096, 257), torch.contiguous_format),
    ((3, 17, 1031), torch.contiguous_format)], ids=["nchw", "nhwc", "wide_nhwc", "1d", "odd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_sizes_that_need_many_blocks(backend, shape, memory_format, dtype):
    _ready("cuda", backend)
    _check_many_blocks("cuda", backend, shape, memory_format, dtype)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices in one process")
def test_cuda_on_chip_path_on_two_devices():
    """The on-chip kernels need a per-device opt-in to more than 48 KiB of shared memory: with it
    cached per process, the second device's launch failed with "invalid argument". 64 KiB per
    channel forward, 128 KiB backward, 80 channels: the on-chip path on an H100/H200."""
    _ready("cuda", "cuda")
    for device in ("cuda:0", "cuda:1"):
        gen = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(16, 80, 32, 32, device=device, generator=gen, requires_grad=True)
        running = (torch.zeros(80, device=device), torch.ones(80, device=device))
        expected_running = tuple(r.clone() for r in running)
        out = fusedreg.batch_norm(x, *running, training=True, backend="cuda")
        x_ref = x.detach().clone().requires_grad_(True)
        expected = F.batch_norm(x_ref, *expected_running, training=True)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
        for r, e in zip(running, expected_running):
            torch.testing.assert_close(r, e, atol=1e-6, rtol=1e-5)
        dy = torch.randn(x.shape, device=device, generator=gen)
        (grad,) = torch.autograd.grad(out, x, dy)
        (grad_ref,) = torch.autograd.grad(expected, x_ref, dy)
        torch.testing.assert_close(grad, grad_ref, atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------- eval, frozen parameters

_OPS_MODULE = __import__("fusedreg.ops.batch_norm", fromlist=["kernel"])


def _frozen_affine(device, dtype, params):
    """(weight, bias, running_mean, running_var) of a frozen BatchNorm: parameters that need no
    gradient in the data dtype or in float32 (AMP), or none at all (affine=False)."""
    param_dtype = torch.float32 if params == "frozen_fp32" else dtype
    weight, bias = _affine(device, param_dtype) if params != "no_affine" else (None, None)
    return (weight, bias, *_running(device, param_dtype))


def _input_grad(fn, x, dy):
    """Output and input grad of fn(x), the only leaf that needs a gradient."""
    x = x.detach().clone().requires_grad_()
    out = fn(x)
    (grad,) = torch.autograd.grad(out, x, dy)
    return out.detach(), grad


@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("params", ["frozen", "frozen_fp32", "no_affine"])
def test_eval_frozen_backward_matches_torch(device, backend, layout, dtype, params):
    """Fine-tuning with frozen BatchNorm: running statistics, parameters without gradients."""
    if params == "frozen_fp32" and dtype == torch.float32:
        pytest.skip("same as frozen")
    _ready(device, backend)
    shape, memory_format, _, _ = LAYOUTS[layout]
    x = _input(shape, device, dtype, memory_format=memory_format)
    dy = _randn(shape, device, dtype).contiguous(memory_format=memory_format)
    weight, bias, rm, rv = _frozen_affine(device, dtype, params)
    ours = _input_grad(lambda x: fusedreg.batch_norm(x, rm, rv, weight, bias, False, 0.1, EPS,
                                                     backend=backend), x, dy)
    theirs = _input_grad(lambda x: F.batch_norm(x, rm, rv, weight, bias, False, 0.1, EPS), x, dy)
    for got, want in zip(ours, theirs):
        assert got.dtype == dtype and got.is_contiguous(memory_format=memory_format)
        _close(got, want, dtype)


def _record_kernels(monkeypatch) -> list:
    """The op names BatchNormFunction asks its backend for, in order."""
    names = []
    real = _OPS_MODULE.kernel

    def recording(name, backend, reference):
        names.append(name)
        return real(name, backend, reference)

    monkeypatch.setattr(_OPS_MODULE, "kernel", recording)
    return names


def _frozen_eval_module(entry, backend, device):
    """An eval-mode BatchNorm2d over C channels whose parameters need no gradient."""
    if entry == "module":
        module = fusedreg.nn.BatchNorm2d(C, backend=backend)
    elif entry == "module_no_affine":
        module = fusedreg.nn.BatchNorm2d(C, affine=False, backend=backend)
    else:
        module = fusedreg.nn.SyncBatchNorm(C, backend=backend)
    module.running_mean, module.running_var = _running(device)
    module.requires_grad_(False)
    return module.to(device).eval()


@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("entry", ["functional", "module", "module_no_affine", "sync_module"])
def test_eval_frozen_backward_is_one_elementwise_pass(device, backend, entry, monkeypatch):
    """grad_input = dy * invstd * weight: batch_norm_elemt over dy (read dy, write dx), neither the
    reductions of batch_norm_bwd nor a read of x; the input is not kept for backward either."""
    _ready(device, backend)
    x = _input((4, C, 5, 3), device, memory_format=torch.channels_last).requires_grad_()
    dy = _randn(x.shape, device).contiguous(memory_format=torch.channels_last)
    if entry == "functional":
        weight, bias, rm, rv = _frozen_affine(device, torch.float32, "frozen")
        module = None
    else:
        module = _frozen_eval_module(entry, backend, device)
    names = _record_kernels(monkeypatch)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = (module(x) if module is not None else
               fusedreg.batch_norm(x, rm, rv, weight, bias, False, backend=backend))
    assert names == [_eval_forward_op(backend)] and all(n <= C for n in saved), (names, saved)
    with _OpLog() as log:
        (grad,) = torch.autograd.grad(out, x, dy)
    assert names == [_eval_forward_op(backend), "batch_norm_elemt"], names
    if backend != "reference":
        suffix = "_triton" if backend == "triton" else ""
        fused = [name for name, _ in log.calls if name.startswith("fusedreg::")]
        assert fused == [f"fusedreg::batch_norm_elemt{suffix}"]
        assert all(numel <= C for name, numel in log.calls if not name.startswith("fusedreg::")), \
            log.calls
    with torch.no_grad():
        reference = (torch.nn.BatchNorm2d(C, affine=entry != "module_no_affine").to(device).eval()
                     if module is not None else None)
        if reference is not None:
            reference.load_state_dict(module.state_dict())
    x_t = x.detach().clone().requires_grad_()
    expected = (reference(x_t) if reference is not None else
                F.batch_norm(x_t, rm, rv, weight, bias, False))
    (grad_t,) = torch.autograd.grad(expected, x_t, dy)
    _close(out, expected)
    _close(grad, grad_t)
    assert grad.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("layout", ["1d_nc", "2d_channels_last", "3d"])
@pytest.mark.parametrize("trainable", [("input", "weight", "bias"), ("input", "weight"),
                                       ("input", "bias"), ("weight",), ("bias",)],
                         ids=lambda names: "+".join(names))
def test_eval_with_trainable_parameters_matches_torch(device, backend, layout, trainable,
                                                     monkeypatch):
    """Eval mode whose parameters do need gradients keeps the reductions (grad_weight =
    sum(dy * x_hat), grad_bias = sum(dy)), with every gradient as torch's."""
    _ready(device, backend)
    shape, memory_format, _, _ = LAYOUTS[layout]
    x = _input(shape, device, memory_format=memory_format)
    dy = _randn(shape, device).contiguous(memory_format=memory_format)
    weight, bias = _affine(device)
    rm, rv = _running(device)
    names = _record_kernels(monkeypatch)
    results = []
    for fn in (lambda x, w, b: fusedreg.batch_norm(x, rm, rv, w, b, False, backend=backend),
               lambda x, w, b: F.batch_norm(x, rm, rv, w, b, False)):
        leaves = dict(zip(("input", "weight", "bias"),
                          (t.detach().clone() for t in (x, weight, bias))))
        for name in trainable:
            leaves[name].requires_grad_()
        out = fn(leaves["input"], leaves["weight"], leaves["bias"])
        grads = torch.autograd.grad(out, [leaves[name] for name in trainable], dy)
        results.append((out.detach(), *grads))
    assert names == [_eval_forward_op(backend),
                     "batch_norm_bwd" if "input" in trainable else "batch_norm_bwd_reduce"], names
    for got, want in zip(*results):
        _close(got, want)
    if "input" in trainable:
        assert results[0][1].is_contiguous(memory_format=memory_format)


@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("shape", [(1, C), (1, C, 1, 1)], ids=["1xC", "1xCx1x1"])
@pytest.mark.parametrize("params", ["frozen", "no_affine", "trainable"])
def test_eval_backward_one_value_per_channel(device, backend, shape, params):
    """One value per channel is F.batch_norm's training error only; eval normalizes it with the
    running statistics and differentiates it like any other batch."""
    _ready(device, backend)
    x = _input(shape, device)
    dy = _randn(shape, device)
    weight, bias, rm, rv = _frozen_affine(device, torch.float32,
                                          "no_affine" if params == "no_affine" else "frozen")
    trainable = params == "trainable"
    results = []
    for fn in (lambda x, w, b: fusedreg.batch_norm(x, rm, rv, w, b, False, backend=backend),
               lambda x, w, b: F.batch_norm(x, rm, rv, w, b, False)):
        if trainable:
            results.append(_run(fn, x, weight, bias, dy))
        else:
            results.append(_input_grad(lambda x: fn(x, weight, bias), x, dy))
    for got, want in zip(*results):
        _close(got, want)


@pytest.mark.parametrize("backend", ["reference"] + native_backends("cpu"))
def test_compile_fullgraph_frozen_eval_backward(backend):
    """torch.compile traces the same choice: the backward graph of a frozen eval BatchNorm is the
    elementwise op, and the gradients are eager torch's."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.aot_autograd import make_boxed_func

    _ready("cpu", backend)
    torch.manual_seed(0)
    module = _ConvBN(backend).eval()
    module.bn.running_mean.normal_()
    module.bn.running_var.uniform_(0.5, 1.5)
    module.bn.requires_grad_(False)
    eager = torch.nn.Sequential(torch.nn.Conv2d(3, 5, 3, bias=False), torch.nn.BatchNorm2d(5))
    eager[0].load_state_dict(module.conv.state_dict())
    eager[1].load_state_dict(module.bn.state_dict())
    eager.eval()[1].requires_grad_(False)
    backward_targets = []

    def record_backward(graph, example_inputs):
        backward_targets.extend(str(node.target) for node in graph.graph.nodes
                                if node.op == "call_function")
        return make_boxed_func(graph.forward)

    torch._dynamo.reset()
    compiled = torch.compile(module, fullgraph=True, backend=aot_autograd(
        fw_compiler=lambda graph, example_inputs: make_boxed_func(graph.forward),
        bw_compiler=record_backward))
    x = torch.randn(4, 3, 7, 6).contiguous(memory_format=torch.channels_last)
    got, want = compiled(x), torch.relu(eager(x))
    got.square().sum().backward()
    want.square().sum().backward()
    _close(got, want)
    _close(module.conv.weight.grad, eager[0].weight.grad)
    suffix = "_triton" if backend == "triton" else ""
    if backend != "reference":
        fused = [t for t in backward_targets if t.startswith("fusedreg.")]
        assert fused == [f"fusedreg.batch_norm_elemt{suffix}.default"], backward_targets
