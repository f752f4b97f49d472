"""Pure-bf16 AdamW: stochastic rounding of bfloat16 params and moments (sr_seed of fusedreg::adamw_step_,
bf16_stochastic_round / state_dtype=torch.bfloat16 of fusedreg.optim.AdamW).

The rounding is checked for unbiasedness on the reference and on every kernel; the kernels are checked
bit for bit against the reference (the random stream of csrc/adamw.h is shared by every backend); the
optimizer for reproducibility, fresh bits per step, the stall it exists to fix, errors and checkpoints.
"""
import importlib
import math

import pytest
import torch

from conftest import TOLERANCES, native_backends
from fusedreg import _build, _library
from fusedreg.optim import AdamW
from fusedreg.reference.adamw import adamw_step_ as reference_step
from fusedreg.reference.adamw import sr_random_bits, stochastic_round_bf16

BACKENDS = [pytest.param(d, b, id=f"{d}-{b}") for d in ("cpu", "cuda") for b in native_backends(d)]
ALL_BACKENDS = [pytest.param("cpu", "reference", id="cpu-reference")] + BACKENDS
# (param dtype, state dtype) pairs with a bfloat16 tensor to round
SR_PAIRS = [(torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32),
            (torch.float32, torch.bfloat16), (torch.float16, torch.bfloat16)]


def _op(backend):
    if backend == "reference":
        return reference_step
    if backend == "triton":
        importlib.import_module("fusedreg.triton.adamw")
    else:
        _build.load_library(backend)
    return _library.op("adamw_step_", backend)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16) if t.dtype in (torch.bfloat16, torch.float16) else t.view(torch.int32)


