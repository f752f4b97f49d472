"""The CPU kernels at every instruction-set level (csrc/common/cpu_isa.h): FUSEDREG_CPU_CAPABILITY
caps the level, so one machine runs the portable (SSE2), AVX2 and AVX-512 code. Dropout masks
and outputs must be bit-identical at every level and to the reference (odd sizes, unaligned
starts, every dtype, NaN and inf, thread counts); BatchNorm must match the reference within the
suite's tolerances at every level, NCHW and channels_last, bf16 included, and not depend on the
thread count."""
import pytest
import torch

from conftest import TOLERANCES
from fusedreg.reference import batch_norm as ref_bn
from fusedreg.reference import dropout as ref_dropout


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


_FLAGS = _cpu_flags()
_NEEDS = {"default": set(), "avx2": {"avx2", "bmi2"},
          "avx512": {"avx2", "bmi2", "avx512f", "avx512bw", "avx512vl", "avx512dq"}}
LEVELS = [pytest.param(level, marks=pytest.mark.skipif(not needs <= _FLAGS, reason=f"CPU lacks {level}"))
          for level, needs in _NEEDS.items()]


pytestmark = pytest.mark.usefixtures("cpu_library")


@pytest.fixture
def level(request, monkeypatch):
    monkeypatch.setenv("FUSEDREG_CPU_CAPABILITY", request.param)
    return request.param


@pytest.fixture
def threads():
    saved = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(saved)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes (signed zeros compare too), every NaN replaced by one pattern: which NaN
    a conversion to bf16 produces differs between torch's own scalar and vector paths."""
    nan = torch.isnan(t)
    t = torch.where(nan, torch.zeros((), dtype=t.dtype), t).contiguous()
    return torch.cat([t.view(torch.uint8).flatten(), nan.flatten().to(torch.uint8)])


SIZES = [1, 3, 15, 16, 17, 63, 64, 65, 1023, 1024, 1025, 4096 + 37, 70001]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


@pytest.mark.parametrize("level", LEVELS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 0.97, 1.0])
def test_dropout_every_level_matches_the_reference_bit_for_bit(level, dtype, p):
    gen = torch.Generator().manual_seed(3)
    for n in SIZES:
        for start in (0, 1, 3):  # unaligned starts: the vector loads and tails must not care
            base = torch.randn(n + start, generator=gen).to(dtype)
            if n > 8:
                base[start + 2], base[start + 5], base[start + 7] = float("nan"), float("inf"), -0.0
            x = base[start:]
            for seed in (0, 12345, -7, 2**62 + 11):
                s = torch.tensor(seed, dtype=torch.int64)
                y = torch.ops.fusedreg.dropout_fwd(x, s, p)
                assert torch.equal(_bits(y), _bits(ref_dropout.dropout_fwd(x, s, p))), (level, n, start, seed)


