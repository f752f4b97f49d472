"""fusedreg.clip_grad_norm_ / get_total_norm / clip_grads_with_norm_ against torch.nn.utils, on every
backend, and the grad_norm_pow / multi_tensor_scale_ kernels against the reference.

Low-precision rule (DESIGN §7): a norm or a clipped gradient is no worse than twice PyTorch's own
error against a float64 computation on the same (already rounded) values.
"""
import math
import warnings

import pytest
import torch

import fusedreg
from conftest import TOLERANCES, device_backend_pairs
from fusedreg import _library
from fusedreg.reference import clip as reference

PAIRS = device_backend_pairs()                            # (device, backend), reference included
NATIVE_PAIRS = device_backend_pairs(with_reference=False)  # the kernels only
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
NORM_TYPES = [2.0, 1.0, math.inf, "inf", 3.0, 0.5]
SHAPES = [(7, 13), (13,), (3, 5, 7), (0, 3), (), (1,), (67,)]
# largest relative error of one rounding to the dtype
HALF_ULP = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def _loaded_op(name, backend):
    """The kernel op of `backend`, its library loaded (or its Triton module imported) first."""
    if backend == "triton":
        import fusedreg.triton.clip  # noqa: F401  registers the *_triton ops
    else:
        from fusedreg import _build
        _build.load_library(backend)
    return _library.op(name, backend)


def _grads(device, dtype, shapes=SHAPES, seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(s, generator=gen, dtype=torch.float64) * scale).to(device, dtype) for s in shapes]


def _params(grads):
    params = []
    for g in grads:
        p = torch.nn.Parameter(torch.zeros_like(g))
        p.grad = g.clone()
        params.append(p)
    return params


def _torch_params(grads):
    """PyTorch raises on empty tensors for the inf norm; they contribute nothing anyway."""
    return _params([g for g in grads if g.numel()])


def _exact_norm(grads, norm_type):
    flat = torch.cat([g.double().reshape(-1) for g in grads])
    return torch.linalg.vector_norm(flat, float(norm_type))


def _check_norm(ours, theirs, exact, dtype):
    assert ours.dtype == theirs.dtype and ours.shape == () and ours.device == theirs.device
    if dtype in (torch.float32, torch.float64):
        torch.testing.assert_close(ours, theirs, atol=0, rtol=TOLERANCES[dtype][1])
    else:
        err_ours = (ours.double() - exact).abs().item()
        err_theirs = (theirs.double() - exact).abs().item()
        assert err_ours <= max(2 * err_theirs, 2 * HALF_ULP[dtype] * exact.item()), (err_ours, err_theirs)


@pytest.mark.parametrize("norm_type", NORM_TYPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device,backend", PAIRS)
def test_clip_grad_norm_matches_torch(device, backend, dtype, norm_type):
    grads = _grads(device, dtype, scale=3.0)
    ours, theirs = _params(grads), _torch_params(grads)
    max_norm = 0.5
    norm_ours = fusedreg.clip_grad_norm_(ours, max_norm, norm_type, backend=backend)
    norm_theirs = torch.nn.utils.clip_grad_norm_(theirs, max_norm, norm_type)
    exact = _exact_norm(grads, norm_type)
    _check_norm(norm_ours, norm_theirs, exact, dtype)
    # the float32 accumulator itself, as accurate as float32 allows
    exact_clip = [g.double() * (max_norm / (exact + 1e-6)) for g in grads if g.numel()]
    clipped_ours = [p.grad for p in ours if p.numel()]
    clipped_theirs = [p.grad for p in theirs]
    if dtype in (torch.float32, torch.float64):
        for o, t in zip(clipped_ours, clipped_theirs):
            torch.testing.assert_close(o, t, atol=TOLERANCES[dtype][0], rtol=TOLERANCES[dtype][1])
    else:
        err_ours = max((o.double() - e).abs().max().item() for o, e in zip(clipped_ours, exact_clip))
        err_theirs = max((t.double() - e).abs().max().item() for t, e in zip(clipped_theirs, exact_clip))
        assert err_theirs > 0 and err_ours <= 2 * err_theirs, (err_ours, err_theirs)


@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf, 3.0])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device,backend", PAIRS)
def test_norm_accumulates_in_float32(device, backend, dtype, norm_type):
    grads = _grads(device, dtype, seed=1)
    norm = fusedreg.get_total_norm(grads, norm_type, backend=backend, norm_dtype=torch.float32)
    assert norm.dtype == torch.float32
    rtol = TOLERANCES[torch.float64 if dtype == torch.float64 else torch.float32][1]
    torch.testing.assert_close(norm, _exact_norm(grads, norm_type).float(), atol=0, rtol=rtol)


