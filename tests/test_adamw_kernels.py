"""fusedreg::adamw_step_ kernels (cpu, triton, cuda) against the eager reference op on the same inputs.

The reference itself is checked against torch.optim.AdamW in test_reference_adamw.py; opcheck runs
from test_opcheck.py. Sizes are small and odd (the Triton interpreter is slow), except where a test
needs a tensor longer than one 65536-element chunk.
"""
import importlib

import pytest
import torch

from conftest import TOLERANCES, native_backends
from fusedreg import _build, _library
from fusedreg.reference.adamw import adamw_step_ as reference_step

PAIRS = [("cpu", b) for b in native_backends("cpu")] + [("cuda", b) for b in native_backends("cuda")]
# (param dtype, state dtype): states in the params' dtype, or float32 under 16-bit params
DTYPE_PAIRS = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
               (torch.bfloat16, torch.float32), (torch.float16, torch.float16),
               (torch.float16, torch.float32), (torch.float64, torch.float64)]
SIZES = [(7, 3), (13,), (0,), (), (2, 3, 5), (1031,)]


def _op(backend):
    if backend == "triton":
        importlib.import_module("fusedreg.triton.adamw")
    else:
        _build.load_library(backend)
    return _library.op("adamw_step_", backend)


def _tol(dtype):
    atol, rtol = TOLERANCES[dtype]
    return dict(atol=atol, rtol=rtol)


def _hparams(n, device, seed=0):
    """Per-tensor rows (lr, beta1, beta2, weight_decay, eps): weight decay zero on every other tensor,
    and beta1 = 0.3 on every third one (torch.lerp's other form: weight 1 - beta1 >= 0.5)."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        lr = float(torch.empty(()).uniform_(1e-3, 3e-2, generator=gen))
        beta1 = 0.3 if i % 3 == 2 else 0.9
        rows.append([lr, beta1, 0.999 if i % 2 else 0.95, 0.0 if i % 2 else 0.1, 1e-8 if i % 2 else 1e-6])
    return torch.tensor(rows, dtype=torch.float64, device=device)


def _state(device, dtype, state_dtype, amsgrad, sizes=SIZES, seed=0):
    """A mid-training state: params, moments (v <= max_v somewhere, > elsewhere), per-tensor steps."""
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen).to(device, dtype) for s in sizes]
    exp_avgs = [(torch.randn(s, generator=gen) * 0.1).to(device, state_dtype) for s in sizes]
    exp_avg_sqs = [(torch.rand(s, generator=gen) * 0.01).to(device, state_dtype) for s in sizes]
    max_sqs = [(torch.rand(s, generator=gen) * 0.012).to(device, state_dtype) if amsgrad else None for s in sizes]
    steps = [torch.tensor(float(3 * i + 1), device=device) for i in range(len(sizes))]
    return dict(params=params, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs,
                max_exp_avg_sqs=max_sqs if amsgrad else [], steps=steps)


def _grads(state, seed):
    gen = torch.Generator().manual_seed(1000 + seed)
    return [torch.randn(p.shape, generator=gen).to(p.device, p.dtype) for p in state["params"]]


def _clone(state):
    return {k: [t.clone() for t in v] for k, v in state.items()}


def _step(fn, state, grads, hparams, amsgrad=False, maximize=False, grad_scale=None, found_inf=None,
          clip_coef=None):
    fn(state["params"], grads, state["exp_avgs"], state["exp_avg_sqs"], state["max_exp_avg_sqs"],
       state["steps"], hparams, amsgrad, maximize, grad_scale, found_inf, clip_coef)


def _assert_state_close(actual, expected, **tol):
    for key in ("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"):
        for i, (a, e) in enumerate(zip(actual[key], expected[key])):
            assert a.dtype == e.dtype and a.stride() == e.stride()
            torch.testing.assert_close(a, e, **tol, msg=lambda m: f"{key}[{i}]: {m}")


def _assert_state_equal(actual, expected):
    for key in ("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"):
        for a, e in zip(actual[key], expected[key]):
            assert torch.equal(a, e) or (a.isnan() == e.isnan()).all() and torch.equal(a.nan_to_num(), e.nan_to_num())


@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("dtype,state_dtype", DTYPE_PAIRS, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("amsgrad,maximize", [(False, False), (True, False), (False, True), (True, True)])
def test_matches_reference_every_step(device, backend, dtype, state_dtype, amsgrad, maximize):
    """Four steps; each starts both ops from the reference's state, so the tolerance is one step's."""
    op = _op(backend)
    state = _state(device, dtype, state_dtype, amsgrad)
    hparams = _hparams(len(SIZES), device)
    for k in range(4):
        grads = _grads(state, k)
        ours = _clone(state)
        _step(op, ours, grads, hparams, amsgrad, maximize)
        _step(reference_step, state, grads, hparams, amsgrad, maximize)
        _assert_state_close(ours, state, **_tol(dtype))
        for s in state["steps"]:
            s += 1


@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("amsgrad", [False, True])
def test_fp32_trajectory_stays_tight(device, backend, amsgrad):
    """Float32 run freely for eight steps: the backends' results stay within fp32 tolerance."""
    op = _op(backend)
    ours = _state(device, torch.float32, torch.float32, amsgrad)
    ref = _clone(ours)
    hparams = _hparams(len(SIZES), device, seed=1)
    for k in range(8):
        grads = _grads(ours, k)
        _step(op, ours, grads, hparams, amsgrad)
        _step(reference_step, ref, grads, hparams, amsgrad)
        for s, r in zip(ours["steps"], ref["steps"]):
            s += 1
            r += 1
    _assert_state_close(ours, ref, **_tol(torch.float32))
    assert not torch.equal(ours["params"][0], _state(device, torch.float32, torch.float32, amsgrad)["params"][0])


