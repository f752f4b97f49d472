"""How the CPU BatchNorm walks memory, and what must not change with it:
- the rows layout's (channels_last, (N, C)) statistics take one pass over memory (two passes per
  block of rows while it is in cache, blocks combined exactly): as accurate as two passes over the
  whole channel, also with a large mean and a first value (the shift) far from it;
- bfloat16's elementwise passes (at the AVX-512 level with AVX512_BF16, loops of their own) compute
  the float32 passes' values rounded as c10 rounds, denormals and NaN included;
- the fused training forward and backward of a planes layout (NCHW) with several channels per
  thread walk it channel by channel; with fewer channels, whole-tensor passes: the same bits;
- fusedreg.batch_norm with nothing for autograd to record runs without the autograd Function: the
  same output and running statistics, no graph, and torch.compile still traces it whole."""
import pytest
import torch

import fusedreg
from test_cpu_isa import LEVELS, level  # noqa: F401  fixtures

pytestmark = pytest.mark.usefixtures("cpu_library")


def _planes(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(3, 12, 9, 11, generator=gen) * 2 + torch.linspace(-3, 3, 12).view(12, 1, 1)).to(dtype)
    dy = torch.randn(3, 12, 9, 11, generator=gen).to(dtype)
    return x, dy, torch.rand(12, generator=gen) + 0.5, torch.randn(12, generator=gen)


@pytest.mark.parametrize("level", LEVELS, indirect=True)
@pytest.mark.parametrize("shape,memory_format", [((1000, 5), torch.contiguous_format),
                                                 ((8, 5, 11, 13), torch.channels_last)], ids=["nc", "nhwc"])
def test_rows_statistics_with_a_large_mean_and_a_far_first_value(level, shape, memory_format):
    """1e4 + 0.5 * randn, the first value of each channel 100 standard deviations off: the block
    centres and the combine must keep float32's two-pass accuracy (a naive one-pass variance loses
    everything here, and an inexact combine several digits)."""
    gen = torch.Generator().manual_seed(4)
    x64 = 1e4 + 0.5 * torch.randn(shape, generator=gen, dtype=torch.float64)
    x64.view(shape[0], shape[1], -1)[0, :, 0] += 50.0  # element (0, c, 0...): memory's first per channel
    x = x64.float().contiguous(memory_format=memory_format)
    assert x.stride(1) == 1  # the rows layout
    exact = x.double()
    dims = [0] + list(range(2, len(shape)))
    out, mean, invstd = torch.ops.fusedreg.batch_norm_fwd(x, None, None, None, None, True, 0.1, 1e-5)
    torch.testing.assert_close(mean.double(), exact.mean(dims), atol=0, rtol=2 * 2.0 ** -23)
    var64 = exact.var(dims, unbiased=False)
    torch.testing.assert_close(invstd.double(), 1 / torch.sqrt(var64 + 1e-5), atol=0, rtol=1e-5)
    stats_mean, stats_var = torch.ops.fusedreg.batch_norm_stats(x)
    assert torch.equal(stats_mean, mean)
    torch.testing.assert_close(stats_var.double(), var64, atol=0, rtol=2e-5)


def _bf16_of(values: torch.Tensor) -> torch.Tensor:
    """float32 `values` rounded to bfloat16 as c10 does: every NaN to 0x7FC0 (torch's vectorized
    .to() writes 0xFFFF), otherwise to nearest even."""
    rounded = values.to(torch.bfloat16).view(torch.int16)
    return rounded.masked_fill(values.isnan(), 0x7FC0).view(torch.bfloat16)


@pytest.mark.parametrize("level", LEVELS, indirect=True)
@pytest.mark.parametrize("shape,memory_format", [((3, 37, 5, 7), torch.contiguous_format),
                                                 ((3, 37, 5, 7), torch.channels_last),
                                                 ((2, 32, 4, 4), torch.channels_last),
                                                 ((300, 37), torch.contiguous_format),
                                                 ((3, 21, 64), torch.contiguous_format)],
                         ids=["nchw_tails", "nhwc_tails", "nhwc_whole", "nc", "ncl_whole"])