def _ulp_below(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x truncated to bfloat16, the next bfloat16 away from zero), as float32 (x finite, positive)."""
    lo = (x.view(torch.int32) & ~0xFFFF).view(torch.float32)
    hi = ((x.view(torch.int32) & ~0xFFFF) + 0x10000).view(torch.float32)
    return lo, hi


# ----------------------------------------------------------------------------- the rounding itself

def test_rounding_over_every_random_value_is_exactly_unbiased():
    """Summed over all 2**16 random values, the roundings of x add up to 2**16 * x exactly: the
    expectation is x itself, not just close to it."""
    gen = torch.Generator().manual_seed(0)
    xs = torch.cat([torch.randn(6, generator=gen) * 10.0 ** torch.arange(-3, 3),
                    torch.tensor([1.0 + 2**-9, -3.0 - 2**-12, 1e-40, 2.0])])
    r = torch.arange(1 << 16, dtype=torch.int64)
    for x in xs:
        rounded = stochastic_round_bf16(x.expand(1 << 16), r).double()
        assert rounded.sum().item() == pytest.approx((1 << 16) * x.double().item(), rel=0, abs=0)
        assert len(rounded.unique()) <= 2


def test_special_values():
    r = torch.tensor([0, 0x7FFF, 0xFFFF], dtype=torch.int64)
    for value in (float("inf"), float("-inf"), 0.0, -0.0, 1.0):
        out = stochastic_round_bf16(torch.full((3,), value), r)
        assert torch.equal(_bits(out), _bits(torch.full((3,), value, dtype=torch.bfloat16)))
    for nan_bits in (0x7FC00000, 0x7F800001, 0xFFFFFFFF - (1 << 32), 0x7FFFFFFF):
        out = stochastic_round_bf16(torch.tensor([nan_bits] * 3, dtype=torch.int32).view(torch.float32), r)
        assert torch.equal(_bits(out), torch.full((3,), 0x7FC0, dtype=torch.int16))  # as round-to-nearest
    # above the largest bfloat16: inf with the probability of the fraction (never for r = 0)
    big = torch.tensor([0x7F7FFFFF] * 3, dtype=torch.int32).view(torch.float32)
    out = stochastic_round_bf16(big, r).float()
    assert out[0] == torch.finfo(torch.bfloat16).max and out[1:].isinf().all()
    assert stochastic_round_bf16(-big, r).float()[1:].eq(float("-inf")).all()


def _rounded_moments(backend, device, x: float, n: int, seed: int) -> torch.Tensor:
    """n stochastic roundings of the float32 value x through the op: float32 params with bfloat16
    moments, beta1 = 0, so that exp_avg = lerp(m, g, 1) = g = x exactly before its rounding."""
    params = [torch.zeros(n, device=device)]
    grads = [torch.full((n,), x, device=device)]
    exp_avgs = [torch.zeros(n, dtype=torch.bfloat16, device=device)]
    exp_avg_sqs = [torch.zeros(n, dtype=torch.bfloat16, device=device)]
    steps = [torch.tensor(1.0, device=device)]
    hparams = torch.tensor([[0.0, 0.0, 0.999, 0.0, 1e-8]], dtype=torch.float64, device=device)
    sr_seed = torch.tensor([seed], dtype=torch.int64, device=device)
    _op(backend)(params, grads, exp_avgs, exp_avg_sqs, [], steps, hparams, False, False, None, None, None,
                 sr_seed)
    return exp_avgs[0].float().cpu()


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
@pytest.mark.parametrize("x", [1.0 + 2**-10, -0.3, 7.77e-5])
def test_kernel_rounding_is_unbiased_within_one_ulp(device, backend, x):
    n = 4096 if backend == "triton" and device == "cpu" else 1 << 16
    rounded = _rounded_moments(backend, device, x, n, seed=12345)
    value = torch.tensor(abs(x), dtype=torch.float32)
    lo, hi = _ulp_below(value)
    sign = math.copysign(1.0, x)
    assert ((rounded == sign * lo) | (rounded == sign * hi)).all()  # never more than one ulp off
    p = float((value - lo) / (hi - lo))
    assert 0 < p < 1
    sigma = float(hi - lo) * math.sqrt(p * (1 - p) / n)
    assert abs(rounded.double().mean().item() - float(torch.tensor(x, dtype=torch.float32))) < 5 * sigma


def test_random_bits_are_uniform_and_distinct_per_operand_and_tensor():
    seed = torch.tensor([987654321], dtype=torch.int64)
    a = sr_random_bits(seed, 0, 1 << 16, 0)
    assert a.min() >= 0 and a.max() < 1 << 16
    assert abs(a.double().mean().item() - 32767.5) < 5 * 18918 / 256  # sd of U[0, 2**16) / sqrt(n)
    others = [sr_random_bits(seed, 0, 1 << 16, 1), sr_random_bits(seed, 1, 1 << 16, 0),
              sr_random_bits(torch.tensor([987654322]), 0, 1 << 16, 0)]
    for b in others:
        assert (a == b).double().mean().item() < 1e-3  # independent streams agree ~2**-16 of the time


# ----------------------------------------------------------------------------- kernels vs reference

def _state(device, dtype, state_dtype, amsgrad, sizes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    # a storage offset of one element puts every tensor off the 16-byte vector path
    def make(shape, scale, kind, dt, offset):
        t = (torch.randn if kind == "n" else torch.rand)(math.prod(shape) + offset, generator=gen) * scale
        return t.to(device, dt)[offset:].view(shape)
    lists = {"params": [], "grads": [], "exp_avgs": [], "exp_avg_sqs": [], "max_exp_avg_sqs": []}
    for i, shape in enumerate(sizes):
        off = 1 if i == 1 else 0
        lists["params"].append(make(shape, 1.0, "n", dtype, off))
        lists["grads"].append(make(shape, 1.0, "n", dtype, off))
        lists["exp_avgs"].append(make(shape, 0.1, "n", state_dtype, off))
        lists["exp_avg_sqs"].append(make(shape, 0.01, "u", state_dtype, off))
        if amsgrad:
            lists["max_exp_avg_sqs"].append(make(shape, 0.012, "u", state_dtype, off))
    lists["steps"] = [torch.tensor(float(3 * i + 1), device=device) for i in range(len(sizes))]
    rows = [[1e-2 * (i + 1), 0.3 if i % 3 == 2 else 0.9, 0.999, 0.1 * (i % 2), 1e-8] for i in range(len(sizes))]
    hparams = torch.tensor(rows, dtype=torch.float64, device=device)
    return lists, hparams


def _call(op, lists, hparams, amsgrad, **kw):
    op(lists["params"], lists["grads"], lists["exp_avgs"], lists["exp_avg_sqs"], lists["max_exp_avg_sqs"],
       lists["steps"], hparams, amsgrad, kw.get("maximize", False), kw.get("grad_scale"), kw.get("found_inf"),
       kw.get("clip_coef"), kw.get("sr_seed"), kw.get("ids", []))


def _assert_bitwise(actual, expected):
    for key in ("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"):
        for i, (a, e) in enumerate(zip(actual[key], expected[key])):
            assert a.dtype == e.dtype
            mismatches = int((_bits(a.cpu()) != _bits(e.cpu())).sum())
            assert mismatches == 0, f"{key}[{i}]: {mismatches} of {a.numel()} elements differ"


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype,state_dtype", SR_PAIRS, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("amsgrad", [False, True])
def test_bit_identical_to_the_reference(device, backend, dtype, state_dtype, amsgrad):
    """Three steps, odd sizes, one misaligned tensor and (except in the interpreter) one longer than
    a chunk, ids out of order: every bit of every tensor as the reference's."""
    interpreted = device == "cpu" and backend == "triton"
    sizes = [(7, 3), (13,), (), (1031,)] + ([] if interpreted else [(65536 + 515,)])
    ours, hparams = _state(device, dtype, state_dtype, amsgrad, sizes)
    ref, _ = _state(device, dtype, state_dtype, amsgrad, sizes)
    ids = [9, 2, 40, 0, 7][:len(sizes)]
    for k in range(3):
        seed = torch.tensor([-(2**62) + 977 * k], dtype=torch.int64, device=device)
        _call(_op(backend), ours, hparams, amsgrad, sr_seed=seed, ids=ids, maximize=k == 1,
              clip_coef=torch.tensor(0.5, device=device) if k == 2 else None)
        _call(reference_step, ref, hparams, amsgrad, sr_seed=seed, ids=ids, maximize=k == 1,
              clip_coef=torch.tensor(0.5, device=device) if k == 2 else None)
        _assert_bitwise(ours, ref)
        for s in ours["steps"] + ref["steps"]:
            s += 1


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("amsgrad", [False, True])
def test_bf16_moments_round_to_nearest_without_a_seed(device, backend, dtype, amsgrad):
    """bfloat16 moments under float32/float16 params, no sr_seed: the reference's step within each
    tensor's own dtype tolerance (rounding to nearest may flip where the float32 values differ in
    their last bit)."""
    sizes = [(7, 3), (13,), (1031,)]
    ours, hparams = _state(device, dtype, torch.bfloat16, amsgrad, sizes)
    ref, _ = _state(device, dtype, torch.bfloat16, amsgrad, sizes)
    _call(_op(backend), ours, hparams, amsgrad)
    _call(reference_step, ref, hparams, amsgrad)
    for key in ("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"):
        for a, e in zip(ours[key], ref[key]):
            atol, rtol = TOLERANCES[a.dtype]
            assert a.dtype == e.dtype
            torch.testing.assert_close(a, e, atol=atol, rtol=rtol)
    assert not torch.equal(ours["params"][2], _state(device, dtype, torch.bfloat16, amsgrad, sizes)[0]["params"][2])


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_found_inf_skips_and_default_ids_are_positions(device, backend):
    lists, hparams = _state(device, torch.bfloat16, torch.bfloat16, False, [(33,), (5,)])
    before = {k: [t.clone() for t in v] for k, v in lists.items()}
    seed = torch.tensor([5], dtype=torch.int64, device=device)
    _call(_op(backend), lists, hparams, False, sr_seed=seed, found_inf=torch.ones(1, device=device))
    _assert_bitwise(lists, before)
    explicit = {k: [t.clone() for t in v] for k, v in lists.items()}
    _call(_op(backend), lists, hparams, False, sr_seed=seed)
    _call(reference_step, explicit, hparams, False, sr_seed=seed, ids=[0, 1])
    _assert_bitwise(lists, explicit)


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_bad_rounding_arguments_are_named(device, backend):
    op = _op(backend)
    errors = (ValueError, RuntimeError)
    fp32, hparams = _state(device, torch.float32, torch.float32, False, [(5,)])
    seed = torch.tensor([1], dtype=torch.int64, device=device)
    with pytest.raises(errors, match="no bfloat16 tensor to round"):
        _call(op, fp32, hparams, False, sr_seed=seed)
    bf16, hparams = _state(device, torch.bfloat16, torch.bfloat16, False, [(5,)])
    with pytest.raises(errors, match="sr_seed must be an int64 tensor"):
        _call(op, bf16, hparams, False, sr_seed=seed.float())
    with pytest.raises(errors, match="sr_tensor_ids must be empty or have one id per tensor"):
        _call(op, bf16, hparams, False, sr_seed=seed, ids=[1, 2])
    with pytest.raises(errors, match="sr_tensor_ids given without sr_seed"):
        _call(op, bf16, hparams, False, ids=[1])