@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_states_round_once_like_torch(device, backend, dtype):
    """beta1 = beta2 = 0 makes m = g and v = g * g exactly in fp32: the stored states must be
    torch's own rounding of those (ties, subnormals, overflow to inf, NaN)."""
    op = _op(backend)
    # finite in dtype; squares that tie, go subnormal, flush to zero or overflow
    overflow, tiny = (300.0, 2**-10) if dtype == torch.float16 else (2e19, 2.4e-20)
    g = torch.tensor([1.0, -3.0, 1 + 2**-7, overflow, tiny, 2**-13, 1e-3, 255.9, float("nan"), -0.0, 65000.0,
                      3.3, -7.1e-3, 1e-30], device=device).to(dtype)
    state = {"params": [torch.ones_like(g)], "exp_avgs": [torch.zeros_like(g)],
             "exp_avg_sqs": [torch.zeros_like(g)], "max_exp_avg_sqs": [], "steps": [torch.tensor(1.0, device=device)]}
    hparams = torch.tensor([[1e-3, 0.0, 0.0, 0.0, 1e-8]], dtype=torch.float64, device=device)
    _step(op, state, [g], hparams)
    gf = g.float()
    _assert_state_equal({"params": [], "exp_avgs": state["exp_avgs"], "exp_avg_sqs": state["exp_avg_sqs"],
                         "max_exp_avg_sqs": []},
                        {"params": [], "exp_avgs": [g], "exp_avg_sqs": [(gf * gf).to(dtype)], "max_exp_avg_sqs": []})
    assert state["exp_avg_sqs"][0].isinf().any() and (state["exp_avg_sqs"][0] == 0).any()


@pytest.mark.parametrize("device,backend", PAIRS)
def test_many_tensors_and_empty_ones(device, backend):
    """300 tensors (more than one 256-slot chunk table), a third of them empty, each with its own
    hyperparameters and step."""
    op = _op(backend)
    sizes = [(i % 7) * (i % 3 != 0) for i in range(300)]
    state = _state(device, torch.float32, torch.float32, amsgrad=True, sizes=sizes, seed=4)
    hparams = _hparams(len(sizes), device, seed=4)
    grads = _grads(state, 0)
    ours = _clone(state)
    _step(op, ours, grads, hparams, amsgrad=True)
    _step(reference_step, state, grads, hparams, amsgrad=True)
    _assert_state_close(ours, state, **_tol(torch.float32))


