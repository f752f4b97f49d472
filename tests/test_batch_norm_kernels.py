"""The BatchNorm kernels (fusedreg::batch_norm_fwd/_bwd/_stats/_elemt/_bwd_reduce/_bwd_elemt) of every
native backend against the eager reference, F.batch_norm and plain torch: every shape (N,C) ..
(N,C,D,H,W), NCHW, channels_last(_3d) and non-dense inputs, train/eval, with and without affine
parameters and running statistics, several running-stat updates, float64 gradcheck through the
ops, bitwise determinism, memory formats, numerics with a large mean, and argument errors.
CPU tensors run the `cpu` backend and Triton under the interpreter; @gpu tests run `cuda` and
`triton` on a GPU, with shapes that reach both CUDA forward paths (on chip and split)."""
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import HAS_CUDA, TOLERANCES, native_backends
from fusedreg import _build, _library
from fusedreg.reference import batch_norm as ref

EPS = 1e-5
CL, CL3D = torch.channels_last, torch.channels_last_3d
# (shape, memory format or "sliced" for a non-dense view)
LAYOUTS = [((7, 5), None), ((5, 3, 13), None), ((3, 4, 5, 7), None), ((3, 4, 5, 7), CL),
           ((2, 3, 3, 5, 3), None), ((2, 3, 3, 5, 3), CL3D), ((4, 1, 3, 3), CL), ((6, 3, 1, 1), CL),
           ((3, 4, 5, 7), "sliced")]
LAYOUT_IDS = ["nc", "ncl", "nchw", "nhwc", "ncdhw", "ndhwc", "c1_cl", "hw1_cl", "sliced"]
CPU_PAIRS = [("cpu", b) for b in native_backends("cpu")]
GPU_PAIRS = [pytest.param("cuda", b, marks=pytest.mark.gpu) for b in ("cuda", "triton")]
PAIRS = CPU_PAIRS + GPU_PAIRS


def _load(device, backend):
    if backend == "triton":
        import fusedreg.triton.batch_norm  # noqa: F401  registers the *_triton ops
    else:
        reason = _build.unbuildable_reason(backend)
        if reason:
            pytest.skip(reason)
        _build.load_library(backend)


def op(name, backend):
    return _library.op(name, backend)


def stats_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def make_input(shape, layout=None, dtype=torch.float32, device="cpu", seed=0, offset=True):
    """Per-channel offsets and scales, so a reduction over the wrong dims cannot pass."""
    gen = torch.Generator().manual_seed(seed)
    c = shape[1]
    if layout == "sliced":  # every other element of the last dim: not dense
        shape = shape[:-1] + (2 * shape[-1],)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    if offset:
        per_c = [1, c] + [1] * (len(shape) - 2)
        x = x * torch.linspace(0.3, 2.5, c, dtype=torch.float64).reshape(per_c) \
            + torch.linspace(-2.0, 3.0, c, dtype=torch.float64).reshape(per_c)
    x = x.to(device=device, dtype=dtype)
    if layout == "sliced":
        return x[..., ::2]
    return x.contiguous(memory_format=layout) if layout is not None else x


def params(c, dtype, device, seed=1):
    gen = torch.Generator().manual_seed(seed)
    w = 1 + 0.5 * torch.randn(c, generator=gen)
    b = torch.randn(c, generator=gen)
    rm = torch.randn(c, generator=gen)
    rv = 0.5 + torch.rand(c, generator=gen)
    return [t.to(device=device, dtype=dtype) for t in (w, b, rm, rv)]


def assert_close(actual, expected, dtype):
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(actual, expected.to(actual.dtype), atol=atol, rtol=rtol)


def assert_layout_of_empty_like(t, x):
    assert t.shape == x.shape and t.stride() == torch.empty_like(x).stride()


