"""Triton and CUDA dropout kernels against the eager reference, bit for bit (masks and values).

Without a GPU the Triton kernels run on CPU tensors under TRITON_INTERPRET=1 (set by conftest.py)
and the CUDA tests skip; with one, everything runs on CUDA tensors. Sizes are small and odd: the
interpreter is slow, and odd sizes exercise ragged tails and the scalar (misaligned) paths.
"""
import pytest
import torch

from conftest import HAS_CUDA
from fusedreg import _backend, _build
from fusedreg.reference import dropout as ref
from fusedreg.reference import philox
from op_samples import SAMPLES

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
SIZES = [1, 3, 4, 5, 1000, 4099]
PS = [0.0, 0.3, 0.5, 1.0]
SEED = 0x1234_5678_9ABC
OPS = ("dropout_fwd", "dropout_fwd_", "dropout_bwd", "dropout_add_fwd")

TRITON_REASON = _backend._triton_reason(torch.device("cuda" if HAS_CUDA else "cpu"))
if TRITON_REASON is None:
    from fusedreg.triton import dropout as triton_dropout  # noqa: F401  (registers the _triton ops)
# The Triton tests run on CPU tensors under the interpreter and on CUDA tensors (gpu-marked, so a
# machine without a GPU collects and skips them).
TRITON_DEVICES = (["cpu"] if _backend._triton_reason(torch.device("cpu")) is None else []) + ["cuda"]
triton_devices = pytest.mark.parametrize("device", TRITON_DEVICES)


def seed_tensor(value=SEED, device="cpu"):
    return torch.tensor([value], dtype=torch.int64, device=device)


def op(name, backend):
    return getattr(torch.ops.fusedreg, name + ("_triton" if backend == "triton" else ""))