@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunks_and_misaligned_tensors(device, backend, dtype):
    """A tensor spanning three 65536-element chunks (its last one partial), and views starting one
    element into their storage (2 or 4 bytes: no 16-byte vectors for those lists)."""
    op = _op(backend)
    n = 2 * 65536 + 37
    storage = _state(device, dtype, torch.float32, amsgrad=True, sizes=[(n + 2,), (102,)], seed=5)
    views = {k: v if k == "steps" else [v[0][1:n + 1], v[1][1:]] if k in ("params", "exp_avgs")
             else [v[0][:n], v[1][:101]] for k, v in storage.items()}
    expected = _clone(views)  # contiguous copies: aligned
    untouched = [storage["params"][0][[0, n + 1]].clone(), storage["exp_avgs"][1][:1].clone()]
    hparams = _hparams(2, device, seed=5)
    grads = _grads(views, 5)
    _step(op, views, grads, hparams, amsgrad=True)
    _step(reference_step, expected, grads, hparams, amsgrad=True)
    _assert_state_close(views, expected, **_tol(dtype))
    assert torch.equal(storage["params"][0][[0, n + 1]], untouched[0])  # nothing outside the views
    assert torch.equal(storage["exp_avgs"][1][:1], untouched[1])


def _one_step(device, amsgrad=True):
    state = _state(device, torch.float32, torch.float32, amsgrad, sizes=[(5, 3), (17,)], seed=7)
    return state, _grads(state, 7), _hparams(2, device, seed=7)


@pytest.mark.parametrize("device,backend", PAIRS)
def test_grad_scale_divides_grads(device, backend):
    op = _op(backend)
    state, grads, hparams = _one_step(device)
    unscaled = _clone(state)
    _step(op, unscaled, grads, hparams, amsgrad=True)
    for scale in (torch.tensor(1024.0, device=device), torch.tensor([2.0**-3], device=device, dtype=torch.float64)):
        scaled = _clone(state)
        _step(op, scaled, [g * scale.float() for g in grads], hparams, amsgrad=True, grad_scale=scale,
              found_inf=torch.zeros(1, device=device))
        _assert_state_equal(scaled, unscaled)  # powers of two: unscaling is exact
    # any other scale: as the reference divides
    ours, ref = _clone(state), _clone(state)
    scale = torch.tensor(3.0, device=device)
    _step(op, ours, grads, hparams, amsgrad=True, grad_scale=scale)
    _step(reference_step, ref, grads, hparams, amsgrad=True, grad_scale=scale)
    _assert_state_close(ours, ref, **_tol(torch.float32))
    assert not torch.equal(ours["params"][0], unscaled["params"][0])


@pytest.mark.parametrize("device,backend", PAIRS)
def test_clip_coef_multiplies_grads(device, backend):
    op = _op(backend)
    state, grads, hparams = _one_step(device)
    coef = torch.tensor([0.37], device=device)
    clipped, premultiplied = _clone(state), _clone(state)
    _step(op, clipped, grads, hparams, amsgrad=True, clip_coef=coef)
    _step(op, premultiplied, [g * coef for g in grads], hparams, amsgrad=True)
    _assert_state_equal(clipped, premultiplied)
    # with maximize and grad_scale as well: as the reference, (g / scale * coef) negated
    ours, ref = _clone(state), _clone(state)
    args = dict(amsgrad=True, maximize=True, grad_scale=torch.tensor(3.0, device=device), clip_coef=coef)
    _step(op, ours, grads, hparams, **args)
    _step(reference_step, ref, grads, hparams, **args)
    _assert_state_close(ours, ref, **_tol(torch.float32))


@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("found_inf_dtype", [torch.float32, torch.float64])
def test_found_inf_changes_nothing(device, backend, found_inf_dtype):
    op = _op(backend)
    state, grads, hparams = _one_step(device)
    grads[0][1, 2] = float("inf")
    grads[1][3] = float("nan")
    before = _clone(state)
    found_inf = torch.ones(1, device=device, dtype=found_inf_dtype)
    _step(op, state, grads, hparams, amsgrad=True, grad_scale=torch.tensor(2.0, device=device), found_inf=found_inf)
    _assert_state_equal(state, before)
    _step(op, state, grads, hparams, amsgrad=True, found_inf=found_inf * 0)
    assert state["params"][0][1, 2].isnan() and not state["params"][0][0, 0].isnan()


