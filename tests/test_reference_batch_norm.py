"""fusedreg.reference.batch_norm against F.batch_norm, torch autograd, and float64 gradcheck; the
SyncBatchNorm/eval pieces against torch and against fwd/bwd."""
import pytest
import torch
import torch.nn.functional as F

from conftest import TOLERANCES
from fusedreg.reference.batch_norm import (batch_norm_bwd, batch_norm_bwd_elemt, batch_norm_bwd_reduce,
                                           batch_norm_elemt, batch_norm_fwd, batch_norm_stats)

C = 3
SHAPES = [(7, C), (5, C, 13), (3, C, 5, 7), (2, C, 3, 5, 3)]
SHAPE_IDS = ["1d_nc", "1d_ncl", "2d", "3d"]
EPS = 1e-5


def _input(shape, dtype=torch.float32, seed=0, memory_format=torch.contiguous_format):
    gen = torch.Generator().manual_seed(seed)
    # per-channel offsets and scales, so a wrong reduction dimension cannot go unnoticed
    offset = torch.tensor([0.5, -2.0, 3.0]).reshape([1, C] + [1] * (len(shape) - 2))
    scale = torch.tensor([1.0, 0.3, 2.5]).reshape(offset.shape)
    x = torch.randn(shape, generator=gen) * scale + offset
    return x.to(dtype).contiguous(memory_format=memory_format)


def _grad_out(shape, dtype=torch.float32, seed=7, memory_format=torch.contiguous_format):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen).to(dtype).contiguous(memory_format=memory_format)


def _affine(dtype=torch.float32, seed=1):
    gen = torch.Generator().manual_seed(seed)
    weight = 1 + 0.5 * torch.randn(C, generator=gen)
    return weight.to(dtype), torch.randn(C, generator=gen).to(dtype)


def _running(dtype=torch.float32, seed=2):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(C, generator=gen).to(dtype), (0.5 + torch.rand(C, generator=gen)).to(dtype)


def _assert_close(actual, expected, dtype=torch.float32):
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_training_forward_matches_torch(shape, affine):
    x = _input(shape)
    weight, bias = _affine() if affine else (None, None)
    rm, rv = _running()
    rm_t, rv_t = rm.clone(), rv.clone()
    out, mean, invstd = batch_norm_fwd(x, weight, bias, rm, rv, True, 0.1, EPS)
    expected = F.batch_norm(x, rm_t, rv_t, weight, bias, True, 0.1, EPS)
    _assert_close(out, expected)
    _assert_close(rm, rm_t)
    _assert_close(rv, rv_t)
    _, save_mean, save_invstd = torch.ops.aten.native_batch_norm(x, weight, bias, None, None, True,
                                                                 0.1, EPS)
    assert mean.dtype == invstd.dtype == torch.float32 and mean.shape == invstd.shape == (C,)
    _assert_close(mean, save_mean)
    _assert_close(invstd, save_invstd)


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_eval_forward_matches_torch(shape, affine):
    x = _input(shape)
    weight, bias = _affine() if affine else (None, None)
    rm, rv = _running()
    rm_before, rv_before = rm.clone(), rv.clone()
    out, mean, invstd = batch_norm_fwd(x, weight, bias, rm, rv, False, 0.1, EPS)
    _assert_close(out, F.batch_norm(x, rm, rv, weight, bias, False, 0.1, EPS))
    assert torch.equal(rm, rm_before) and torch.equal(rv, rv_before)
    assert torch.equal(mean, rm)
    _assert_close(invstd, 1 / torch.sqrt(rv + EPS))


@pytest.mark.parametrize("momentum", [0.1, 0.37, 1.0, 0.0])
def test_running_stats_over_steps_then_eval(momentum):
    rm, rv = torch.zeros(C), torch.ones(C)
    rm_t, rv_t = rm.clone(), rv.clone()
    weight, bias = _affine()
    for step in range(4):
        x = _input((5, C, 7), seed=10 + step)
        batch_norm_fwd(x, weight, bias, rm, rv, True, momentum, EPS)
        F.batch_norm(x, rm_t, rv_t, weight, bias, True, momentum, EPS)
    _assert_close(rm, rm_t)
    _assert_close(rv, rv_t)
    if momentum > 0:
        assert not torch.equal(rv, torch.ones(C))
    x = _input((5, C, 7), seed=99)
    _assert_close(batch_norm_fwd(x, weight, bias, rm, rv, False, momentum, EPS)[0],
                  F.batch_norm(x, rm_t, rv_t, weight, bias, False, momentum, EPS))