@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf, 3.0, 0.5])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device,backend", NATIVE_PAIRS)
def test_kernels_match_reference_and_are_deterministic(device, backend, dtype, norm_type):
    tensors = _grads(device, dtype, seed=2, shapes=SHAPES + [(5, 7)])
    tensors[-1] = tensors[-1].t()  # not contiguous, still dense
    op = _loaded_op("grad_norm_pow", backend)
    ours = op(tensors, norm_type)
    expected = reference.grad_norm_pow(tensors, norm_type)
    assert ours.dtype == expected.dtype and ours.shape == () and ours.device == tensors[0].device
    acc = ours.dtype
    torch.testing.assert_close(ours, expected, atol=0, rtol=TOLERANCES[acc][1])
    assert torch.equal(op(tensors, norm_type), ours)  # bitwise, run to run

    scaled = [t.clone() for t in tensors]
    _loaded_op("multi_tensor_scale_", backend)(scaled, torch.tensor(0.37, device=device))
    expected = [t.clone() for t in tensors]
    reference.multi_tensor_scale_(expected, torch.tensor(0.37, device=device))
    for s, e in zip(scaled, expected):
        assert torch.equal(s, e)  # one rounding of the same float32 (float64) product


@pytest.mark.parametrize("device,backend", NATIVE_PAIRS)
def test_non_dense_tensors(device, backend):
    base = _grads(device, torch.float32, shapes=[(9, 14), (4, 3, 5, 6)], seed=3)
    strided = base[0][:, ::2]                                    # not dense: read via a copy
    channels_last = base[1].to(memory_format=torch.channels_last)  # dense, permuted
    tensors = [strided, channels_last]
    ours = _loaded_op("grad_norm_pow", backend)(tensors, 2.0)
    torch.testing.assert_close(ours, reference.grad_norm_pow(tensors, 2.0), atol=0, rtol=1e-5)
    expected = [(t * 0.25) for t in tensors]
    _loaded_op("multi_tensor_scale_", backend)(tensors, torch.tensor(0.25, device=device))
    assert torch.equal(base[0][:, ::2], expected[0]) and torch.equal(base[0][:, 1::2], _grads(device, 
        torch.float32, shapes=[(9, 14)], seed=3)[0][:, 1::2])  # the rest of the base untouched
    assert channels_last.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(channels_last, expected[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("device,backend", PAIRS)
def test_clip_grads_with_norm_is_torchs_bitwise(device, backend, dtype):
    grads = _grads(device, dtype, scale=2.0)
    total = torch.nn.utils.get_total_norm([g for g in grads if g.numel()])
    ours, theirs = _params(grads), _torch_params(grads)
    fusedreg.clip_grads_with_norm_(ours, 1.0, total, backend=backend)
    torch.nn.utils.clip_grads_with_norm_(theirs, 1.0, total)
    for o, t in zip([p.grad for p in ours if p.numel()], [p.grad for p in theirs]):
        assert torch.equal(o, t)


@pytest.mark.parametrize("device,backend", PAIRS)
def test_get_total_norm_then_clip_equals_clip_grad_norm(device, backend):
    grads = _grads(device, torch.float32, scale=2.0)
    a, b = _params(grads), _params(grads)
    norm = fusedreg.get_total_norm([p.grad for p in a], 2.0, backend=backend)
    fusedreg.clip_grads_with_norm_(a, 1.0, norm, backend=backend)
    assert torch.equal(fusedreg.clip_grad_norm_(b, 1.0, backend=backend), norm)
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(a, b))


@pytest.mark.parametrize("norm_type", [2.0, math.inf])
@pytest.mark.parametrize("device,backend", PAIRS)
def test_thousand_small_tensors(device, backend, norm_type):
    # > 256 tensors: several chunk tables for cuda/cpu. The Triton interpreter takes ~10 ms per
    # program, so it gets a shorter list (its pointer table has no tensor limit to exercise).
    count = 120 if backend == "triton" and device == "cpu" else 1000
    shapes = [(k % 37 + 1,) for k in range(count)]
    grads = _grads(device, torch.float32, shapes, seed=4)
    ours, theirs = _params(grads), _torch_params(grads)
    norm_ours = fusedreg.clip_grad_norm_(ours, 1.0, norm_type, backend=backend)
    norm_theirs = torch.nn.utils.clip_grad_norm_(theirs, 1.0, norm_type)
    torch.testing.assert_close(norm_ours, norm_theirs, atol=0, rtol=1e-5)
    for o, t in zip(ours, theirs):
        torch.testing.assert_close(o.grad, t.grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("device,backend", PAIRS)
def test_no_gradients(device, backend):
    assert torch.equal(fusedreg.get_total_norm([], backend=backend), torch.nn.utils.get_total_norm([]))
    params = [torch.nn.Parameter(torch.ones(3))]  # no .grad
    norm = fusedreg.clip_grad_norm_(params, 1.0, backend=backend)
    assert norm.dtype == torch.float32 and norm.device.type == "cpu" and norm.item() == 0.0
    assert params[0].grad is None
    fusedreg.clip_grads_with_norm_(params, 1.0, torch.tensor(2.0), backend=backend)  # a no-op
    with pytest.warns(UserWarning, match="empty generator"):
        assert fusedreg.clip_grad_norm_((p for p in []), 1.0, backend=backend).item() == 0.0
    # tensors without elements: a zero norm in their dtype and device, for every norm type
    for norm_type in (2.0, math.inf):
        empty = [torch.empty(0, 3, device=device, dtype=torch.bfloat16)]
        zero = fusedreg.get_total_norm(empty, norm_type, backend=backend)
        assert zero.dtype == torch.bfloat16 and zero.device == empty[0].device and zero.item() == 0.0


@pytest.mark.parametrize("device,backend", PAIRS)
def test_single_tensor_and_generator(device, backend):
    grads = _grads(device, torch.float32, scale=3.0)
    single = _params(grads[:1])[0]
    expected = _torch_params(grads[:1])[0]
    norm = fusedreg.clip_grad_norm_(single, 1.0, backend=backend)
    torch.testing.assert_close(norm, torch.nn.utils.clip_grad_norm_(expected, 1.0))
    torch.testing.assert_close(single.grad, expected.grad)
    assert torch.equal(fusedreg.get_total_norm(single.grad, backend=backend),
                       fusedreg.get_total_norm([single.grad], backend=backend))

    as_list, as_generator = _params(grads), _params(grads)
    norm_list = fusedreg.clip_grad_norm_(as_list, 1.0, backend=backend)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a non-empty generator warns nothing
        norm_gen = fusedreg.clip_grad_norm_((p for p in as_generator), 1.0, backend=backend)
    assert torch.equal(norm_list, norm_gen)
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(as_list, as_generator))
    norm = fusedreg.get_total_norm((p.grad for p in as_list), backend=backend)
    assert norm.item() == pytest.approx(1.0, rel=1e-5)  # clipped to max_norm


@pytest.mark.parametrize("device,backend", PAIRS)
def test_mixed_dtypes_one_call_per_group(device, backend, monkeypatch):
    grads = (_grads(device, torch.float32, SHAPES[:3], seed=5)
             + _grads(device, torch.bfloat16, SHAPES[3:], seed=6)
             + _grads(device, torch.float32, [(11,)], seed=7)
             + _grads(device, torch.float16, [(4, 4)], seed=8))
    calls = []
    from fusedreg.utils import clip as clip_module
    original = clip_module.kernel

    def counting(name, backend_name, ref):
        fn = original(name, backend_name, ref)

        def wrapped(tensors, *args):
            calls.append((name, backend_name, {t.dtype for t in tensors}, len(tensors)))
            return fn(tensors, *args)
        return wrapped

    monkeypatch.setattr(clip_module, "kernel", counting)
    for norm_type in (2.0, math.inf):
        ours, theirs = _params(grads), _torch_params(grads)
        calls.clear()
        norm_ours = fusedreg.clip_grad_norm_(ours, 0.5, norm_type, backend=backend)
        norm_theirs = torch.nn.utils.clip_grad_norm_(theirs, 0.5, norm_type)
        assert norm_ours.dtype == norm_theirs.dtype == torch.float32
        torch.testing.assert_close(norm_ours, _exact_norm(grads, norm_type).float(), atol=0, rtol=1e-5)
        assert [(c[0], c[2], c[3]) for c in calls] == [
            ("grad_norm_pow", {torch.float32}, 4), ("grad_norm_pow", {torch.bfloat16}, 4),
            ("grad_norm_pow", {torch.float16}, 1),
            ("multi_tensor_scale_", {torch.float32}, 4), ("multi_tensor_scale_", {torch.bfloat16}, 4),
            ("multi_tensor_scale_", {torch.float16}, 1)]
        assert {c[1] for c in calls} == {backend}
    float64 = _grads(device, torch.float64, [(3,)])
    assert fusedreg.get_total_norm(grads + float64, backend=backend).dtype == torch.float64


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # interpreter: inf * 0
@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf, 3.0])
@pytest.mark.parametrize("bad", [math.inf, math.nan])
@pytest.mark.parametrize("device,backend", PAIRS)
def test_non_finite_gradients(device, backend, bad, norm_type):
    grads = _grads(device, torch.float32, SHAPES[:3])
    grads[1][4] = bad
    ours, theirs = _params(grads), _torch_params(grads)
    norm_ours = fusedreg.clip_grad_norm_(ours, 1.0, norm_type, backend=backend)
    norm_theirs = torch.nn.utils.clip_grad_norm_(theirs, 1.0, norm_type)
    assert not torch.isfinite(norm_theirs)
    torch.testing.assert_close(norm_ours, norm_theirs, equal_nan=True)
    for o, t in zip(ours, theirs):
        torch.testing.assert_close(o.grad, t.grad, equal_nan=True)

    ours, theirs = _params(grads), _torch_params(grads)
    with pytest.raises(RuntimeError) as torch_error:
        torch.nn.utils.clip_grad_norm_(theirs, 1.0, norm_type, error_if_nonfinite=True)
    with pytest.raises(RuntimeError) as our_error:
        fusedreg.clip_grad_norm_(ours, 1.0, norm_type, error_if_nonfinite=True, backend=backend)
    assert str(our_error.value) == str(torch_error.value)
    # raised before scaling anything
    assert all(torch.equal(p.grad.nan_to_num(), g.nan_to_num()) for p, g in zip(ours, grads))
    with pytest.raises(RuntimeError, match="non-finite"):
        fusedreg.get_total_norm(grads, norm_type, error_if_nonfinite=True, backend=backend)