def assert_bitwise_equal(actual, expected):
    """Same shape, strides, dtype and bits; NaNs only need to sit in the same places (their payload
    is not specified: torch itself writes different NaN bits on different paths)."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    assert actual.stride() == expected.stride(), (actual.stride(), expected.stride())
    nan = torch.isnan(expected)
    assert torch.equal(torch.isnan(actual), nan)
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[actual.element_size()]
    a, e = actual.contiguous().view(bits), expected.contiguous().view(bits)
    mismatch = (a != e) & ~nan.contiguous()
    assert not mismatch.any(), f"{int(mismatch.sum())} of {actual.numel()} elements differ"


def randn(shape, dtype, device):
    return torch.randn(shape, dtype=torch.float32, device=device).to(dtype)


def layouts(dtype, device):
    """Inputs of every layout class: contiguous, channels_last, permuted, sliced (non-dense),
    expanded (overlapping), misaligned (dense, starting 1 element past an aligned address)."""
    base = randn((3, 5, 7, 6), dtype, device)
    return {
        "contiguous": base,
        "channels_last": base.to(memory_format=torch.channels_last),
        "permuted": base.permute(2, 0, 3, 1),
        "sliced": base[:, 1:4, ::2],
        "expanded": randn((5, 1, 6), dtype, device).expand(5, 4, 6),
        "misaligned": randn((4 * 131 + 1,), dtype, device)[1:].view(4, 131),
    }


# ----------------------------------------------------------------------------- triton (any device)

@triton_devices
@pytest.mark.parametrize("p", PS)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_fwd_matches_reference(device, dtype, n, p):
    x = randn((n,), dtype, device=device)
    seed = seed_tensor(device=device)
    assert_bitwise_equal(op("dropout_fwd", "triton")(x, seed, p), ref.dropout_fwd(x, seed, p))


@triton_devices
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "permuted", "sliced", "expanded",
                                    "misaligned"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_layouts_follow_reference(device, dtype, layout):
    x = layouts(dtype, device=device)[layout]
    for name in ("dropout_fwd", "dropout_bwd"):
        seed = seed_tensor(device=device)
        assert_bitwise_equal(op(name, "triton")(x, seed, 0.3), ref.dropout_fwd(x, seed, 0.3))


@triton_devices
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced", "misaligned"])
@pytest.mark.parametrize("p", [0.0, 0.3, 1.0])
def test_triton_inplace_equals_out_of_place(device, p, layout):
    x = layouts(torch.float16, device=device)[layout]
    expected = ref.dropout_fwd(x, seed_tensor(device=device), p)
    assert op("dropout_fwd_", "triton")(x, seed_tensor(device=device), p) is None
    assert torch.equal(x, expected)  # values in x's own layout, whatever it is


@triton_devices
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("p", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_dropout_add_matches_reference(device, dtype, p, with_bias):
    x, residual = randn((7, 9, 13), dtype, device=device), randn((7, 9, 13), dtype, device=device)
    bias = randn((13,), dtype, device=device) if with_bias else None
    args = (x, residual, bias, seed_tensor(device=device), p)
    assert_bitwise_equal(op("dropout_add_fwd", "triton")(*args), ref.dropout_add_fwd(*args))


@triton_devices
@pytest.mark.parametrize("index_32", [True, False])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "permuted", "sliced", "expanded"])
def test_triton_dropout_add_bias_follows_the_logical_last_dim(device, layout, index_32):
    """The bias broadcasts over the LOGICAL last dim, whatever the memory order; both the 32-bit
    multiply-high and the 64-bit division forms of its index must get it right."""
    from fusedreg.triton.dropout import _launch

    x = layouts(torch.float32, device=device)[layout]
    residual = randn(x.shape, torch.float32, device=device).transpose(0, -1).contiguous().transpose(0, -1)
    bias = randn(x.shape[-1:], torch.float32, device=device)
    seed = seed_tensor(device=device)
    expected = ref.dropout_add_fwd(x, residual, bias, seed, 0.3)
    assert_bitwise_equal(op("dropout_add_fwd", "triton")(x, residual, bias, seed, 0.3), expected)
    out = torch.empty_like(x)
    _launch(torch.empty_like(out).copy_(x), out, seed, 0.3, torch.empty_like(out).copy_(residual),
            bias, out.stride(-1), out.shape[-1], index_32=index_32)
    assert_bitwise_equal(out, expected)


@triton_devices
def test_triton_empty_tensors(device):
    for shape in [(0,), (3, 0, 2)]:
        x = randn(shape, torch.float32, device=device)
        expected = ref.dropout_fwd(x, seed_tensor(device=device), 0.5)
        assert_bitwise_equal(op("dropout_fwd", "triton")(x, seed_tensor(device=device), 0.5), expected)
        assert op("dropout_fwd_", "triton")(x, seed_tensor(device=device), 0.5) is None
        out = op("dropout_add_fwd", "triton")(x, x, None, seed_tensor(device=device), 0.5)
        assert out.shape == shape


@triton_devices
@pytest.mark.parametrize("seed", [0, 1, -1, 2**63 - 1, -(2**63), 0x5EADBEEF_00000001, -0x5EADBEEF_00000001])
def test_triton_seeds_use_both_key_words(device, seed):
    x = torch.ones(4099, device=device)
    assert_bitwise_equal(op("dropout_fwd", "triton")(x, seed_tensor(seed, device=device), 0.5),
                         ref.dropout_fwd(x, seed_tensor(seed, device=device), 0.5))


@triton_devices
def test_triton_drops_inf_and_nan_to_zero(device):
    x = torch.tensor([float("inf"), float("-inf"), float("nan"), 1.0] * 64, device=device)
    out = op("dropout_fwd", "triton")(x, seed_tensor(device=device), 0.5)
    keep = ref.dropout_mask(x, seed_tensor(device=device), 0.5)
    assert 0 < int(keep.sum()) < x.numel()
    assert torch.equal(out[~keep], torch.zeros_like(out[~keep]))
    assert_bitwise_equal(out, ref.dropout_fwd(x, seed_tensor(device=device), 0.5))


@triton_devices
def test_triton_rejects_bad_arguments(device):
    x = randn((4, 5), torch.float32, device=device)
    ints = torch.ones(3, dtype=torch.int32, device=device)
    with pytest.raises(TypeError, match="input"):
        op("dropout_fwd", "triton")(ints, seed_tensor(device=device), 0.5)
    with pytest.raises(TypeError, match="grad"):
        op("dropout_bwd", "triton")(ints, seed_tensor(device=device), 0.5)
    with pytest.raises(ValueError, match="between 0 and 1"):
        op("dropout_fwd", "triton")(x, seed_tensor(device=device), 1.5)
    with pytest.raises(ValueError, match="seed"):
        op("dropout_fwd", "triton")(x, seed_tensor(device=device).int(), 0.5)
    with pytest.raises(ValueError, match="residual"):
        op("dropout_add_fwd", "triton")(x, x[:, :4], None, seed_tensor(device=device), 0.5)
    with pytest.raises(ValueError, match="bias"):
        op("dropout_add_fwd", "triton")(x, x, x[0, :4], seed_tensor(device=device), 0.5)


@triton_devices
@pytest.mark.parametrize("name", OPS)
def test_triton_opcheck(device, name):
    for args in SAMPLES[name](device, torch.float32):
        torch.library.opcheck(op(name, "triton"), args)


# ----------------------------------------------------------------------------- GPU: cuda and triton

def _cuda_backends():
    if not HAS_CUDA:
        return ["cuda", "triton"]  # collected, then skipped by the gpu marker
    names = []
    try:
        _build.load_library("cuda")
        names.append("cuda")
    except _build.BuildError:
        pass
    if TRITON_REASON is None:
        names.append("triton")
    return names


gpu_backends = pytest.mark.parametrize("backend", _cuda_backends())


@pytest.mark.gpu
@gpu_backends
@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 0.7, 1.0])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_fwd_bwd_match_reference(backend, dtype, p):
    for n in SIZES + [132 * 2048 * 8 * 3 + 7]:  # last: several grid-stride iterations per thread
        x = randn((n,), dtype, "cuda")
        seed = seed_tensor(device="cuda")
        expected = ref.dropout_fwd(x, seed, p)
        assert_bitwise_equal(op("dropout_fwd", backend)(x, seed, p), expected)
        assert_bitwise_equal(op("dropout_bwd", backend)(x, seed, p), expected)
        op("dropout_fwd_", backend)(x, seed, p)
        assert_bitwise_equal(x, expected)


@pytest.mark.gpu
@gpu_backends
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_layouts_follow_reference(backend, dtype):
    seed = seed_tensor(device="cuda")
    for layout, x in layouts(dtype, "cuda").items():
        expected = ref.dropout_fwd(x, seed, 0.3)
        assert_bitwise_equal(op("dropout_fwd", backend)(x, seed, 0.3), expected)
        if layout != "expanded":  # overlapping memory cannot be written in place
            op("dropout_fwd_", backend)(x, seed, 0.3)
            assert torch.equal(x, expected), layout


@pytest.mark.gpu
@gpu_backends
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_dropout_add_matches_reference(backend, dtype, with_bias):
    """Random fp32 data makes an FMA-contracted (x + b) * s + r differ from the reference in about
    half the elements, so this also catches contraction. Large channels_last case: several
    grid-stride steps with a bias index that is not the memory index modulo the bias size."""
    seed = seed_tensor(device="cuda")
    shapes = [((7, 9, 13), None), ((1, 4099), None), ((16, 24, 56, 57), torch.channels_last)]
    for shape, fmt in shapes:
        for p in (0.0, 0.3, 1.0):
            x, residual = randn(shape, dtype, "cuda"), randn(shape, dtype, "cuda")
            if fmt is not None:
                x = x.to(memory_format=fmt)
            bias = randn(shape[-1:], dtype, "cuda") if with_bias else None
            args = (x, residual, bias, seed, p)
            assert_bitwise_equal(op("dropout_add_fwd", backend)(*args), ref.dropout_add_fwd(*args))
    # misaligned residual only: the CUDA kernel must fall back to its scalar path
    x = randn((4, 131), dtype, "cuda")
    residual = randn((4 * 131 + 1,), dtype, "cuda")[1:].view(4, 131)
    bias = randn((131,), dtype, "cuda") if with_bias else None
    args = (x, residual, bias, seed, 0.3)
    assert_bitwise_equal(op("dropout_add_fwd", backend)(*args), ref.dropout_add_fwd(*args))


@pytest.mark.gpu
@gpu_backends
def test_gpu_empty_tensors(backend):
    x = torch.empty(3, 0, device="cuda")
    assert op("dropout_fwd", backend)(x, seed_tensor(device="cuda"), 0.5).shape == (3, 0)
    op("dropout_fwd_", backend)(x, seed_tensor(device="cuda"), 0.5)
    assert op("dropout_add_fwd", backend)(x, x, None, seed_tensor(device="cuda"), 0.5).shape == (3, 0)


@pytest.mark.gpu
@gpu_backends
def test_gpu_graph_replay_reads_the_seed_from_memory(backend):
    """The kernel reads the seed on the device: redrawing it between replays changes the mask."""
    x = randn((4099,), torch.float32, "cuda")
    seed = seed_tensor(device="cuda")
    op("dropout_fwd", backend)(x, seed, 0.5)  # compile / warm up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = op("dropout_fwd", backend)(x, seed, 0.5)
    for value in (1, 2**40 + 3):
        seed.fill_(value)
        graph.replay()
        assert_bitwise_equal(out, ref.dropout_fwd(x, seed, 0.5))


@pytest.mark.gpu
def test_gpu_cuda_rejects_cpu_operands():
    _build.load_library("cuda")
    x = randn((8,), torch.float32, "cuda")
    with pytest.raises(RuntimeError, match="seed"):
        torch.ops.fusedreg.dropout_fwd(x, seed_tensor(device="cpu"), 0.5)
    with pytest.raises(RuntimeError, match="residual"):
        torch.ops.fusedreg.dropout_add_fwd(x, x.cpu(), None, seed_tensor(device="cuda"), 0.5)


# ----------------------------------------------------------------------------- GPU: huge tensors

def _expected_keep(seed, start, count, p):
    """Keep mask of elements [start, start + count) computed from Philox directly (the reference's
    dropout_keep starts at element 0, which is too slow for offsets near 2**34)."""
    first, last = start // 4, (start + count - 1) // 4
    j = torch.arange(first, last + 1, dtype=torch.int64)
    counter = torch.stack([j & 0xFFFFFFFF, j >> 32, torch.zeros_like(j), torch.zeros_like(j)], dim=-1)
    key = torch.tensor([[seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF]], dtype=torch.int64)
    words = philox.philox4x32(counter, key).reshape(-1)
    return (words >= philox.dropout_threshold(p))[start - 4 * first:][:count]


@pytest.mark.gpu
@pytest.mark.huge
@gpu_backends
@pytest.mark.parametrize("n", [2**31 + 4101, 2**34 + 4101], ids=["int64-index", "group-hi-word"])
def test_gpu_huge_in_place(backend, n):
    """2**31+ elements need 64-bit element indices; 2**34+ need group indices past 2**32, i.e. the
    counter's high word (32 GiB of float16, in place). Checked where it matters: the first and
    last elements and those around element 2**31 and group 2**32."""
    seed_value, p = 0x0123_4567_89AB_CDEF, 0.5
    x = torch.ones(n, dtype=torch.float16, device="cuda")
    op("dropout_fwd_", backend)(x, seed_tensor(seed_value, "cuda"), p)
    kept = torch.tensor(philox.dropout_scale(p), dtype=torch.float16)
    for start in sorted({0, 2**31 - 4096, min(2**34 - 4096, n - 8192), n - 4101}):
        count = min(8192, n - start)
        keep = _expected_keep(seed_value, start, count, p)
        expected = torch.where(keep, kept, torch.zeros((), dtype=torch.float16))
        assert torch.equal(x[start:start + count].cpu(), expected), start