def _valid_args(device, amsgrad=False):
    state, grads, hparams = _one_step(device, amsgrad)
    return [state["params"], grads, state["exp_avgs"], state["exp_avg_sqs"], state["max_exp_avg_sqs"],
            state["steps"], hparams, amsgrad, False, None, None, None]


def _replace(args, index, value):
    args = list(args)
    args[index] = value
    return args


def _bad_inputs(device):
    """(description, args, pattern the error must match): the pattern names the argument."""
    ok = _valid_args(device)
    params, grads, exp_avgs, exp_avg_sqs, _, steps, hparams = ok[:7]
    ams = _valid_args(device, amsgrad=True)
    return [
        ("empty params", [[], [], [], [], [], [], hparams[:0]] + ok[7:], r"params must be a non-empty"),
        ("grads too short", _replace(ok, 1, grads[:1]), r"params and grads must have the same length"),
        ("grads dtype", _replace(ok, 1, [grads[0], grads[1].double()]), r"grads\[1\] has dtype"),
        ("grads shape", _replace(ok, 1, [grads[0].t(), grads[1]]), r"grads\[0\] has shape"),
        ("params dtype", _replace(ok, 0, [params[0], params[1].half()]), r"params\[1\] has dtype"),
        ("state dtype", _replace(ok, 2, [e.double() for e in exp_avgs]), r"exp_avgs\[0\] has dtype"),
        ("states disagree", _replace(ok, 3, [exp_avg_sqs[0], exp_avg_sqs[1].half()]), r"exp_avg_sqs\[1\] has dtype"),
        ("state layout", _replace(ok, 2, [exp_avgs[0].t().contiguous().t(), exp_avgs[1]]), r"exp_avgs\[0\] has strides"),
        ("params not dense", _replace(ok, 0, [torch.randn(5, 6, device=device)[:, ::2], params[1]]),
         r"params\[0\] must be non-overlapping and dense"),
        ("exp_avg_sqs too long", _replace(ok, 3, exp_avg_sqs * 2), r"params and exp_avg_sqs must have the same length"),
        ("max_exp_avg_sqs without amsgrad", _replace(ok, 4, [e.clone() for e in exp_avg_sqs]),
         r"max_exp_avg_sqs must be empty when amsgrad=False"),
        ("max_exp_avg_sqs missing", _replace(ams, 4, []), r"params and max_exp_avg_sqs must have the same length"),
        ("steps dtype", _replace(ok, 5, [steps[0], steps[1].double()]), r"steps\[1\] must be a float32 tensor"),
        ("steps too short", _replace(ok, 5, steps[:1]), r"params and steps must have the same length"),
        ("hparams dtype", _replace(ok, 6, hparams.float()), r"hparams must have dtype"),
        ("hparams shape", _replace(ok, 6, hparams[:, :4]), r"hparams must have shape"),
        ("grad_scale shape", _replace(ok, 9, torch.ones(2, device=device)), r"grad_scale must have exactly one element"),
        ("found_inf dtype", _replace(ok, 10, torch.zeros(1, device=device, dtype=torch.int32)),
         r"found_inf must be float32 or float64"),
        ("clip_coef dtype", _replace(ok, 11, torch.ones((), device=device, dtype=torch.half)),
         r"clip_coef must be float32 or float64"),
    ]


@pytest.mark.parametrize("device,backend", PAIRS)
def test_bad_arguments_are_named(device, backend):
    op = _op(backend)
    for description, args, pattern in _bad_inputs(device):
        with pytest.raises((RuntimeError, ValueError), match=pattern):
            op(*args)
        # nothing was written before the check failed
    _, args, _ = _bad_inputs(device)[1]
    before = [p.clone() for p in args[0]]
    with pytest.raises((RuntimeError, ValueError)):
        op(*args)
    assert all(torch.equal(a, b) for a, b in zip(args[0], before))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", native_backends("cuda") or ["cuda"])