@pytest.mark.parametrize("device,backend", PAIRS)
def test_no_clip_leaves_gradients_bitwise(device, backend):
    grads = _grads(device, torch.bfloat16)
    params = _params(grads)
    norm = fusedreg.clip_grad_norm_(params, 1e4, backend=backend)
    assert norm.item() < 1e4
    assert all(torch.equal(p.grad, g) for p, g in zip(params, grads))


@pytest.mark.parametrize("device,backend", PAIRS)
def test_bitwise_deterministic(device, backend):
    shapes = [(40000,), (1001,), (3, 33)]  # 40000 spans two CPU chunks
    grads = _grads(device, torch.float32, shapes, seed=9)
    results = []
    for _ in range(3):
        params = _params(grads)
        results.append((fusedreg.clip_grad_norm_(params, 1.0, backend=backend), [p.grad for p in params]))
    for norm, clipped in results[1:]:
        assert torch.equal(norm, results[0][0])
        assert all(torch.equal(a, b) for a, b in zip(clipped, results[0][1]))


def test_cpu_result_does_not_depend_on_thread_count():
    grads = _grads("cpu", torch.float32, [(200003,), (70001,)], seed=10)
    threads = torch.get_num_threads()
    norms = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            norms.append([fusedreg.get_total_norm(grads, p, backend="cpu") for p in (2.0, 3.0, math.inf)])
    finally:
        torch.set_num_threads(threads)
    for other in norms[1:]:
        assert all(torch.equal(a, b) for a, b in zip(other, norms[0]))