# ----------------------------------------------------------------------------- the optimizer

def _model(dtype=torch.bfloat16):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(11, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).to(dtype)


def _train(model, opt, steps, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 11, generator=gen).to(next(model.parameters()).dtype)
    for _ in range(steps):
        opt.zero_grad()
        model(x).float().square().mean().backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("backend", ["reference", "cpu"] + (["triton"] if "triton" in native_backends("cpu") else []))
def test_optimizer_reproducible_under_manual_seed_and_same_on_every_backend(backend):
    runs = []
    for _ in range(2):
        model = _model()
        groups = [{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 3e-3}]
        opt = AdamW(groups, lr=1e-2, backend=backend, bf16_stochastic_round=True, state_dtype=torch.bfloat16)
        torch.manual_seed(1234)
        runs.append(_train(model, opt, 4))
    reference_model = _model()
    groups = [{"params": reference_model[0].parameters()}, {"params": reference_model[2].parameters(), "lr": 3e-3}]
    opt = AdamW(groups, lr=1e-2, backend="reference", bf16_stochastic_round=True, state_dtype=torch.bfloat16)
    torch.manual_seed(1234)
    expected = _train(reference_model, opt, 4)
    for a, b, e in zip(*runs, expected):
        assert torch.equal(_bits(a), _bits(b)) and torch.equal(_bits(a), _bits(e))
    torch.manual_seed(99)  # another seed, other roundings
    model = _model()
    opt = AdamW(model.parameters(), lr=1e-2, backend=backend, bf16_stochastic_round=True)
    torch.manual_seed(4321)
    other = _train(model, opt, 4)
    assert any(not torch.equal(a, b) for a, b in zip(other, runs[0]))