def test_cumulative_average_is_momentum_one_over_count():
    module = torch.nn.BatchNorm1d(C, momentum=None)
    rm, rv = torch.zeros(C), torch.ones(C)
    for step in range(1, 5):
        x = _input((7, C, 3), seed=20 + step)
        module(x)
        batch_norm_fwd(x, None, None, rm, rv, True, 1.0 / step, EPS)
    _assert_close(rm, module.running_mean)
    _assert_close(rv, module.running_var)


def test_running_var_is_unbiased():
    x = _input((2, C, 3))
    rm, rv = torch.zeros(C), torch.zeros(C)
    batch_norm_fwd(x, None, None, rm, rv, True, 1.0, EPS)
    dims = [0, 2]
    torch.testing.assert_close(rm, x.mean(dims))
    torch.testing.assert_close(rv, x.var(dims, unbiased=True))


@pytest.mark.parametrize("shape,memory_format", [((3, C, 5, 7), torch.channels_last),
                                                 ((2, C, 3, 5, 3), torch.channels_last_3d)],
                         ids=["2d", "3d"])
def test_channels_last_stays_channels_last(shape, memory_format):
    x = _input(shape, memory_format=memory_format).requires_grad_()
    dy = _grad_out(shape, memory_format=memory_format)
    weight, bias = _affine()
    out, mean, invstd = batch_norm_fwd(x.detach(), weight, bias, None, None, True, 0.1, EPS)
    grad_input, _, _ = batch_norm_bwd(dy, x.detach(), weight, mean, invstd, True)
    assert out.is_contiguous(memory_format=memory_format)
    assert grad_input.is_contiguous(memory_format=memory_format)
    expected = F.batch_norm(x, None, None, weight, bias, True, 0.1, EPS)
    expected.backward(dy)
    _assert_close(out, expected.detach())
    _assert_close(grad_input, x.grad)


def test_non_dense_input_gives_contiguous_output():
    base = _input((5, C, 14))
    x = base[:, :, ::2]
    out, _, _ = batch_norm_fwd(x, None, None, None, None, True, 0.1, EPS)
    assert out.is_contiguous()
    _assert_close(out, F.batch_norm(x, None, None, None, None, True, 0.1, EPS))


def _torch_grads(x, weight, bias, rm, rv, training, dy):
    x = x.clone().requires_grad_()
    weight = (torch.ones(C) if weight is None else weight.clone()).requires_grad_()
    bias = (torch.zeros(C) if bias is None else bias.clone()).requires_grad_()
    F.batch_norm(x, rm, rv, weight, bias, training, 0.1, EPS).backward(dy)
    return x.grad, weight.grad, bias.grad


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_backward_matches_torch_autograd(shape, affine, training):
    x, dy = _input(shape), _grad_out(shape)
    weight, bias = _affine() if affine else (None, None)
    rm, rv = _running()
    _, mean, invstd = batch_norm_fwd(x, weight, bias, rm.clone(), rv.clone(), training, 0.1, EPS)
    grads = batch_norm_bwd(dy, x, weight, mean, invstd, training)
    expected = _torch_grads(x, weight, bias, rm.clone(), rv.clone(), training, dy)
    assert grads[1].dtype == grads[2].dtype == torch.float32
    for got, want in zip(grads, expected):
        _assert_close(got, want)