@pytest.mark.parametrize("bad", [0, 0.0, -1.0, -math.inf, math.nan, "fro", None])
def test_unsupported_norm_types_raise(bad):
    with pytest.raises(ValueError, match="norm_type"):
        fusedreg.clip_grad_norm_(_params(_grads("cpu", torch.float32, SHAPES[:2])), 1.0, bad)
    with pytest.raises(ValueError, match="norm_type"):
        fusedreg.get_total_norm(_grads("cpu", torch.float32, SHAPES[:2]), bad)


def test_complex_gradients_are_rejected():
    with pytest.raises(TypeError, match=r"tensors\[1\].*floating"):
        fusedreg.get_total_norm([torch.ones(2), torch.ones(2, dtype=torch.complex64)])


@pytest.mark.parametrize("device,backend", PAIRS)
def test_norm_dtype_and_float16_overflow(device, backend):
    # norm 300 * 256 = 76800 > 65504: PyTorch's float16 norm is inf and it zeroes the gradients;
    # fusedreg returns the same float16 inf but clips with the float32 norm.
    grads = [torch.full((65536,), 300.0, dtype=torch.float16, device=device)]
    ours, theirs = _params(grads), _torch_params(grads)
    norm_ours = fusedreg.clip_grad_norm_(ours, 1.0, backend=backend)
    norm_theirs = torch.nn.utils.clip_grad_norm_(theirs, 1.0)
    assert norm_ours.dtype == norm_theirs.dtype == torch.float16 and torch.isinf(norm_ours)
    assert torch.all(theirs[0].grad == 0)
    expected = torch.full_like(grads[0], 300.0 / 76800.0)
    torch.testing.assert_close(ours[0].grad, expected, atol=0, rtol=1e-3)
    norm32 = fusedreg.get_total_norm(grads, norm_dtype=torch.float32, backend=backend)
    assert norm32.dtype == torch.float32 and norm32.item() == 76800.0