def test_tensors_on_other_devices_are_named(backend):
    op = _op(backend)
    args = _valid_args("cuda")
    cases = [(_replace(args, 5, [s.cpu() for s in args[5]]), r"steps\[0\] is on cpu"),
             (_replace(args, 6, args[6].cpu()), r"hparams must be on cuda"),
             (_replace(args, 1, [args[1][0], args[1][1].cpu()]), r"grads\[1\] is on cpu"),
             (_replace(args, 9, torch.tensor(2.0)), r"grad_scale must be on cuda")]
    for bad, pattern in cases:
        with pytest.raises((RuntimeError, ValueError), match=pattern):
            op(*bad)


@pytest.mark.gpu
def test_cuda_step_is_capturable_in_a_graph():
    """Captured once, replayed with new grads, steps, grad_scale and found_inf written in place: each
    replay matches the reference on the same inputs, and a found_inf replay changes nothing."""
    op = _op("cuda")
    state = _state("cuda", torch.bfloat16, torch.float32, amsgrad=True, seed=9)
    hparams = _hparams(len(SIZES), "cuda", seed=9)
    grads = _grads(state, 0)
    grad_scale, found_inf = torch.tensor([1.0], device="cuda"), torch.zeros(1, device="cuda")
    clip_coef = torch.tensor(0.5, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up (builds, first-call allocations) off the capture
        _step(op, _clone(state), grads, hparams, True, False, grad_scale, found_inf, clip_coef)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _step(op, state, grads, hparams, True, False, grad_scale, found_inf, clip_coef)
    for k in range(1, 4):
        new = _grads(state, k)
        for g, n in zip(grads, new):
            g.copy_(n * 4)
        grad_scale.fill_(4.0)
        found_inf.fill_(float(k == 2))
        for s in state["steps"]:
            s += 1
        expected = _clone(state)
        _step(reference_step, expected, grads, hparams, True, False, grad_scale, found_inf, clip_coef)
        graph.replay()
        _assert_state_close(state, expected, **_tol(torch.bfloat16))


@pytest.mark.parametrize("device,backend", PAIRS)
def test_strides_of_size_one_dims_are_ignored(device, backend):
    """A contiguous [1, 8] grad may have strides (1, 1) where its parameter has (8, 1)
    (AccumulateGrad keeps such a grad as it is): same memory order, so the kernels accept it. The
    moments here differ from the parameter on size-1 dimensions too."""
    gen = torch.Generator().manual_seed(4)
    params = [torch.randn(1, 8, generator=gen).to(device),
              torch.randn(5, 1, 3, generator=gen).to(device)]
    grads = [torch.randn(8, 1, generator=gen).to(device).t(),              # strides (1, 1)
             torch.randn(15, generator=gen).to(device).as_strided((5, 1, 3), (3, 0, 1))]
    exp_avgs = [(torch.rand(8, 1, generator=gen) * 0.1).to(device).t(),
                (torch.rand(5, 1, 3, generator=gen) * 0.1).to(device).as_strided((5, 1, 3), (3, 7, 1))]
    exp_avg_sqs = [(torch.rand(1, 8, generator=gen) * 0.01).to(device).as_strided((1, 8), (0, 1)),
                   (torch.rand(5, 1, 3, generator=gen) * 0.01).to(device)]
    assert grads[0].stride() != params[0].stride() and grads[1].stride() != params[1].stride()
    state = dict(params=params, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs, max_exp_avg_sqs=[],
                 steps=[torch.tensor(3.0, device=device), torch.tensor(1.0, device=device)])
    hparams = _hparams(2, device, seed=4)
    expected = {k: [t.contiguous() for t in v] for k, v in state.items()}
    _step(reference_step, expected, [g.contiguous() for g in grads], hparams)
    _step(_op(backend), state, grads, hparams)
    for key in ("params", "exp_avgs", "exp_avg_sqs"):
        for a, e in zip(state[key], expected[key]):
            torch.testing.assert_close(a, e, **_tol(torch.float32))