@pytest.mark.parametrize("level", LEVELS, indirect=True)
@pytest.mark.parametrize("p", [0.0, 0.3, 0.5])
def test_dropout_bf16_every_bit_pattern_matches_the_reference(level, p):
    """All 65536 bfloat16 values (denormals, NaNs, infinities, values whose product overflows), in
    order and shuffled, so that 32-element slices are all-normal, all-special and mixed: the fast
    conversion and its exact fallback must round exactly as the reference does."""
    patterns = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    shuffled = patterns[torch.randperm(patterns.numel(), generator=torch.Generator().manual_seed(6))]
    for x in (patterns, shuffled, shuffled[5:]):
        for seed in (1, 2**40 + 3):
            s = torch.tensor(seed, dtype=torch.int64)
            for op in (torch.ops.fusedreg.dropout_fwd, torch.ops.fusedreg.dropout_bwd):
                assert torch.equal(_bits(op(x, s, p)), _bits(ref_dropout.dropout_fwd(x, s, p))), (level, seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_dropout_levels_agree_with_each_other_and_across_threads(monkeypatch, threads, dtype):
    x = torch.randn(3, 5, 1237).to(dtype)
    s = torch.tensor(99, dtype=torch.int64)
    outs = []
    for level in [name for name, needs in _NEEDS.items() if needs <= _FLAGS]:
        monkeypatch.setenv("FUSEDREG_CPU_CAPABILITY", level)
        for n in (1, 2):
            threads(n)
            outs.append(torch.ops.fusedreg.dropout_fwd(x, s, 0.3))
            outs.append(torch.ops.fusedreg.dropout_bwd(x, s, 0.3))
    for a, b in zip(outs[0::2], outs[2::2]):
        assert torch.equal(_bits(a), _bits(b))
    for a, b in zip(outs[1::2], outs[3::2]):
        assert torch.equal(_bits(a), _bits(b))


@pytest.mark.parametrize("level", LEVELS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("p", [0.0, 0.2, 1.0])
def test_dropout_add_every_level_matches_the_reference(level, dtype, p):
    """Bias rows that are whole vectors (1024), that wrap inside one (129), short ones (3), a bias
    whose dim is not innermost in memory (transposed), no bias, NaN and inf, ragged tails."""
    gen = torch.Generator().manual_seed(4)
    cases = [(37, 129), (5, 1024), (11, 3), (1, 1000)]
    for rows, cols in cases:
        for transposed in (False, True):
            base = torch.randn(cols, rows, generator=gen) if transposed else torch.randn(rows, cols, generator=gen)
            base.view(-1)[:3] = torch.tensor([float("nan"), float("inf"), -0.0])
            x = base.to(dtype).t() if transposed else base.to(dtype)
            residual, bias = torch.randn_like(x), torch.randn(cols, generator=gen).to(dtype)
            s = torch.tensor(5, dtype=torch.int64)
            for b in (bias, None):
                y = torch.ops.fusedreg.dropout_add_fwd(x, residual, b, s, p)
                expected = ref_dropout.dropout_add_fwd(x, residual, b, s, p)
                assert torch.equal(_bits(y), _bits(expected)), (level, rows, cols, transposed, b is None)


def test_unknown_capability_falls_back_to_the_best_level(monkeypatch):
    x = torch.randn(1000)
    s = torch.tensor(1, dtype=torch.int64)
    monkeypatch.setenv("FUSEDREG_CPU_CAPABILITY", "sse9000")
    assert torch.equal(torch.ops.fusedreg.dropout_fwd(x, s, 0.5), ref_dropout.dropout_fwd(x, s, 0.5))


# (shape, channels_last?) covering long planes, 7x7 planes (short runs), a tail of each width,
# rows (channels_last, (N, C)) and one channel.
BN_SHAPES = [((4, 8, 56, 56), False), ((4, 8, 56, 56), True), ((8, 64, 7, 7), False),
             ((8, 64, 7, 7), True), ((64, 33), False), ((3, 5, 17), False), ((2, 1, 9, 9), False),
             ((5, 7, 3, 3, 3), False)]


def _bn_inputs(shape, channels_last, dtype):
    gen = torch.Generator().manual_seed(6)
    c = shape[1]
    per_c = [1, c] + [1] * (len(shape) - 2)
    x = torch.randn(shape, generator=gen) * 2 + torch.linspace(-3, 4, c).reshape(per_c)
    dy = torch.randn(shape, generator=gen)
    x, dy = x.to(dtype), dy.to(dtype)
    if channels_last:
        x, dy = x.contiguous(memory_format=torch.channels_last), dy.contiguous(memory_format=torch.channels_last)
    w, b = torch.rand(c, generator=gen) + 0.5, torch.randn(c, generator=gen)
    return x, dy, w, b


def _close(actual, expected, dtype):
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(actual, expected.to(actual.dtype), atol=atol * 4, rtol=rtol * 4)


@pytest.mark.parametrize("level", LEVELS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64, torch.float16], ids=str)
@pytest.mark.parametrize("shape,channels_last", BN_SHAPES, ids=lambda v: str(v))
def test_batch_norm_every_level_matches_the_reference(level, dtype, shape, channels_last):
    x, dy, w, b = _bn_inputs(shape, channels_last, dtype)
    stats = torch.float64 if dtype == torch.float64 else torch.float32
    w, b = w.to(stats), b.to(stats)
    out, mean, invstd = torch.ops.fusedreg.batch_norm_fwd(x, w, b, None, None, True, 0.1, 1e-5)
    r_out, r_mean, r_invstd = ref_bn.batch_norm_fwd(x, w, b, None, None, True, 0.1, 1e-5)
    assert out.stride() == x.stride()
    _close(out, r_out, dtype)
    torch.testing.assert_close(mean, r_mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(invstd, r_invstd, atol=1e-4, rtol=1e-4)
    grads = torch.ops.fusedreg.batch_norm_bwd(dy, x, w, mean, invstd, True)
    r_grads = ref_bn.batch_norm_bwd(dy, x, w, mean, invstd, True)
    _close(grads[0], r_grads[0], dtype)
    for ours, theirs in zip(grads[1:], r_grads[1:]):  # sums over the batch: scale the tolerance
        torch.testing.assert_close(ours, theirs.to(ours.dtype), atol=1e-3 * x[0].numel() ** 0.5, rtol=1e-3)
    eval_dx = torch.ops.fusedreg.batch_norm_bwd(dy, x, w, mean, invstd, False)[0]
    _close(eval_dx, ref_bn.batch_norm_bwd(dy, x, w, mean, invstd, False)[0], dtype)


@pytest.mark.parametrize("level", LEVELS, indirect=True)
@pytest.mark.parametrize("shape,channels_last", [((6, 16, 40, 40), False), ((6, 16, 40, 40), True),
                                                 ((4096, 24), False)], ids=["nchw", "nhwc", "nc"])
def test_batch_norm_does_not_depend_on_the_thread_count(level, threads, shape, channels_last):
    x, dy, w, b = _bn_inputs(shape, channels_last, torch.bfloat16)
    results = []
    for n in (1, 2, 3):
        threads(n)
        out, mean, invstd = torch.ops.fusedreg.batch_norm_fwd(x, w, b, None, None, True, 0.1, 1e-5)
        results.append((out, mean, invstd, *torch.ops.fusedreg.batch_norm_bwd(dy, x, w, mean, invstd, True)))
    for other in results[1:]:
        for a, b2 in zip(results[0], other):
            assert torch.equal(_bits(a), _bits(b2))