@pytest.mark.parametrize("device,backend", PAIRS)
def test_sparse_gradients(device, backend):
    ours, theirs = (torch.nn.Embedding(10, 3, sparse=True).to(device) for _ in range(2))
    theirs.load_state_dict(ours.state_dict())
    index = torch.tensor([1, 2, 1, 7], device=device)  # a repeated row: uncoalesced gradient
    for emb in (ours, theirs):
        emb(index).pow(2).sum().backward()
    norm_ours = fusedreg.clip_grad_norm_(ours.parameters(), 0.1, backend=backend)
    # torch clips sparse gradients only from 2.12 on: compare with its result on the dense gradient
    theirs.weight.grad = theirs.weight.grad.to_dense()
    norm_theirs = torch.nn.utils.clip_grad_norm_(theirs.parameters(), 0.1)
    torch.testing.assert_close(norm_ours, norm_theirs)
    torch.testing.assert_close(ours.weight.grad.to_dense(), theirs.weight.grad.to_dense())


def test_compiles_without_graph_breaks():
    backend = "cpu"
    grads = _grads("cpu", torch.float32, SHAPES[:3] + [(0,)])

    @torch.compile(fullgraph=True, backend="eager")
    def clip(params):
        return fusedreg.clip_grad_norm_(params, 0.5, backend=backend)

    ours, theirs = _params(grads), _torch_params(grads)
    torch.testing.assert_close(clip(ours), torch.nn.utils.clip_grad_norm_(theirs, 0.5))
    for o, t in zip([p.grad for p in ours if p.numel()], [p.grad for p in theirs]):
        torch.testing.assert_close(o, t)