def _max_err(value, exact):
    return (value.double() - exact).abs().max().item()


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(5, C, 13), (3, C, 5, 7)], ids=["1d", "2d"])
def test_low_precision_no_worse_than_twice_torch(shape, dtype, training):
    """Errors against float64 PyTorch on the same rounded inputs are at most twice PyTorch's own
    errors in `dtype`: output, grad_input, grad_weight, grad_bias, and the running stats."""
    x, dy = _input(shape, dtype), _grad_out(shape, dtype)
    weight, bias = _affine(dtype)
    rm, rv = _running(dtype)

    def torch_run(cast):
        xs = cast(x).requires_grad_()
        w, b = cast(weight).requires_grad_(), cast(bias).requires_grad_()
        rms, rvs = cast(rm), cast(rv)
        out = F.batch_norm(xs, rms, rvs, w, b, training, 0.1, EPS)
        out.backward(cast(dy))
        return out.detach(), xs.grad, w.grad, b.grad, rms, rvs

    exact = torch_run(lambda t: t.detach().double().clone())
    theirs = torch_run(lambda t: t.detach().clone())
    rm_ours, rv_ours = rm.clone(), rv.clone()
    out, mean, invstd = batch_norm_fwd(x, weight, bias, rm_ours, rv_ours, training, 0.1, EPS)
    ours = (out,) + batch_norm_bwd(dy, x, weight, mean, invstd, training) + (rm_ours, rv_ours)
    assert out.dtype == ours[1].dtype == dtype
    names = ["out", "grad_input", "grad_weight", "grad_bias", "running_mean", "running_var"]
    for name, o, t, e in zip(names, ours, theirs, exact):
        if not training and name.startswith("running"):
            continue
        err_theirs, err_ours = _max_err(t, e), _max_err(o, e)
        assert err_theirs > 0, name
        assert err_ours <= 2 * err_theirs, (name, err_ours, err_theirs)


def test_statistics_are_sound_with_a_large_mean():
    """A naive E[x^2] - E[x]^2 in float32 loses the variance entirely at this offset."""
    gen = torch.Generator().manual_seed(3)
    x64 = 1e4 + torch.randn(64, C, 33, generator=gen, dtype=torch.float64) * 0.5
    x = x64.float()
    _, mean, invstd = batch_norm_fwd(x, None, None, None, None, True, 0.1, EPS)
    x_rounded = x.double()
    var64 = x_rounded.var([0, 2], unbiased=False)
    # the mean to within two float32 ulps (2**-23 relative each)
    torch.testing.assert_close(mean.double(), x_rounded.mean([0, 2]), atol=0, rtol=2 * 2.0 ** -23)
    torch.testing.assert_close(invstd.double(), 1 / torch.sqrt(var64 + EPS), atol=0, rtol=1e-5)


@pytest.mark.parametrize("shape", [(1, C), (1, C, 1), (1, C, 1, 1)])
def test_one_value_per_channel_raises_in_training(shape):
    x = torch.randn(shape)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        batch_norm_fwd(x, None, None, None, None, True, 0.1, EPS)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        F.batch_norm(x, None, None, None, None, True, 0.1, EPS)
    rm, rv = _running()
    _assert_close(batch_norm_fwd(x, None, None, rm, rv, False, 0.1, EPS)[0],
                  F.batch_norm(x, rm, rv, None, None, False, 0.1, EPS))


def test_eval_without_running_stats_raises_like_torch():
    x = _input((5, C))
    with pytest.raises(RuntimeError, match="running_mean must be defined"):
        batch_norm_fwd(x, None, None, None, None, False, 0.1, EPS)


def test_empty_batch_leaves_running_stats():
    x = torch.empty(0, C, 5)
    rm, rv = _running()
    rm_before, rv_before = rm.clone(), rv.clone()
    out, mean, invstd = batch_norm_fwd(x, None, None, rm, rv, True, 0.1, EPS)
    expected = F.batch_norm(x, rm_before.clone(), rv_before.clone(), None, None, True, 0.1, EPS)
    assert out.shape == expected.shape == x.shape
    assert torch.equal(rm, rm_before) and torch.equal(rv, rv_before)
    grad_input, grad_weight, grad_bias = batch_norm_bwd(x, x, None, mean, invstd, True)
    assert grad_input.shape == x.shape
    assert torch.equal(grad_weight, torch.zeros(C)) and torch.equal(grad_bias, torch.zeros(C))


