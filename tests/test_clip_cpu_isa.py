"""The CPU clip kernels (grad_norm_pow, multi_tensor_scale_) at every instruction-set level
(FUSEDREG_CPU_CAPABILITY caps it, csrc/common/cpu_isa.h): the AVX2 / AVX-512 loops of
csrc/clip_cpu_simd.h must give the bits of the portable loop (same lanes, same order, no fused
multiply-add), match the reference, and not depend on the thread count. Odd sizes around the
64-element lane block, unaligned starts (views at an element offset), every dtype, NaN, inf and
subnormal values."""
import math

import pytest
import torch

from conftest import TOLERANCES
from fusedreg import _library
from fusedreg.reference import clip as reference
from test_cpu_isa import LEVELS, _bits

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
NORM_TYPES = [2.0, 1.0, math.inf, 3.0]
# lane blocks are 64 elements, AVX2 registers 8, AVX-512 16 (32 per bf16 scale step)
SIZES = [1, 7, 16, 31, 63, 64, 65, 127, 129, 1000, 32768 + 77, 70001]


pytestmark = pytest.mark.usefixtures("cpu_library")


def _ops():
    return _library.op("grad_norm_pow", "cpu"), _library.op("multi_tensor_scale_", "cpu")


def _tensors(dtype, seed=0, special=False):
    """One tensor per size, each a view starting one element into its storage (unaligned)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for n in SIZES:
        base = torch.randn(n + 1, generator=gen, dtype=torch.float64) * 3
        if special and n > 20:
            base[5], base[n // 2], base[-1] = math.inf, -1e-40, -0.0
        out.append(base.to(dtype)[1:])
    return out


def _norm_at(monkeypatch, level, tensors, p):
    monkeypatch.setenv("FUSEDREG_CPU_CAPABILITY", level)
    return _ops()[0](tensors, p)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("p", NORM_TYPES)
@pytest.mark.parametrize("level", LEVELS)
def test_norm_every_level_is_the_portable_bits(monkeypatch, level, dtype, p):
    tensors = _tensors(dtype, seed=1)
    assert tensors[3].data_ptr() % 32 != 0  # the starts are unaligned
    portable = _norm_at(monkeypatch, "default", tensors, p)
    ours = _norm_at(monkeypatch, level, tensors, p)
    assert ours.dtype == portable.dtype and torch.equal(ours, portable)
    expected = reference.grad_norm_pow(tensors, p)
    torch.testing.assert_close(ours, expected, atol=0, rtol=TOLERANCES[ours.dtype][1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("level", LEVELS)
def test_norm_special_values_every_level(monkeypatch, level, dtype):
    tensors = _tensors(dtype, seed=2, special=True)
    for p in NORM_TYPES:
        ours = _norm_at(monkeypatch, level, tensors, p)
        assert torch.equal(ours, _norm_at(monkeypatch, "default", tensors, p))
        assert ours.item() == math.inf  # an inf element makes every power sum / max inf
    for position in (0, 17, 63, 64, 100):  # a NaN in any lane, block or the tail
        t = [x.clone() for x in tensors]
        t[-1][position] = math.nan
        for p in NORM_TYPES:
            assert math.isnan(_norm_at(monkeypatch, level, t, p).item()), (position, p)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("level", LEVELS)
def test_scale_every_level_is_one_rounding(monkeypatch, level, dtype):
    monkeypatch.setenv("FUSEDREG_CPU_CAPABILITY", level)
    tensors = _tensors(dtype, seed=3, special=True)
    tensors[-1][10] = math.nan
    guard = [t._base.clone() for t in tensors]  # the element before each view must stay untouched
    for scale in (torch.tensor(0.37), torch.tensor(-1.0 / 3.0, dtype=torch.float64), torch.tensor(1e-30)):
        ours = [t.clone() for t in tensors]
        _ops()[1](ours, scale)
        expected = [t.clone() for t in tensors]
        reference.multi_tensor_scale_(expected, scale)
        for o, e in zip(ours, expected):
            assert torch.equal(_bits(o), _bits(e))
    ours = [t._base.clone()[1:] for t in tensors]
    _ops()[1](ours, torch.tensor(0.5))
    assert all(torch.equal(o._base[:1], g[:1]) for o, g in zip(ours, guard))


@pytest.mark.parametrize("level", LEVELS)
def test_every_level_does_not_depend_on_the_thread_count(monkeypatch, level):
    monkeypatch.setenv("FUSEDREG_CPU_CAPABILITY", level)
    gen = torch.Generator().manual_seed(4)
    saved = torch.get_num_threads()
    try:
        for dtype in (torch.float32, torch.bfloat16):
            tensors = [torch.randn(n, generator=gen).to(dtype) for n in (200003, 70001, 5 * 32768)]
            results = []
            for n in (1, 2, 3):
                torch.set_num_threads(n)
                scaled = [t.clone() for t in tensors]
                _ops()[1](scaled, torch.tensor(0.61))
                results.append(([_ops()[0](tensors, p) for p in NORM_TYPES], scaled))
            for norms, scaled in results[1:]:
                assert all(torch.equal(a, b) for a, b in zip(norms, results[0][0]))
                assert all(torch.equal(a, b) for a, b in zip(scaled, results[0][1]))
    finally:
        torch.set_num_threads(saved)