# ----------------------------------------------------------------------------- GPU only

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_large_and_misaligned(backend, dtype):
    base = torch.randn(2**22 + 13, device="cuda").to(dtype)
    misaligned = base[1:]                 # 2 or 4 bytes past a 16-byte boundary: the scalar path
    aligned = misaligned.clone()
    for p in (2.0, 1.0, math.inf, 3.0):
        a = fusedreg.get_total_norm([aligned], p, backend=backend, norm_dtype=torch.float32)
        m = fusedreg.get_total_norm([misaligned], p, backend=backend, norm_dtype=torch.float32)
        torch.testing.assert_close(a, _exact_norm([aligned], p).float(), atol=0, rtol=1e-5)
        if backend == "cuda":
            assert torch.equal(a, m)  # threads see the same elements in the same order either way
        else:
            torch.testing.assert_close(a, m, atol=0, rtol=1e-6)
    expected = (misaligned.float() * 0.3).to(dtype) if dtype != torch.float64 else misaligned * 0.3
    fusedreg.clip_grads_with_norm_(_wrap(misaligned), 0.3, torch.tensor(1.0 - 1e-6, device="cuda",
                                                                        dtype=torch.float64),
                                   backend=backend)
    rtol = 1e-12 if dtype == torch.float64 else 4 * HALF_ULP[dtype]
    torch.testing.assert_close(misaligned, expected, atol=0, rtol=rtol)


def _wrap(grad):
    """A parameter-like object whose .grad is `grad` itself (so in-place scaling is visible)."""
    class Holder:
        pass
    holder = Holder()
    holder.grad = grad
    return [holder]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_no_host_sync_and_cuda_graph(backend):
    grads = _grads("cuda", torch.float32, [(k % 97 + 1,) for k in range(1000)] + [(300001,)])
    params = _params(grads)
    fusedreg.clip_grad_norm_(params, 1.0, backend=backend)  # warm-up: builds, compiles, caches
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fusedreg.clip_grad_norm_(params, 1.0, backend=backend)
    finally:
        torch.cuda.set_sync_debug_mode("default")

    for p, g in zip(params, grads):
        p.grad.copy_(g * 4)
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fusedreg.clip_grad_norm_(params, 1.0, backend=backend)
        torch.cuda.current_stream().synchronize()
        for p, g in zip(params, grads):
            p.grad.copy_(g * 4)
        with torch.cuda.graph(graph):
            norm = fusedreg.clip_grad_norm_(params, 1.0, backend=backend)
    torch.cuda.current_stream().wait_stream(stream)
    for scale in (4.0, 0.25):
        for p, g in zip(params, grads):
            p.grad.copy_(g * scale)
        graph.replay()
        expected = _torch_params([g * scale for g in grads])
        expected_norm = torch.nn.utils.clip_grad_norm_(expected, 1.0)
        torch.testing.assert_close(norm, expected_norm, atol=0, rtol=1e-5)
        for p, e in zip(params, expected):
            torch.testing.assert_close(p.grad, e.grad, atol=1e-6, rtol=1e-5)


@pytest.mark.gpu
def test_gpu_mixed_devices():
    grads = _grads("cuda", torch.float32, SHAPES[:3]) + _grads("cpu", torch.float32, SHAPES[3:])
    ours, theirs = _params(grads), _torch_params(grads)
    norm_ours = fusedreg.clip_grad_norm_(ours, 0.5)
    norm_theirs = torch.nn.utils.clip_grad_norm_(theirs, 0.5)
    assert norm_ours.device == norm_theirs.device
    torch.testing.assert_close(norm_ours, norm_theirs, atol=0, rtol=1e-5)
    for o, t in zip([p.grad for p in ours if p.numel()], [p.grad for p in theirs]):
        torch.testing.assert_close(o, t)