def test_every_step_draws_a_fresh_seed():
    """Two steps from one state, with one gradient: the second rounds with other bits. The state is
    restored in between, so only the seed differs."""
    p = torch.nn.Parameter(torch.ones(4096, dtype=torch.bfloat16))
    opt = AdamW([p], lr=1e-3, weight_decay=0.0, backend="cpu", bf16_stochastic_round=True)
    p.grad = torch.full_like(p, 0.5)
    opt.step()
    saved = ({k: (v.clone() if torch.is_tensor(v) else v) for k, v in opt.state[p].items()}, p.detach().clone())
    opt.step()
    first = p.detach().clone()
    for k, v in saved[0].items():
        opt.state[p][k].copy_(v)
    with torch.no_grad():
        p.copy_(saved[1])
    opt.step()
    assert not torch.equal(first, p.detach())
    assert (first.float() - p.detach().float()).abs().max() <= 2**-7  # one ulp at 1.0 at most


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_tiny_updates_move_bf16_weights_only_with_stochastic_rounding(backend):
    """lr * update = 2e-4, 1/39 of a bfloat16 ulp at 1.0 (2**-7): round-to-nearest never moves the
    weights; stochastic rounding moves them by the right amount on average."""
    steps, lr = 200, 2e-4
    moved = {}
    for sr in (False, True):
        p = torch.nn.Parameter(torch.ones(4096, dtype=torch.bfloat16))
        opt = AdamW([p], lr=lr, weight_decay=0.0, backend=backend, bf16_stochastic_round=sr,
                    state_dtype=torch.float32)
        torch.manual_seed(0)
        for _ in range(steps):
            p.grad = torch.full_like(p, -1.0)  # Adam's update is lr per step for a constant gradient
            opt.step()
        moved[sr] = p.detach().float() - 1.0
    assert torch.equal(moved[False], torch.zeros(4096))
    expected = steps * lr  # 0.04 = 5.1 ulps
    assert abs(moved[True].mean().item() - expected) < 0.05 * expected
    assert (moved[True] > 0).double().mean() > 0.95  # each stays put with probability ~e**-5


def test_optimizer_errors():
    bf16 = [torch.nn.Parameter(torch.zeros(3, dtype=torch.bfloat16))]
    fp32 = [torch.nn.Parameter(torch.zeros(3))]
    with pytest.raises(ValueError, match="no bfloat16 tensor to round"):
        AdamW(fp32, bf16_stochastic_round=True)
    with pytest.raises(ValueError, match="offered for bfloat16 only"):
        AdamW(bf16 + [torch.nn.Parameter(torch.zeros(3, dtype=torch.float16))], bf16_stochastic_round=True)
    with pytest.raises(ValueError, match="state_dtype must be None"):
        AdamW(bf16, state_dtype=torch.float16)
    with pytest.raises(TypeError, match="bf16_stochastic_round must be a bool"):
        AdamW(bf16, bf16_stochastic_round=1)
    AdamW(fp32, bf16_stochastic_round=True, state_dtype=torch.bfloat16)  # bfloat16 moments to round
    opt = AdamW(bf16, bf16_stochastic_round=True)
    with pytest.raises(ValueError, match="offered for bfloat16 only"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(3, dtype=torch.float16))]})
    assert len(opt.param_groups) == 1  # the refused group is not kept
    opt.add_param_group({"params": fp32})  # nothing to round there, but the optimizer has bfloat16
    AdamW([{"params": fp32}, {"params": bf16}], bf16_stochastic_round=True)  # bfloat16 in a later group


