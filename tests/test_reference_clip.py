"""fusedreg.reference.clip against torch.nn.utils.get_total_norm / clip_grad_norm_."""
import math

import pytest
import torch

from conftest import TOLERANCES
from fusedreg.reference.clip import clip_coef, grad_norm_pow, multi_tensor_scale_, total_norm

SHAPES = [(7, 13), (13,), (3, 5, 7), (0, 3), (), (1,)]
NORM_TYPES = [2.0, 1.0, float("inf"), "inf", 3.0]


def _tensors(dtype, shapes=SHAPES, seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(s, generator=gen, dtype=torch.float64) * scale).to(dtype) for s in shapes]


def _torch_total_norm(tensors, norm_type):
    """PyTorch's total norm, leaving out empty tensors: it raises on them for the inf norm."""
    return torch.nn.utils.get_total_norm([t for t in tensors if t.numel()], norm_type)


def _exact_norm(tensors, norm_type):
    """float64 PyTorch norm of the same (already rounded) values: the accuracy yardstick."""
    return _torch_total_norm([t.double() for t in tensors], norm_type)


@pytest.mark.parametrize("norm_type", NORM_TYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_total_norm_matches_torch(dtype, norm_type):
    tensors = _tensors(dtype)
    ours = total_norm(tensors, norm_type)
    theirs = _torch_total_norm(tensors, norm_type)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert ours.dtype == acc and ours.shape == ()
    torch.testing.assert_close(ours, theirs.to(acc), atol=0, rtol=TOLERANCES[dtype][1])
    # accumulation in float32 (float64) whatever the input dtype: as accurate as that allows
    torch.testing.assert_close(ours, _exact_norm(tensors, norm_type).to(acc),
                               atol=0, rtol=TOLERANCES[acc][1])


@pytest.mark.parametrize("norm_type", [2.0, 1.0, float("inf"), 3.0])
def test_many_tiny_tensors(norm_type):
    shapes = [(k % 7 + 1,) for k in range(301)] + [(0,)]
    tensors = _tensors(torch.float32, shapes, seed=1)
    torch.testing.assert_close(total_norm(tensors, norm_type),
                               _torch_total_norm(tensors, norm_type),
                               atol=0, rtol=TOLERANCES[torch.float32][1])


def test_mixed_dtypes_combine_across_groups():
    tensors = _tensors(torch.float32, SHAPES[:3]) + _tensors(torch.bfloat16, SHAPES[3:], seed=2)
    for norm_type in (2.0, 1.0, float("inf"), 3.0):
        torch.testing.assert_close(total_norm(tensors, norm_type),
                                   _exact_norm(tensors, norm_type).float(),
                                   atol=0, rtol=TOLERANCES[torch.float32][1])


def test_empty_list_is_zero_like_torch():
    ours = total_norm([], 2.0)
    theirs = torch.nn.utils.get_total_norm([], 2.0)
    assert torch.equal(ours, theirs) and ours.device == theirs.device


def test_grad_norm_pow_definition():
    tensors = _tensors(torch.bfloat16)
    as_double = torch.cat([t.double().reshape(-1) for t in tensors])
    p2 = grad_norm_pow(tensors, 2.0)
    assert p2.dtype == torch.float32 and p2.shape == ()
    torch.testing.assert_close(p2, as_double.square().sum().float(), atol=0, rtol=1e-6)
    torch.testing.assert_close(grad_norm_pow(tensors, 3.0),
                               as_double.abs().pow(3).sum().float(), atol=0, rtol=1e-6)
    assert grad_norm_pow(tensors, math.inf) == as_double.abs().max().float()
    # fixed order: the same inputs give the same bits
    assert torch.equal(grad_norm_pow(tensors, 2.0), p2)


def test_empty_tensors_contribute_nothing():
    empty = [torch.empty(0), torch.empty(3, 0)]
    assert grad_norm_pow(empty, 2.0) == 0 and grad_norm_pow(empty, math.inf) == 0
    tensors = _tensors(torch.float32, SHAPES[:3])
    for norm_type in (2.0, math.inf):
        assert torch.equal(grad_norm_pow(tensors + empty, norm_type),
                           grad_norm_pow(tensors, norm_type))


def test_grad_norm_pow_of_float64_is_float64():
    tensors = _tensors(torch.float64)
    as_double = torch.cat([t.reshape(-1) for t in tensors])
    p2 = grad_norm_pow(tensors, 2.0)
    assert p2.dtype == torch.float64
    torch.testing.assert_close(p2, as_double.square().sum(), atol=0, rtol=1e-14)
    assert total_norm(tensors + _tensors(torch.float32, seed=3), 2.0).dtype == torch.float64


def test_float32_accumulation_of_half_does_not_overflow():
    # 4096 * 300^2 overflows float16 (max 65504) but not a float32 accumulator
    t = torch.full((4096,), 300.0, dtype=torch.float16)
    assert grad_norm_pow([t], 2.0) == 4096 * 300.0 ** 2


@pytest.mark.parametrize("bad", [0.0, -1.0, float("-inf"), float("nan")])
def test_unsupported_norm_types_raise(bad):
    with pytest.raises(ValueError, match="norm_type"):
        total_norm(_tensors(torch.float32), bad)


def _clip_ours(grads, max_norm, norm_type):
    norm = total_norm(grads, norm_type)
    multi_tensor_scale_(grads, clip_coef(norm, max_norm))
    return norm


def _clip_torch(grads, max_norm, norm_type):
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads if g.numel()]
    for p, g in zip(params, [g for g in grads if g.numel()]):
        p.grad = g
    return torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type)