@pytest.mark.parametrize("device,backend", PAIRS)
def test_tensor_listed_twice_is_scaled_twice_like_torch(device, backend, monkeypatch):
    """torch counts every occurrence in the norm and scales every occurrence (coef**2 for a
    gradient listed twice), one multiply after the other. One multi-tensor call over both would
    have two blocks (threads) read-modify-write the same memory at once, so no call may receive
    the same memory twice. Here: a parameter listed twice, and a view of another gradient from the
    same address; the large one spans several chunks, so blocks of both occurrences run at once."""
    import fusedreg.utils.clip as clip_module

    calls = []
    real_kernel = clip_module.kernel

    def spy(name, backend_name, reference_module):
        op = real_kernel(name, backend_name, reference_module)
        if name != "multi_tensor_scale_":
            return op

        def run(tensors, scale):
            calls.append([t.data_ptr() for t in tensors if t.numel()])
            return op(tensors, scale)
        return run

    monkeypatch.setattr(clip_module, "kernel", spy)
    large = (1 << 20) + 5 if device == "cuda" or backend == "cpu" else 3 * 65536 + 5
    grads = _grads(device, torch.float32, [(large,), (7, 13), (0,), (5,)], scale=10.0)

    def listing(dtype):
        a, b, empty, c = _wrap_all([g.to(dtype, copy=True) for g in grads])
        b_view = _wrap_all([b.grad.view(-1)])[0]
        return [a, b, empty, a, b_view, c, empty, a]

    # torch in float64: its float32 norm of 2**20 elements is itself off by ~1e-5
    ours, theirs = listing(torch.float32), listing(torch.float64)
    norm_ours = fusedreg.clip_grad_norm_(ours, 1.0, backend=backend)
    norm_theirs = torch.nn.utils.clip_grad_norm_(theirs, 1.0)
    torch.testing.assert_close(norm_ours.double(), norm_theirs, atol=0, rtol=1e-6)
    for o, t in zip(ours, theirs):
        torch.testing.assert_close(o.grad, t.grad.float(), atol=1e-12, rtol=1e-6)
    assert calls and all(len(set(ptrs)) == len(ptrs) for ptrs in calls), calls


def _wrap_all(grads):
    """Parameter-like objects whose .grad is each of `grads` itself."""
    return [_wrap(g)[0] for g in grads]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_tensor_listed_twice_large(backend):
    """Many chunks of one gradient listed twice: every element scaled twice, on every run."""
    grad = torch.randn(1 << 24, device="cuda") * 10
    for _ in range(3):
        ours, theirs = _wrap(grad.clone()), _wrap(grad.clone())
        fusedreg.clip_grad_norm_(ours * 2, 1.0, backend=backend)
        torch.nn.utils.clip_grad_norm_(theirs * 2, 1.0)
        torch.testing.assert_close(ours[0].grad, theirs[0].grad, atol=1e-12, rtol=1e-5)


