"""The CPU BatchNorm rows layout ((N, C), channels_last) at every instruction-set level: the
statistics and gradient sums go down the rows into [C] block partials (rows of 5 to 16 vectors
(8 below AVX-512; half that for the gradient sums) read row after row with every column's sums in
registers, narrower rows in register tiles, wider ones a vector of columns at a time), whole
vectors of columns first and the last
C % vector columns element by element; the block partials (for the statistics: each block's sum
and m2 about its own centre) are combined with the channels as the inner loop, pairwise above
1024 blocks. Checked: vector and element-by-element columns give the same bits for the same
values, results match the reference (row counts that are not multiples of the 64-row block,
unaligned data, float32 and float64, narrow and wide rows, more than 1024 blocks), and nothing
depends on the thread count."""
import pytest
import torch

from fusedreg.reference import batch_norm as ref_bn
from test_cpu_isa import LEVELS, _close, level, threads  # noqa: F401  fixtures

pytestmark = pytest.mark.usefixtures("cpu_library")

# Columns per level (AVX-512 / AVX2 / SSE2 vectors of float32): 135 (8 / 16 / 33 vectors and a
# tail), 64, 200 (12 / 25 / 50), 17, 26 (SSE2's row walk: 6 vectors and a tail), 256 (AVX-512's
# widest row walk, 16 vectors).
SHAPES = [(70, 135), (33, 64), (5, 200), (300, 17), (41, 26), (66, 256)]


def _rows(n, c, dtype, seed=0, same_columns=False):
    """x, dy (N, C) starting one element into their storage, weight, bias."""
    gen = torch.Generator().manual_seed(seed)
    cols = 1 if same_columns else c
    x = torch.randn(n, cols, generator=gen, dtype=torch.float64) * 3 + torch.linspace(-2, 5, cols, dtype=torch.float64)
    dy = torch.randn(n, cols, generator=gen, dtype=torch.float64)
    w = torch.rand(cols, generator=gen, dtype=torch.float64) + 0.5
    b = torch.randn(cols, generator=gen, dtype=torch.float64)
    if same_columns:
        x, dy, w, b = x.expand(n, c), dy.expand(n, c), w.expand(c), b.expand(c)

    def unaligned(t):
        buf = torch.empty(t.numel() + 1, dtype=dtype)
        out = buf[1:].view(t.shape)
        out.copy_(t)
        return out

    stats = torch.float64 if dtype == torch.float64 else torch.float32
    return unaligned(x), unaligned(dy), w.to(stats).contiguous(), b.to(stats).contiguous()


def _run(x, dy, w, b):
    out, mean, invstd = torch.ops.fusedreg.batch_norm_fwd(x, w, b, None, None, True, 0.1, 1e-5)
    dx, dw, db = torch.ops.fusedreg.batch_norm_bwd(dy, x, w, mean, invstd, True)
    eval_dx = torch.ops.fusedreg.batch_norm_bwd(dy, x, w, mean, invstd, False)[0]
    elemt = torch.ops.fusedreg.batch_norm_elemt(x, w, b, mean, invstd)
    return out, mean, invstd, dx, dw, db, eval_dx, elemt


@pytest.mark.parametrize("level", LEVELS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_vector_and_plain_columns_give_the_same_bits(level, dtype, shape):
    x, dy, w, b = _rows(*shape, dtype, seed=1, same_columns=True)
    assert x.data_ptr() % 16 != 0
    for result in _run(x, dy, w, b):
        column = result if result.dim() == 1 else result[:, :1]
        assert torch.equal(result, column.expand_as(result)), "a column differs from column 0"


@pytest.mark.parametrize("level", LEVELS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", SHAPES + [(65600, 3)], ids=str)
def test_rows_match_the_reference(level, dtype, shape):
    x, dy, w, b = _rows(*shape, dtype, seed=2)
    out, mean, invstd, dx, dw, db, eval_dx, elemt = _run(x, dy, w, b)
    r_out, r_mean, r_invstd = ref_bn.batch_norm_fwd(x, w, b, None, None, True, 0.1, 1e-5)
    _close(out, r_out, dtype)
    assert torch.equal(elemt, out)  # the same coefficients through the same pass
    _close(elemt, r_out, dtype)
    torch.testing.assert_close(mean, r_mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(invstd, r_invstd, atol=1e-4, rtol=1e-4)
    r_dx, r_dw, r_db = ref_bn.batch_norm_bwd(dy, x, w, mean, invstd, True)
    _close(dx, r_dx, dtype)
    for ours, theirs in ((dw, r_dw), (db, r_db)):  # sums over the batch: scale the tolerance
        torch.testing.assert_close(ours, theirs.to(ours.dtype), atol=1e-3 * shape[0] ** 0.5, rtol=1e-3)
    _close(eval_dx, ref_bn.batch_norm_bwd(dy, x, w, mean, invstd, False)[0], dtype)


@pytest.mark.parametrize("level", LEVELS, indirect=True)
def test_rows_do_not_depend_on_the_thread_count(level, threads):
    x, dy, w, b = _rows(1000, 135, torch.float32, seed=3)
    results = []
    for n in (1, 2, 3):
        threads(n)
        results.append(_run(x, dy, w, b))
    for other in results[1:]:
        assert all(torch.equal(a, c) for a, c in zip(other, results[0]))