@pytest.mark.parametrize("norm_type", NORM_TYPES)
@pytest.mark.parametrize("max_norm", [0.5, 1e4])
def test_clip_grad_norm_matches_torch(norm_type, max_norm):
    grads = _tensors(torch.float32)
    ours, theirs = [g.clone() for g in grads], [g.clone() for g in grads]
    norm_ours = _clip_ours(ours, max_norm, norm_type)
    norm_theirs = _clip_torch(theirs, max_norm, norm_type)
    tol = TOLERANCES[torch.float32]
    torch.testing.assert_close(norm_ours, norm_theirs, atol=0, rtol=tol[1])
    for o, t, g in zip(ours, theirs, grads):
        torch.testing.assert_close(o, t, atol=tol[0], rtol=tol[1])
        if max_norm > norm_theirs:  # a coefficient of exactly 1 leaves the gradients untouched
            assert torch.equal(o, g)
    if max_norm < norm_theirs:
        torch.testing.assert_close(total_norm(ours, norm_type), torch.tensor(max_norm), rtol=1e-5,
                                   atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_clip_low_precision_no_worse_than_twice_torch(dtype):
    grads = _tensors(dtype, scale=3.0)
    exact = [g.float() for g in grads]
    _clip_torch(exact, 0.5, 2.0)
    ours, theirs = [g.clone() for g in grads], [g.clone() for g in grads]
    _clip_ours(ours, 0.5, 2.0)
    _clip_torch(theirs, 0.5, 2.0)
    err_theirs = max((t.float() - e).abs().max().item() for t, e in zip(theirs, exact) if e.numel())
    err_ours = max((o.float() - e).abs().max().item() for o, e in zip(ours, exact) if e.numel())
    assert err_theirs > 0
    assert err_ours <= 2 * err_theirs, (err_ours, err_theirs)


def test_multi_tensor_scale_rounds_once_in_place():
    tensors = _tensors(torch.bfloat16, SHAPES[:3]) + _tensors(torch.float32, SHAPES[3:])
    expected = [(t.float() * 0.3).to(t.dtype) for t in tensors]
    ptrs = [t.data_ptr() for t in tensors]
    multi_tensor_scale_(tensors, torch.tensor(0.3))
    assert [t.data_ptr() for t in tensors] == ptrs
    for t, e in zip(tensors, expected):
        assert t.dtype == e.dtype and torch.equal(t, e)


def test_multi_tensor_scale_keeps_layout():
    t = torch.randn(2, 3, 5, 7).to(memory_format=torch.channels_last)
    expected = t * 2.0
    multi_tensor_scale_([t], torch.tensor([2.0]))
    assert t.is_contiguous(memory_format=torch.channels_last) and torch.equal(t, expected)


@pytest.mark.parametrize("norm_type", [2.0, 1.0, float("inf"), 3.0])
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_non_finite_grads_propagate_like_torch(norm_type, bad):
    grads = _tensors(torch.float32, SHAPES[:3])
    grads[1][4] = bad
    ours, theirs = [g.clone() for g in grads], [g.clone() for g in grads]
    norm_ours = _clip_ours(ours, 1.0, norm_type)
    norm_theirs = _clip_torch(theirs, 1.0, norm_type)
    assert not torch.isfinite(norm_theirs)
    torch.testing.assert_close(norm_ours, norm_theirs, equal_nan=True)
    for o, t in zip(ours, theirs):
        torch.testing.assert_close(o, t, equal_nan=True)
    assert any(o.isnan().any() for o in ours)


def test_clip_coef_formula():
    norms = torch.tensor([0.0, 0.5, 1.0, 2.0, float("inf")])
    expected = torch.clamp(1.0 / (norms + 1e-6), max=1.0)
    assert torch.equal(clip_coef(norms, 1.0), expected)
    assert clip_coef(torch.tensor(4.0), 1.0).item() == pytest.approx(0.25, rel=1e-6)
    assert clip_coef(torch.tensor(0.1), 1.0).item() == 1.0
