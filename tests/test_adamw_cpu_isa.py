"""The CPU AdamW kernel at every instruction-set level (csrc/common/cpu_isa.h): the AVX-512 path
(csrc/adamw_cpu_avx512.h, float32 / bfloat16 parameters and states) must give bit-identical
parameters and states to the portable block loops that FUSEDREG_CPU_CAPABILITY=avx2 / default
select: every float32 / bfloat16 dtype pair, amsgrad, maximize, a divided (non power of two) and a
multiplied grad_scale, clip_coef, both forms of the lerp, NaN / inf / subnormal / signed-zero
elements, tail lengths 1..31 and a tensor longer than one 65536-element chunk."""
import pytest
import torch

from fusedreg import _library

from test_cpu_isa import _FLAGS, _NEEDS, LEVELS, _bits

DTYPE_PAIRS = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
               (torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)]
SIZES = [(1,), (15,), (16,), (17,), (31,), (3, 11), (65536 + 45,)]


pytestmark = pytest.mark.usefixtures("cpu_library")


def _special(t: torch.Tensor, gen: torch.Generator, values) -> torch.Tensor:
    """t with a few random elements replaced by each of `values`."""
    flat = t.flatten()
    for v in values:
        idx = torch.randint(0, flat.numel(), (max(1, flat.numel() // 50),), generator=gen)
        flat[idx] = v
    return flat.view(t.shape)


def _inputs(dtype, state_dtype, amsgrad, seed):
    gen = torch.Generator().manual_seed(seed)
    odd = [float("nan"), float("inf"), -float("inf"), -0.0, 0.0, 1e-40, -3e-39]
    params = [_special(torch.randn(s, generator=gen), gen, odd).to(dtype) for s in SIZES]
    grads = [_special(torch.randn(s, generator=gen), gen, odd).to(dtype) for s in SIZES]
    exp_avgs = [_special(torch.randn(s, generator=gen) * 0.1, gen, odd[:4]).to(state_dtype) for s in SIZES]
    exp_avg_sqs = [_special(torch.rand(s, generator=gen) * 0.01, gen, [float("nan"), 0.0, 1e-41]).to(state_dtype)
                   for s in SIZES]
    max_sqs = [_special(torch.rand(s, generator=gen) * 0.012, gen, [float("nan"), 0.0]).to(state_dtype)
               for s in SIZES] if amsgrad else []
    steps = [torch.tensor(float(2 * i + 1)) for i in range(len(SIZES))]
    rows = [[1e-2 * (i + 1), 0.3 if i % 3 == 2 else 0.9, 0.999 if i % 2 else 0.95,
             0.0 if i % 2 else 0.1, 1e-8 if i % 2 else 1e-6] for i in range(len(SIZES))]
    hparams = torch.tensor(rows, dtype=torch.float64)
    return [params, grads, exp_avgs, exp_avg_sqs, max_sqs, steps, hparams]


def _run(monkeypatch, level, args, amsgrad, maximize, grad_scale, clip_coef):
    monkeypatch.setenv("FUSEDREG_CPU_CAPABILITY", level)
    args = [[t.clone() for t in a] if isinstance(a, list) else a for a in args]
    _library.op("adamw_step_", "cpu")(*args, amsgrad, maximize, grad_scale, None, clip_coef)
    return [t for i in (0, 2, 3, 4) for t in args[i]]


@pytest.mark.parametrize("level", [p for p in LEVELS if p.values[0] != "avx512"])
@pytest.mark.parametrize("dtype,state_dtype", DTYPE_PAIRS, ids=str)
@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("maximize,grad_scale,clip_coef", [
    (False, None, None),
    (True, torch.tensor(1024.0), torch.tensor(0.37)),  # grads multiplied by 2**-10
    (False, torch.tensor(3.0, dtype=torch.float64), None),  # grads divided by 3
], ids=["plain", "maximize-pow2-scale-clip", "divided-scale"])
def test_avx512_matches_the_portable_loops_bit_for_bit(monkeypatch, level, dtype, state_dtype, amsgrad,
                                                       maximize, grad_scale, clip_coef):
    if not _NEEDS["avx512"] <= _FLAGS:
        pytest.skip("CPU lacks avx512")
    args = _inputs(dtype, state_dtype, amsgrad, seed=DTYPE_PAIRS.index((dtype, state_dtype)) + 10 * amsgrad)
    fast = _run(monkeypatch, "avx512", args, amsgrad, maximize, grad_scale, clip_coef)
    portable = _run(monkeypatch, level, args, amsgrad, maximize, grad_scale, clip_coef)
    before = [t for i in (0, 2, 3, 4) for t in args[i]]
    assert any(not torch.equal(_bits(a), _bits(b)) for a, b in zip(fast, before))  # the step changed something
    for i, (a, b) in enumerate(zip(fast, portable)):
        assert torch.equal(_bits(a), _bits(b)), f"tensor {i} ({tuple(a.shape)}, {a.dtype}) differs from {level}"


# ------------------------------------------------------------------ stochastic rounding (sr_seed)

SR_PAIRS = [(torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)]
# tails around the AVX-512 loop's 16- and 32-element steps, and a tensor of two 4096-element chunks
SR_SIZES = [(1,), (3,), (16,), (17,), (31,), (32,), (33,), (5, 13), (4096 + 47,)]


def _sr_inputs(dtype, state_dtype, amsgrad, seed):
    """Like _inputs, plus values whose rounding can overflow to inf, every tensor a view one element
    into its storage (off the vector alignment), SR_SIZES."""
    gen = torch.Generator().manual_seed(seed)
    odd = [float("nan"), float("inf"), -float("inf"), -0.0, 1e-40, -3e-39, 3.3895e38, -3.3895e38]

    def make(shape, scale, values, dt, rand=torch.randn):
        t = _special(rand(shape, generator=gen) * scale, gen, values).to(dt)
        storage = torch.empty(t.numel() + 1, dtype=dt)
        view = storage[1:].view(shape)
        view.copy_(t)
        return view

    params = [make(s, 1.0, odd, dtype) for s in SR_SIZES]
    grads = [make(s, 1.0, odd, dtype) for s in SR_SIZES]
    exp_avgs = [make(s, 0.1, odd[:4] + odd[6:], state_dtype) for s in SR_SIZES]
    exp_avg_sqs = [make(s, 0.01, [float("nan"), 0.0, 1e-41, 3.3e38], state_dtype, torch.rand) for s in SR_SIZES]
    max_sqs = [make(s, 0.012, [float("nan"), 0.0], state_dtype, torch.rand) for s in SR_SIZES] if amsgrad else []
    steps = [torch.tensor(float(2 * i + 1)) for i in range(len(SR_SIZES))]
    rows = [[1e-2 * (i + 1), 0.3 if i % 3 == 2 else 0.9, 0.999 if i % 2 else 0.95,
             0.0 if i % 2 else 0.1, 1e-8 if i % 2 else 1e-6] for i in range(len(SR_SIZES))]
    return [params, grads, exp_avgs, exp_avg_sqs, max_sqs, steps, torch.tensor(rows, dtype=torch.float64)]


def _run_sr(step, args, amsgrad, maximize, grad_scale, clip_coef, sr_seed, ids):
    args = [[t.clone() for t in a] if isinstance(a, list) else a for a in args]
    step(*args, amsgrad, maximize, grad_scale, None, clip_coef, sr_seed, ids)
    return [t for i in (0, 2, 3, 4) for t in args[i]]


@pytest.mark.parametrize("dtype,state_dtype", SR_PAIRS, ids=str)
@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("maximize,grad_scale,clip_coef", [
    (False, None, None),
    (True, torch.tensor(1024.0), torch.tensor(0.37)),
    (False, torch.tensor(3.0, dtype=torch.float64), None),
], ids=["plain", "maximize-pow2-scale-clip", "divided-scale"])
def test_stochastic_rounding_is_the_same_at_every_level_and_the_reference(monkeypatch, dtype, state_dtype, amsgrad,
                                                                          maximize, grad_scale, clip_coef):
    """Every level the CPU has (AVX-512's 32-element register loop, the AVX2 and default block loops)
    gives the reference's bits (csrc/adamw.h's random stream), with tails, misaligned views, ids out
    of order, a seed whose high word is set, and NaN / inf / subnormal / near-overflow values."""
    from fusedreg.reference.adamw import adamw_step_ as reference_step

    args = _sr_inputs(dtype, state_dtype, amsgrad, seed=SR_PAIRS.index((dtype, state_dtype)) + 10 * amsgrad)
    seed = torch.tensor([-(2**62) + 12345], dtype=torch.int64)
    ids = [7, 0, 2**32 - 1, 3, 11, 5, 6, 1, 2**31]
    run = lambda step: _run_sr(step, args, amsgrad, maximize, grad_scale, clip_coef, seed, ids)  # noqa: E731
    expected = run(reference_step)
    before = [t for i in (0, 2, 3, 4) for t in args[i]]
    assert any(not torch.equal(_bits(a), _bits(b)) for a, b in zip(expected, before))
    levels = [p.values[0] for p in LEVELS if _NEEDS[p.values[0]] <= _FLAGS]
    for level in levels:
        monkeypatch.setenv("FUSEDREG_CPU_CAPABILITY", level)
        got = run(_library.op("adamw_step_", "cpu"))
        for i, (a, b) in enumerate(zip(got, expected)):
            mismatches = int((_bits(a) != _bits(b)).sum())
            assert mismatches == 0, f"{level}: tensor {i} ({tuple(a.shape)}, {a.dtype}): {mismatches} elements differ"