def test_bf16_passes_are_the_float32_passes_rounded(level, shape, memory_format):
    """Eval forward, training and eval backward on bfloat16 against the same op on the float32 copy
    of the data and the same statistics, rounded: bit for bit, with channels whose outputs are
    denormal (weight 1e-38, 1e-39), NaN (NaN weight, NaN input) and infinite (inf bias)."""
    C = shape[1]
    gen = torch.Generator().manual_seed(7)
    x = (3 * torch.randn(shape, generator=gen)).to(torch.bfloat16).contiguous(memory_format=memory_format)
    spatial = x.dim() - 2
    x[(0, 1) + (0,) * spatial], x[(1, 2) + (1,) * spatial] = float("nan"), float("inf")
    dy = torch.randn(shape, generator=gen).to(torch.bfloat16).contiguous(memory_format=memory_format)
    w, b = torch.rand(C, generator=gen) + 0.5, torch.randn(C, generator=gen)
    w[3], w[7], w[5], b[6] = 1e-38, 1e-39, float("nan"), float("inf")
    b[3] = b[7] = 0.0
    rm, rv = torch.randn(C, generator=gen), torch.rand(C, generator=gen) + 0.1
    out, mean, invstd = torch.ops.fusedreg.batch_norm_fwd(x, w, b, rm, rv, False, 0.1, 1e-5)
    out32, _, _ = torch.ops.fusedreg.batch_norm_fwd(x.float(), w, b, rm, rv, False, 0.1, 1e-5)
    results = [(out, out32)]
    for training in (True, False):
        dx, dw, db = torch.ops.fusedreg.batch_norm_bwd(dy, x, w, mean, invstd, training)
        dx32, dw32, db32 = torch.ops.fusedreg.batch_norm_bwd(dy.float(), x.float(), w, mean, invstd, training)
        results.append((dx, dx32))
        for sums, sums32 in ((dw, dw32), (db, db32)):  # same sums; NaN where x holds one
            torch.testing.assert_close(sums, sums32, rtol=0, atol=0, equal_nan=True)
    for got, want in results:
        assert got.stride() == x.stride()
        assert torch.equal(got.view(torch.int16), _bf16_of(want).view(torch.int16))
    tiny = out.float().abs()
    assert ((tiny > 0) & (tiny < torch.finfo(torch.float32).tiny)).any()  # denormals were rounded


def _call(x, w, b, rm, rv, training):
    return fusedreg.batch_norm(x, rm, rv, w, b, training, 0.1, 1e-5, backend="cpu")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_no_autograd_function_when_nothing_is_recorded(training, memory_format):
    x, _, w, b = _planes(torch.float32, seed=5)
    x = x.contiguous(memory_format=memory_format)
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    rm, rv = torch.randn(12), torch.rand(12) + 0.5
    buffers = [(rm.clone(), rv.clone()) for _ in range(3)]
    recorded = _call(*leaves, *buffers[0], training)
    assert recorded.grad_fn is not None
    with torch.no_grad():
        no_grad = _call(*leaves, *buffers[1], training)
    plain = _call(x, w, b, *buffers[2], training)  # grad mode on, nothing requires grad
    for out in (no_grad, plain):
        assert out.grad_fn is None and not out.requires_grad
        assert out.stride() == x.stride()
        assert torch.equal(out, recorded.detach())
    for rm_i, rv_i in buffers[1:]:
        assert torch.equal(rm_i, buffers[0][0]) and torch.equal(rv_i, buffers[0][1])
    if training:
        assert not torch.equal(buffers[0][0], rm)  # updated in place on every path


def test_compiled_call_without_grad_matches_eager():
    x, _, w, b = _planes(torch.float32, seed=6)
    rm, rv = torch.randn(12), torch.rand(12) + 0.5
    compiled = torch.compile(_call, fullgraph=True)
    with torch.no_grad():
        for training in (False, True):
            eager_buffers, compiled_buffers = (rm.clone(), rv.clone()), (rm.clone(), rv.clone())
            # one opaque op in both modes (eval's statistics too are computed inside it): same bits
            assert torch.equal(compiled(x, w, b, *compiled_buffers, training),
                               _call(x, w, b, *eager_buffers, training))
            assert all(torch.equal(c, e) for c, e in zip(compiled_buffers, eager_buffers))


@pytest.mark.parametrize("level", LEVELS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_channel_walk_and_whole_tensor_passes_give_the_same_bits(level, dtype):
    """16 channels of 4,096 values or more: walked channel by channel at 1 and 2 threads (at least
    4 channels per thread), by whole-tensor passes at 5 threads (fewer): every output, the running
    statistics included, bitwise equal, in training and eval."""
    gen = torch.Generator().manual_seed(11)
    x = (torch.randn(3, 16, 37, 41, generator=gen) * 3 + torch.linspace(-5, 5, 16).view(16, 1, 1)).to(dtype)
    dy = torch.randn(3, 16, 37, 41, generator=gen).to(dtype)
    sdt = torch.float64 if dtype == torch.float64 else torch.float32
    w, b = torch.rand(16, generator=gen, dtype=sdt) + 0.5, torch.randn(16, generator=gen, dtype=sdt)
    rm, rv = torch.randn(16, generator=gen, dtype=sdt), torch.rand(16, generator=gen, dtype=sdt) + 0.5
    threads = torch.get_num_threads()

    def outputs(n_threads, training):
        torch.set_num_threads(n_threads)
        try:
            running = (rm.clone(), rv.clone())
            out, mean, invstd = torch.ops.fusedreg.batch_norm_fwd(x, w, b, *running, training, 0.1, 1e-5)
            grads = torch.ops.fusedreg.batch_norm_bwd(dy, x, w, mean, invstd, training)
            return (out, mean, invstd, *running, *grads)
        finally:
            torch.set_num_threads(threads)

    for training in (True, False):
        whole = outputs(5, training)
        for n_threads in (1, 2):
            walked = outputs(n_threads, training)
            assert all(torch.equal(a, b) for a, b in zip(walked, whole)), (training, n_threads)