class ReferenceBatchNorm(torch.autograd.Function):
    """batch_norm_fwd / batch_norm_bwd as one differentiable function, for gradcheck."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, training):
        out, mean, invstd = batch_norm_fwd(x, weight, bias, running_mean, running_var, training,
                                           0.1, EPS)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.training = training
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, mean, invstd = ctx.saved_tensors
        grad_input, grad_weight, grad_bias = batch_norm_bwd(grad_out, x, weight, mean, invstd,
                                                            ctx.training)
        dtype = weight.dtype
        return grad_input, grad_weight.to(dtype), grad_bias.to(dtype), None, None, None


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", [(7, C), (3, C, 5), (2, C, 3, 3)], ids=["nc", "ncl", "nchw"])
def test_gradcheck_float64(shape, training):
    x = _input(shape, torch.float64).requires_grad_()
    weight, bias = (t.requires_grad_() for t in _affine(torch.float64))
    # running stats only in eval: in training they would change between gradcheck's evaluations
    rm, rv = _running(torch.float64) if not training else (None, None)
    assert torch.autograd.gradcheck(
        lambda x, w, b: ReferenceBatchNorm.apply(x, w, b, rm, rv, training), (x, weight, bias))


# ----------------------------------------------------------------------------- the pieces

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_stats_are_mean_and_biased_variance(shape, dtype):
    x = _input(shape, dtype)
    mean, var = batch_norm_stats(x)
    stats_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert mean.dtype == var.dtype == stats_dtype and mean.shape == var.shape == (C,)
    dims = [0] + list(range(2, len(shape)))
    var_t, mean_t = torch.var_mean(x.to(stats_dtype), dims, correction=0)
    torch.testing.assert_close(mean, mean_t)
    torch.testing.assert_close(var, var_t)


def test_stats_of_an_empty_batch_are_zero():
    mean, var = batch_norm_stats(torch.empty(0, C, 4))
    assert torch.equal(mean, torch.zeros(C)) and torch.equal(var, torch.zeros(C))


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
@pytest.mark.parametrize("shape,memory_format", [((5, C, 13), torch.contiguous_format),
                                                 ((3, C, 5, 7), torch.channels_last)],
                         ids=["1d", "2d_channels_last"])
def test_elemt_is_eval_forward(shape, memory_format, affine):
    x = _input(shape, memory_format=memory_format)
    weight, bias = _affine() if affine else (None, None)
    rm, rv = _running()
    out = batch_norm_elemt(x, weight, bias, rm, 1 / torch.sqrt(rv + EPS))
    assert out.is_contiguous(memory_format=memory_format)
    _assert_close(out, F.batch_norm(x, rm, rv, weight, bias, False, 0.1, EPS))


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_backward_pieces_compose_to_training_backward(shape, affine):
    x, dy = _input(shape), _grad_out(shape)
    weight, _ = _affine() if affine else (None, None)
    _, mean, invstd = batch_norm_fwd(x, weight, None, None, None, True, 0.1, EPS)
    sum_dy, sum_dy_xmu = batch_norm_bwd_reduce(dy, x, mean)
    n = x.numel() // C
    grad_input = batch_norm_bwd_elemt(dy, x, weight, mean, invstd, sum_dy / n, sum_dy_xmu / n)
    expected_input, expected_weight, expected_bias = batch_norm_bwd(dy, x, weight, mean, invstd, True)
    _assert_close(grad_input, expected_input)
    _assert_close(sum_dy, expected_bias)
    _assert_close(sum_dy_xmu * invstd, expected_weight)
    torch_grads = _torch_grads(x, weight, None, None, None, True, dy)
    _assert_close(grad_input, torch_grads[0])


def test_float64_statistics_stay_float64():
    x, dy = _input((5, C, 7), torch.float64), _grad_out((5, C, 7), torch.float64)
    out, mean, invstd = batch_norm_fwd(x, None, None, None, None, True, 0.1, EPS)
    grad_input, grad_weight, grad_bias = batch_norm_bwd(dy, x, None, mean, invstd, True)
    assert {t.dtype for t in (out, mean, invstd, grad_input, grad_weight, grad_bias)} == {torch.float64}
    assert all(t.dtype == torch.float64 for t in batch_norm_bwd_reduce(dy, x, mean))