@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("shape,layout", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_forward_matches_reference(device, backend, shape, layout, dtype, training):
    _load(device, backend)
    x = make_input(shape, layout, dtype, device)
    sdt = stats_dtype(dtype)
    w, b, rm, rv = params(shape[1], sdt, device)
    # affine in training except for 3-d shapes, and in eval only for them: both kinds in each mode
    affine = (w, b) if training != (len(shape) == 3) else (None, None)
    rm_ref, rv_ref = rm.clone(), rv.clone()
    out, mean, invstd = op("batch_norm_fwd", backend)(x, *affine, rm, rv, training, 0.1, EPS)
    out_ref, mean_ref, invstd_ref = ref.batch_norm_fwd(x, *affine, rm_ref, rv_ref, training, 0.1, EPS)
    assert out.dtype == dtype and mean.dtype == invstd.dtype == sdt and mean.shape == (shape[1],)
    assert_layout_of_empty_like(out, x)
    assert_close(out, out_ref, dtype)
    assert_close(mean, mean_ref, sdt)
    assert_close(invstd, invstd_ref, sdt)
    assert_close(rm, rm_ref, sdt)
    assert_close(rv, rv_ref, sdt)
    if training:
        assert not torch.equal(rv, params(shape[1], sdt, device)[3])  # updated in place
    if dtype == torch.float32:  # and PyTorch itself agrees
        rm_t, rv_t = params(shape[1], sdt, device)[2:]
        assert_close(out, F.batch_norm(x, rm_t, rv_t, *affine, training, 0.1, EPS), dtype)


@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("shape,layout", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_backward_matches_reference(device, backend, shape, layout, dtype, training):
    _load(device, backend)
    x = make_input(shape, layout, dtype, device)
    dy = make_input(shape, None, dtype, device, seed=5, offset=False)  # NCHW even when x is not
    sdt = stats_dtype(dtype)
    w = params(shape[1], sdt, device)[0] if training else None
    _, mean, invstd = ref.batch_norm_fwd(x, None, None, None, None, True, 0.1, EPS)
    grads = op("batch_norm_bwd", backend)(dy, x, w, mean, invstd, training)
    expected = ref.batch_norm_bwd(dy, x, w, mean, invstd, training)
    assert_layout_of_empty_like(grads[0], x)
    assert grads[1].dtype == grads[2].dtype == sdt
    assert_close(grads[0], expected[0], dtype)
    assert_close(grads[1], expected[1], sdt)
    assert_close(grads[2], expected[2], sdt)
    if dtype == torch.float32 and training:  # against torch autograd
        xr = x.detach().clone().requires_grad_()
        wr = w.clone().requires_grad_()
        F.batch_norm(xr, None, None, wr, None, True, 0.1, EPS).backward(dy)
        assert_close(grads[0], xr.grad, dtype)
        assert_close(grads[1], wr.grad, sdt)


@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
@pytest.mark.parametrize("layout", [None, CL], ids=["nchw", "nhwc"])
def test_running_stats_over_steps_like_torch(device, backend, momentum, layout):
    _load(device, backend)
    c = 4
    rm, rv = torch.zeros(c, device=device), torch.ones(c, device=device)
    module = torch.nn.BatchNorm2d(c, momentum=momentum, affine=False).to(device)
    for step in range(1, 5):
        x = make_input((3, c, 5, 4), layout, device=device, seed=10 + step)
        factor = 1.0 / step if momentum is None else momentum
        out = op("batch_norm_fwd", backend)(x, None, None, rm, rv, True, factor, EPS)[0]
        assert_close(out, module(x), torch.float32)
    assert_close(rm, module.running_mean, torch.float32)
    assert_close(rv, module.running_var, torch.float32)
    module.eval()
    x = make_input((3, c, 5, 4), layout, device=device, seed=99)
    assert_close(op("batch_norm_fwd", backend)(x, None, None, rm, rv, False, 0.1, EPS)[0], module(x),
                 torch.float32)


@pytest.mark.parametrize("device,backend", PAIRS)
def test_running_stats_in_input_dtype_and_strided(device, backend):
    """bfloat16 running stats with bfloat16 input (as torch allows), and a strided float32 view:
    both updated in place with the values float32 ones get."""
    _load(device, backend)
    c = 5
    x = make_input((6, c, 7), None, torch.bfloat16, device)
    rm16 = torch.zeros(c, device=device, dtype=torch.bfloat16)
    rv16 = torch.ones(c, device=device, dtype=torch.bfloat16)
    storage = torch.zeros(2 * c, device=device)
    rm_view = storage[::2]
    rv32 = torch.ones(c, device=device)
    op("batch_norm_fwd", backend)(x, None, None, rm16, rv16, True, 0.3, EPS)
    op("batch_norm_fwd", backend)(x, None, None, rm_view, rv32, True, 0.3, EPS)
    rm_ref, rv_ref = torch.zeros(c, device=device), torch.ones(c, device=device)
    ref.batch_norm_fwd(x, None, None, rm_ref, rv_ref, True, 0.3, EPS)
    assert_close(rm_view, rm_ref, torch.float32)
    assert torch.equal(storage[1::2], torch.zeros(c, device=device))  # the gaps stay untouched
    assert_close(rv32, rv_ref, torch.float32)
    assert torch.equal(rm16, rm_ref.bfloat16()) and torch.equal(rv16, rv_ref.bfloat16())


# ----------------------------------------------------------------------------- the pieces

@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("shape,layout", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_stats_are_mean_and_biased_variance(device, backend, shape, layout, dtype):
    _load(device, backend)
    x = make_input(shape, layout, dtype, device)
    mean, var = op("batch_norm_stats", backend)(x)
    dims = [0] + list(range(2, len(shape)))
    var_t, mean_t = torch.var_mean(x.double(), dims, correction=0)
    assert mean.dtype == var.dtype == stats_dtype(dtype)
    assert_close(mean, mean_t, stats_dtype(dtype))
    assert_close(var, var_t, stats_dtype(dtype))
    for got, want in zip((mean, var), ref.batch_norm_stats(x)):
        assert_close(got, want, stats_dtype(dtype))


@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("shape,layout", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_elemt_is_the_normalization(device, backend, shape, layout, dtype):
    _load(device, backend)
    x = make_input(shape, layout, dtype, device)
    w, b, rm, rv = params(shape[1], torch.float32, device)
    invstd = 1 / torch.sqrt(rv + EPS)
    out = op("batch_norm_elemt", backend)(x, w, b, rm, invstd)
    assert_layout_of_empty_like(out, x)
    assert_close(out, ref.batch_norm_fwd(x, w, b, rm, rv, False, 0.1, EPS)[0], dtype)
    assert_close(out, ref.batch_norm_elemt(x, w, b, rm, invstd), dtype)
    bare = op("batch_norm_elemt", backend)(x, None, None, rm, invstd)
    assert_close(bare, ref.batch_norm_fwd(x, None, None, rm, rv, False, 0.1, EPS)[0], dtype)


@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("shape,layout", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_backward_pieces_compose_to_training_backward(device, backend, shape, layout, dtype):
    _load(device, backend)
    x = make_input(shape, layout, dtype, device)
    dy = make_input(shape, None, dtype, device, seed=5, offset=False)
    sdt = stats_dtype(dtype)
    w = params(shape[1], sdt, device)[0]
    _, mean, invstd = ref.batch_norm_fwd(x, None, None, None, None, True, 0.1, EPS)
    sum_dy, sum_dy_xmu = op("batch_norm_bwd_reduce", backend)(dy, x, mean)
    dims = [0] + list(range(2, len(shape)))
    per_c = [1, -1] + [1] * (len(shape) - 2)
    assert sum_dy.dtype == sum_dy_xmu.dtype == sdt
    assert_close(sum_dy, dy.double().sum(dims), sdt)
    assert_close(sum_dy_xmu, (dy.double() * (x.double() - mean.double().reshape(per_c))).sum(dims), sdt)
    for got, want in zip((sum_dy, sum_dy_xmu), ref.batch_norm_bwd_reduce(dy, x, mean)):
        assert_close(got, want, sdt)
    n = x.numel() // shape[1]
    grad_input = op("batch_norm_bwd_elemt", backend)(dy, x, w, mean, invstd, sum_dy / n, sum_dy_xmu / n)
    assert_layout_of_empty_like(grad_input, x)
    assert_close(grad_input, ref.batch_norm_bwd(dy, x, w, mean, invstd, True)[0], dtype)
    assert_close(grad_input, ref.batch_norm_bwd_elemt(dy, x, w, mean, invstd, sum_dy / n, sum_dy_xmu / n),
                 dtype)


# ----------------------------------------------------------------------------- gradcheck

class OpsBatchNorm(torch.autograd.Function):
    """batch_norm_fwd / batch_norm_bwd of one backend as a differentiable function."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, training, backend):
        out, mean, invstd = op("batch_norm_fwd", backend)(x, weight, bias, running_mean, running_var,
                                                          training, 0.1, EPS)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.training, ctx.backend = training, backend
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, mean, invstd = ctx.saved_tensors
        grad_input, grad_weight, grad_bias = op("batch_norm_bwd", ctx.backend)(
            grad_out, x, weight, mean, invstd, ctx.training)
        return grad_input, grad_weight, grad_bias, None, None, None, None


def _gradcheck(device, backend, shape, layout, training):
    x = make_input(shape, layout, torch.float64, device).requires_grad_()
    w, b, rm, rv = params(shape[1], torch.float64, device)
    w.requires_grad_(), b.requires_grad_()
    # running stats only in eval: in training they would change between gradcheck's evaluations
    rm, rv = (rm, rv) if not training else (None, None)
    assert torch.autograd.gradcheck(
        lambda x, w, b: OpsBatchNorm.apply(x, w, b, rm, rv, training, backend), (x, w, b))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape,layout", [((7, 3), None), ((3, 2, 5), None), ((2, 3, 3, 2), None),
                                          ((2, 3, 3, 2), CL)], ids=["nc", "ncl", "nchw", "nhwc"])
def test_gradcheck_float64_cpu(shape, layout, training):
    _load("cpu", "cpu")
    _gradcheck("cpu", "cpu", shape, layout, training)


@pytest.mark.parametrize("device,backend", [("cpu", "triton")] + GPU_PAIRS)
def test_gradcheck_float64(device, backend):
    if backend not in native_backends(device) and device == "cpu":
        pytest.skip("triton is not usable here")
    _load(device, backend)
    _gradcheck(device, backend, (3, 2, 2, 1), CL, True)


# ----------------------------------------------------------------------------- properties

@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("layout", [None, CL], ids=["nchw", "nhwc"])
def test_bitwise_deterministic(device, backend, layout):
    _load(device, backend)
    # large enough for several parallel tasks on CPU (Triton under the interpreter: tiny)
    shape = (5, 3, 4, 7) if backend == "triton" and device == "cpu" else (9, 6, 37, 41)
    x = make_input(shape, layout, device=device)
    dy = make_input(shape, layout, device=device, seed=3, offset=False)
    w, b, rm, rv = params(shape[1], torch.float32, device)
    threads = torch.get_num_threads()
    runs = []
    for n_threads in (threads, threads, 1):  # the CPU kernels' order ignores the thread count
        torch.set_num_threads(n_threads)
        try:
            rm_run, rv_run = rm.clone(), rv.clone()
            fwd = op("batch_norm_fwd", backend)(x, w, b, rm_run, rv_run, True, 0.1, EPS)
            bwd = op("batch_norm_bwd", backend)(dy, x, w, fwd[1], fwd[2], True)
            runs.append(fwd + bwd + (rm_run, rv_run) + op("batch_norm_stats", backend)(x)
                        + op("batch_norm_bwd_reduce", backend)(dy, x, fwd[1]))
        finally:
            torch.set_num_threads(threads)
    for run in runs[1:]:
        for first, again in zip(runs[0], run):
            assert torch.equal(first, again)


@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("shape", [(1, 3), (1, 3, 1), (1, 3, 1, 1)])
def test_one_value_per_channel_raises_in_training(device, backend, shape):
    _load(device, backend)
    x = torch.randn(shape, device=device)
    with pytest.raises(ValueError, match=r"Expected more than 1 value per channel when training, "
                                         r"got input size torch\.Size\(\[1, 3"):
        op("batch_norm_fwd", backend)(x, None, None, None, None, True, 0.1, EPS)
    rm, rv = params(3, torch.float32, device)[2:]
    assert_close(op("batch_norm_fwd", backend)(x, None, None, rm, rv, False, 0.1, EPS)[0],
                 F.batch_norm(x, rm, rv, None, None, False, 0.1, EPS), torch.float32)


@pytest.mark.parametrize("device,backend", PAIRS)
def test_eval_without_running_stats_raises(device, backend):
    _load(device, backend)
    with pytest.raises(RuntimeError, match="running_mean must be defined in evaluation mode"):
        op("batch_norm_fwd", backend)(torch.randn(4, 3, device=device), None, None, None, None, False,
                                      0.1, EPS)


@pytest.mark.parametrize("device,backend", PAIRS)
def test_empty_batch(device, backend):
    _load(device, backend)
    x = torch.empty(0, 3, 5, device=device)
    rm, rv = params(3, torch.float32, device)[2:]
    rm_before, rv_before = rm.clone(), rv.clone()
    out, mean, invstd = op("batch_norm_fwd", backend)(x, None, None, rm, rv, True, 0.1, EPS)
    assert out.shape == x.shape
    assert torch.equal(rm, rm_before) and torch.equal(rv, rv_before)
    assert torch.equal(mean, torch.zeros_like(mean)) and torch.equal(invstd, torch.zeros_like(invstd))
    grads = op("batch_norm_bwd", backend)(x, x, None, mean, invstd, True)
    assert grads[0].shape == x.shape and not grads[1].any() and not grads[2].any()
    assert not torch.cat(op("batch_norm_stats", backend)(x)).any()
    _, mean_eval, invstd_eval = op("batch_norm_fwd", backend)(x, None, None, rm, rv, False, 0.1, EPS)
    assert torch.equal(mean_eval, rm)
    assert_close(invstd_eval, 1 / torch.sqrt(rv + EPS), torch.float32)


@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("layout", [None, CL], ids=["nchw", "nhwc"])
def test_statistics_sound_with_a_large_mean(device, backend, layout):
    """A naive E[x^2] - E[x]^2 in float32 loses the variance entirely at this offset."""
    _load(device, backend)
    gen = torch.Generator().manual_seed(3)
    x64 = 1e4 + 0.5 * torch.randn(16, 3, 9, 7, generator=gen, dtype=torch.float64)
    x = x64.float().to(device).contiguous(memory_format=layout or torch.contiguous_format)
    exact = x.double()
    _, mean, invstd = op("batch_norm_fwd", backend)(x, None, None, None, None, True, 0.1, EPS)
    ulp = 2.0 ** -23
    torch.testing.assert_close(mean.double(), exact.mean([0, 2, 3]), atol=0, rtol=2 * ulp)
    var64 = exact.var([0, 2, 3], unbiased=False)
    torch.testing.assert_close(invstd.double(), 1 / torch.sqrt(var64 + EPS), atol=0, rtol=1e-5)


@pytest.mark.parametrize("device,backend", PAIRS)
def test_bad_arguments_name_the_argument(device, backend):
    _load(device, backend)
    x = torch.randn(4, 3, 5, device=device)
    fwd = op("batch_norm_fwd", backend)
    with pytest.raises((RuntimeError, ValueError), match="weight"):
        fwd(x, torch.ones(4, device=device), None, None, None, True, 0.1, EPS)
    with pytest.raises((RuntimeError, ValueError), match="running_var"):
        fwd(x, None, None, torch.zeros(3, device=device), torch.ones(3, device=device, dtype=torch.float64),
            True, 0.1, EPS)
    with pytest.raises((RuntimeError, ValueError), match="grad_out"):
        op("batch_norm_bwd", backend)(torch.randn(4, 3, 6, device=device), x, None,
                                      torch.zeros(3, device=device), torch.ones(3, device=device), True)
    with pytest.raises((RuntimeError, ValueError), match=r"\(N, C, \*\)"):
        fwd(torch.randn(5, device=device), None, None, None, None, True, 0.1, EPS)


def test_triton_split_and_tile_merges(monkeypatch):
    """Tiny tiles and splits make the Triton reductions merge many partials and column tiles."""
    if "triton" not in native_backends("cpu"):
        pytest.skip("triton is not usable here")
    import fusedreg.triton.batch_norm as tbn
    monkeypatch.setattr(tbn, "_TILE", 16)
    monkeypatch.setattr(tbn, "_MAX_BLOCK_X", 4)
    monkeypatch.setattr(tbn, "_ELEMS_PER_SPLIT", 8)
    for shape, layout in [((5, 3, 13), None), ((3, 6, 2, 5), CL), ((2, 2, 3, 2, 3), None)]:
        x = make_input(shape, layout)
        dy = make_input(shape, layout, seed=4, offset=False)
        w, b, rm, rv = params(shape[1], torch.float32, "cpu")
        rm_ref, rv_ref = rm.clone(), rv.clone()
        out = op("batch_norm_fwd", "triton")(x, w, b, rm, rv, True, 0.1, EPS)
        expected = ref.batch_norm_fwd(x, w, b, rm_ref, rv_ref, True, 0.1, EPS)
        for got, want in zip(out + (rm, rv), expected + (rm_ref, rv_ref)):
            assert_close(got, want, torch.float32)
        grads = op("batch_norm_bwd", "triton")(dy, x, w, out[1], out[2], True)
        for got, want in zip(grads, ref.batch_norm_bwd(dy, x, w, out[1], out[2], True)):
            assert_close(got, want, torch.float32)


# ----------------------------------------------------------------------------- GPU only

# CUDA forward paths: on chip when a channel slice (rows tile) fits in shared memory and the
# blocks fill the GPU or the tensor is small; split otherwise. Vectors when aligned, scalars not.
GPU_CASES = [
    ((2, 200, 7, 7), None),           # on chip, planes, inner 49 (scalar units)
    ((8, 160, 14, 16), None),         # on chip, planes, 16-byte units
    ((64, 3, 64, 64), None),          # split, planes: 1 MiB per channel
    ((7, 5, 301), None),              # on chip (small tensor), odd inner
    ((32, 8, 64, 64), CL),            # split, rows: 131072 rows
    ((16, 256, 7, 7), CL),            # on chip, rows
    ((4, 1000, 3, 3), CL),            # C not a multiple of 8: scalar rows units (16-bit)
    ((4096, 13), None),               # (N, C): rows, odd C
    ((3, 96, 5, 9, 11), CL3D),        # channels_last_3d
]


def _misaligned(x):
    """x's values in a dense tensor of x's layout whose storage starts one element late."""
    base = torch.empty(x.numel() + 1, device=x.device, dtype=x.dtype)
    view = base[1:].as_strided(x.shape, torch.empty_like(x).stride())
    return view.copy_(x)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("shape,layout", GPU_CASES)
# Misaligned operands in one 16-bit dtype only: the alignment decision is per byte address, the same
# for every dtype, and each extra (dtype, alignment) pair costs a Triton compile per shape.
@pytest.mark.parametrize("dtype,misaligned", [(torch.float32, False), (torch.bfloat16, False),
                                              (torch.float16, False), (torch.bfloat16, True)],
                         ids=["float32", "bfloat16", "float16", "bfloat16-misaligned"])
def test_gpu_paths_match_reference(backend, shape, layout, dtype, misaligned):
    _load("cuda", backend)
    x = make_input(shape, layout, dtype, "cuda")
    dy = make_input(shape, layout, dtype, "cuda", seed=2, offset=False)
    if misaligned:
        x, dy = _misaligned(x), _misaligned(dy)
    w, b, rm, rv = params(shape[1], torch.float32, "cuda")
    rm_ref, rv_ref = rm.clone(), rv.clone()
    out = op("batch_norm_fwd", backend)(x, w, b, rm, rv, True, 0.1, EPS)
    expected = ref.batch_norm_fwd(x, w, b, rm_ref, rv_ref, True, 0.1, EPS)
    assert_layout_of_empty_like(out[0], x)
    assert_close(out[0], expected[0], dtype)
    for got, want in zip(out[1:] + (rm, rv), expected[1:] + (rm_ref, rv_ref)):
        assert_close(got, want, torch.float32)
    for training in (True, False):
        grads = op("batch_norm_bwd", backend)(dy, x, w, out[1], out[2], training)
        want = ref.batch_norm_bwd(dy, x, w, out[1], out[2], training)
        assert_layout_of_empty_like(grads[0], x)
        assert_close(grads[0], want[0], dtype)
        # sums over up to ~800k values: fp32 summation-order differences scale with sqrt(n)
        n = x.numel() // shape[1]
        torch.testing.assert_close(grads[1], want[1], atol=1e-5 * math.sqrt(n), rtol=1e-5)
        torch.testing.assert_close(grads[2], want[2], atol=1e-5 * math.sqrt(n), rtol=1e-5)
    eval_out = op("batch_norm_fwd", backend)(x, w, b, rm, rv, False, 0.1, EPS)
    eval_ref = ref.batch_norm_fwd(x, w, b, rm, rv, False, 0.1, EPS)
    assert_close(eval_out[0], eval_ref[0], dtype)
    assert torch.equal(eval_out[1], rm)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("shape,layout", GPU_CASES[:5])
def test_gpu_bitwise_deterministic(backend, shape, layout):
    _load("cuda", backend)
    x = make_input(shape, layout, torch.float32, "cuda")
    dy = make_input(shape, layout, torch.float32, "cuda", seed=2, offset=False)
    runs = []
    for _ in range(2):
        fwd = op("batch_norm_fwd", backend)(x, None, None, None, None, True, 0.1, EPS)
        runs.append(fwd + op("batch_norm_bwd", backend)(dy, x, None, fwd[1], fwd[2], True))
    for first, second in zip(*runs):
        assert torch.equal(first, second)


@pytest.mark.gpu
def test_gpu_cuda_float64():
    _load("cuda", "cuda")
    x = make_input((6, 5, 9, 7), CL, torch.float64, "cuda")
    out, mean, invstd = op("batch_norm_fwd", "cuda")(x, None, None, None, None, True, 0.1, EPS)
    expected = ref.batch_norm_fwd(x, None, None, None, None, True, 0.1, EPS)
    assert mean.dtype == torch.float64
    for got, want in zip((out, mean, invstd), expected):
        assert_close(got, want, torch.float64)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA or torch.cuda.get_device_properties(0).total_memory < 40 * 2**30,
                    reason="needs a GPU with 40 GiB")
def test_gpu_more_than_2_pow_31_elements():
    """64-bit offsets: a bfloat16 input of 2**31 + 2**20 elements (4 GiB), as rows of C (inner = 1)
    and as one plane per channel (outer = 1)."""
    _load("cuda", "cuda")
    c = 4
    rows = (2**31 + 2**20) // c
    x = torch.randn(rows, c, 1, 1, device="cuda", dtype=torch.bfloat16) * 2 + 1
    var_t, mean_t = torch.var_mean(x.float().view(rows, c), 0, correction=0)
    last = (x[-1].float().view(c) - mean_t) / torch.sqrt(var_t + EPS)
    for xl in (x, x.transpose(0, 1).contiguous().transpose(0, 1)):
        out, mean, invstd = op("batch_norm_fwd", "cuda")(xl, None, None, None, None, True, 0.1, EPS)
        assert out.stride() == xl.stride()
        assert_close(mean, mean_t, torch.float32)
        assert_close(invstd, 1 / torch.sqrt(var_t + EPS), torch.float32)
        assert_close(out[-1].float().view(c), last, torch.bfloat16)
        del out


# ----------------------------------------------------------------------------- Triton finalize

def _split_partials(x, dy=None, mean=None, sizes=()):
    """What _bn_partial_kernel writes for an (N, C) input whose rows are split into runs of
    `sizes`: per split (count, mean, m2) of x - x[0] (the kernel's shift), or with dy the sums of
    dy and dy * (x - mean); float32 [S, C] each, computed by torch."""
    rows = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    member = torch.zeros(len(sizes), x.shape[0], dtype=torch.float64)
    member[rows, torch.arange(x.shape[0])] = 1  # [S, N]: row n is in split s
    if dy is not None:
        part_b = member @ (dy.double() * (x.double() - mean.double()))
        return len(sizes), (member @ dy.double()).float(), part_b.float(), None
    v = x.double() - x[0].double()
    n = member.sum(1, keepdim=True).expand(-1, x.shape[1])
    part_mean = member @ v / n
    part_m2 = member @ (v - part_mean[rows]).square()
    return len(sizes), n.float().contiguous(), part_mean.float(), part_m2.float()


def test_triton_finalize_of_528_splits(monkeypatch):
    """528 splits per channel (4 programs per SM on an H200, small C), of unequal counts: the
    finalize's reduction over the split axis, as one tile and as 64-split chunks, gives the same
    bits run to run and the float64 statistics, running statistics and gradient sums of the same
    partials, with a mean far from 0 so cancellation would show. The partials come from torch, so
    only the finalize kernels run."""
    if "triton" not in native_backends("cpu"):
        pytest.skip("triton is not usable here")
    import fusedreg.triton.batch_norm as tbn
    sizes = [1 + i % 7 for i in range(528)]
    c = 3
    x = make_input((sum(sizes), c), seed=7) * 0.5 + 300.0
    dy = make_input((sum(sizes), c), seed=8, offset=False)
    w, b, rm, rv = params(c, torch.float32, "cpu")
    monkeypatch.setattr(tbn, "_partials", lambda x, layout, dy=None, mean=None:
                        _split_partials(x, dy, mean, sizes))
    x64, dy64 = x.double(), dy.double()
    var64, mean64 = torch.var_mean(x64, 0, correction=0)
    n = x.shape[0]
    for tile in (1024, 64):
        monkeypatch.setattr(tbn, "_FINALIZE_TILE", tile)
        assert tbn._finalize_grid(len(sizes), c)[1] == min(tile, 1024)  # splits per tile: 1 or 9 tiles
        runs = []
        for _ in range(2):
            rm_run, rv_run = rm.clone(), rv.clone()
            _, mean, invstd = op("batch_norm_fwd", "triton")(x, w, b, rm_run, rv_run, True, 0.1, EPS)
            runs.append((mean, invstd, rm_run, rv_run) + op("batch_norm_stats", "triton")(x)
                        + op("batch_norm_bwd_reduce", "triton")(dy, x, mean))
        for first, again in zip(*runs):
            assert torch.equal(first, again)
        mean, invstd, rm_run, rv_run, stats_mean, stats_var, sum_dy, sum_dy_xmu = runs[0]
        torch.testing.assert_close(mean.double(), mean64, atol=0, rtol=2 * 2.0 ** -23)
        assert torch.equal(stats_mean, mean)
        assert_close(stats_var, var64, torch.float32)
        assert_close(invstd, 1 / torch.sqrt(var64 + EPS), torch.float32)
        assert_close(rm_run, 0.9 * rm.double() + 0.1 * mean64, torch.float32)
        assert_close(rv_run, 0.9 * rv.double() + 0.1 * var64 * n / (n - 1), torch.float32)
        assert_close(sum_dy, dy64.sum(0), torch.float32)
        assert_close(sum_dy_xmu, (dy64 * (x64 - mean.double())).sum(0), torch.float32)