def test_bf16_moments_and_checkpoints_load_both_ways():
    model = _model()
    opt = AdamW(model.parameters(), lr=1e-2, backend="cpu", bf16_stochastic_round=True, state_dtype=torch.bfloat16)
    _train(model, opt, 3)
    saved = opt.state_dict()
    for state in saved["state"].values():
        assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.bfloat16
    torch_opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    torch_opt.load_state_dict(saved)
    for p in model.parameters():
        assert torch.equal(torch_opt.state[p]["exp_avg"], opt.state[p]["exp_avg"])
        assert torch_opt.state[p]["exp_avg"].dtype == torch.bfloat16
    _train(model, torch_opt, 1)
    back = AdamW(model.parameters(), lr=1e-2, backend="cpu", bf16_stochastic_round=True, state_dtype=torch.bfloat16)
    back.load_state_dict(torch_opt.state_dict())
    for p in model.parameters():
        assert back.state[p]["exp_avg"].dtype == torch.bfloat16
        assert torch.equal(back.state[p]["exp_avg"], torch_opt.state[p]["exp_avg"])
    # float32 params: bfloat16 moments from a float32 checkpoint (torch's) are cast on load
    model32 = _model(torch.float32)
    torch32 = torch.optim.AdamW(model32.parameters())
    _train(model32, torch32, 1)
    ours32 = AdamW(model32.parameters(), state_dtype=torch.bfloat16, bf16_stochastic_round=True, backend="cpu")
    ours32.load_state_dict(torch32.state_dict())
    assert all(ours32.state[p]["exp_avg_sq"].dtype == torch.bfloat16 for p in model32.parameters())
    _train(model32, ours32, 1)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_grad_scaler_and_max_grad_norm_keep_working(backend):
    results = {}
    for b in ("reference", backend):
        model = _model()
        opt = AdamW(model.parameters(), lr=1e-2, backend=b, bf16_stochastic_round=True, max_grad_norm=0.01,
                    amsgrad=True)
        torch.manual_seed(7)
        results[b] = _train(model, opt, 3)
        before = [p.detach().clone() for p in model.parameters()]
        opt.step(grad_scale=torch.tensor(2.0), found_inf=torch.tensor(1.0))  # an overflow: skipped
        assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    for a, e in zip(results[backend], results["reference"]):
        assert torch.equal(_bits(a), _bits(e))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_cuda_graph_replays_draw_fresh_bits(backend):
    """A captured step replayed twice from the same state and gradients rounds differently (the seed
    is drawn inside the graph), each time within one ulp."""
    p = torch.nn.Parameter(torch.ones(1 << 16, dtype=torch.bfloat16, device="cuda"))
    p.grad = torch.full_like(p, 0.5)
    opt = AdamW([p], lr=1e-3, weight_decay=0.0, backend=backend, capturable=True, bf16_stochastic_round=True,
                state_dtype=torch.bfloat16)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        opt.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    saved = ({k: v.clone() for k, v in opt.state[p].items()}, p.detach().clone())
    results = []
    for _ in range(2):
        for k, v in saved[0].items():
            opt.state[p][k].copy_(v)
        with torch.no_grad():
            p.copy_(saved[1])
        graph.replay()
        results.append(p.detach().clone())
    torch.cuda.synchronize()
    assert not torch.equal(results[0], results[1])
    assert (results[0].float() - results[1].float()).abs().max() <= 2**-7


def test_pure_bf16_bench_case_moves_14_bytes_per_param_and_runs():
    """`fusedreg bench adamw` case "pure bf16 + SR": its floor is 14 B/param (read p, g, m, v and write
    p, m, v in bfloat16), and every CPU implementation takes a step on a small GPT-2 parameter list."""
    from fusedreg.bench import registry
    from fusedreg.bench.adamw import _gpt2_numel

    (case,) = [c for c in registry.cases(["adamw"], "cpu") if c.name == "pure_bf16"]
    size = (1, 16, 64, 8)
    assert case.bytes_moved(size, torch.bfloat16) == 14 * _gpt2_numel(size)
    inputs = case.make(size, torch.bfloat16, "cpu")
    impls = case.impls_for("cpu", quick=True)
    assert "fusedreg[cpu] pure bf16 + SR" in impls and "torch AdamW(fused=True), fp32 params" in impls
    for impl in impls.values():
        impl.setup(inputs)()