@pytest.mark.parametrize("device,backend", [p for p in PAIRS if p.values[0] == "cpu"])
def test_python_float_norm_makes_no_host_tensor(device, backend, monkeypatch):
    """clip_grads_with_norm_ with total_norm a float fills the norm on the device instead of
    copying it from the host (a pageable copy waits for the GPU and cannot be captured)."""
    made = []
    real_tensor = torch.tensor

    def tensor(data, *args, **kwargs):
        if isinstance(data, (int, float)):
            made.append(data)
        return real_tensor(data, *args, **kwargs)

    grads = _grads(device, torch.float32, SHAPES[:3])
    ours, theirs = _params(grads), _params(grads)
    monkeypatch.setattr(torch, "tensor", tensor)
    fusedreg.clip_grads_with_norm_(ours, 1.0, 7.5, backend=backend)
    monkeypatch.undo()
    assert made == []
    torch.nn.utils.clip_grads_with_norm_(theirs, 1.0, torch.tensor(7.5))
    for o, t in zip(ours, theirs):
        torch.testing.assert_close(o.grad, t.grad)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_python_float_norm_no_sync_and_capturable(backend):
    grads = _grads("cuda", torch.float32, SHAPES[:3])
    params = _params(grads)
    fusedreg.clip_grads_with_norm_(params, 1.0, 7.5, backend=backend)  # warm-up: build, compile
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fusedreg.clip_grads_with_norm_(params, 1.0, 7.5, backend=backend)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for p, g in zip(params, grads):
        p.grad.copy_(g)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fusedreg.clip_grads_with_norm_(params, 1.0, 7.5, backend=backend)
    graph.replay()
    expected = _params(grads)
    torch.nn.utils.clip_grads_with_norm_(expected, 1.0, torch.tensor(7.5, device="cuda"))
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.grad, e.grad)


# ----------------------------------------------------------------------------- general p: |x|^p

@pytest.mark.parametrize("p", [3.0, 0.5, 1.5, math.inf])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device,backend", NATIVE_PAIRS)
def test_p_norm_special_values_as_torch(device, backend, dtype, p):
    """|x|^p is exp2(p * log2|x|) on the kernels (max |x| of 16-bit data a max over bit patterns):
    0 and -0 still give 0, inf and -inf give inf, NaN gives NaN whatever else the list holds."""
    op = _loaded_op("grad_norm_pow", backend)
    finite = _grads(device, dtype, shapes=[(37,)], seed=4)[0]

    def with_values(*values):
        return [finite, torch.tensor(values, dtype=dtype, device=device)]

    zeros = op([torch.tensor([0.0, -0.0, 0.0], dtype=dtype, device=device)], p)
    assert zeros.item() == 0.0 and not zeros.isnan()
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    magnitudes = finite.to(torch.float64).abs()
    expected = (magnitudes.amax() if math.isinf(p) else magnitudes.pow(p).sum()).to(acc)
    torch.testing.assert_close(op(with_values(0.0, -0.0), p), expected, atol=0, rtol=TOLERANCES[acc][1])
    for values, want in [((1.0, math.inf), math.inf), ((-math.inf, 0.0), math.inf), ((math.nan, 2.0), math.nan),
                         ((math.inf, math.nan), math.nan)]:
        got = op(with_values(*values), p).item()
        ref = reference.grad_norm_pow(with_values(*values), p).item()
        assert (math.isnan(got) and math.isnan(ref) and math.isnan(want)) or got == ref == want, (values, got, ref)


@pytest.mark.parametrize("p", [0.5, 1.5, 3.0, 7.0])
@pytest.mark.parametrize("device,backend", NATIVE_PAIRS)
def test_p_norm_relative_error_over_magnitudes(device, backend, p):
    """|x|^p from 2^-100 to 2^100 (|x| a normal float32), dominated in turn by the largest and by
    many small terms: the p-th power sum keeps the float32 norm tolerance against float64 (the
    product p * log2|x| is rounded to float32, so the error bound grows with |log2 |x|^p|, up to
    ~4e-6 here)."""
    gen = torch.Generator().manual_seed(7)
    limit = min(100.0, 120.0 * p)
    exponent = (torch.rand(4096, generator=gen, dtype=torch.float64) * 2 - 1) * limit  # log2 |x|^p
    sign = torch.where(torch.rand(4096, generator=gen) < 0.5, -1.0, 1.0).double()
    x = (sign * torch.exp2(exponent / p)).float()
    op = _loaded_op("grad_norm_pow", backend)
    for part in (x, x[exponent < 0], x[(exponent > 40) & (exponent < 60)]):  # all; only tiny; mid
        exact = part.double().abs().pow(p).sum()
        assert part.numel() > 100 and math.isfinite(exact.item()) and exact > 0
        got = op([part.to(device)], p)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double().cpu(), exact, atol=0, rtol=TOLERANCES[torch.float32][1])
