"""fusedreg.optim.AdamW against torch.optim.AdamW: trajectories on every backend and dtype, state
layout, checkpoints both ways, LR schedulers, GradScaler, max_grad_norm, torch's errors, hooks,
one launch per (device, dtype) group; no host sync and CUDA graphs on a GPU."""
import copy
import io
import re

import pytest
import torch

import fusedreg.optim.adamw as adamw_module
from conftest import TOLERANCES, native_backends
from fusedreg import _backend, _library
from fusedreg.optim import AdamW

PAIRS = ([("cpu", b) for b in ["reference"] + native_backends("cpu")]
         + [("cuda", b) for b in native_backends("cuda")])
SHAPES = [(7, 13), (13,), (3, 5, 7), (0,), ()]
STEPS = 12
# fp32: PyTorch computes the per-tensor scalars in Python floats, the kernels from float64 rows;
# what is left is float32 rounding of the elementwise math, over STEPS steps
FP32_TOL = dict(atol=1e-6, rtol=1e-5)


@pytest.fixture(autouse=True)
def _kernel_present(request):
    """Skip a (device, backend) pair whose adamw_step_ kernel is not written yet; a backend that is
    unavailable (e.g. its library fails to build) fails the test instead."""
    params = getattr(getattr(request.node, "callspec", None), "params", {})
    backend, device = params.get("backend"), params.get("device")
    if backend in (None, "reference"):
        return
    _backend.select(device, backend)  # builds / imports what the backend needs
    name = _library.qualname("adamw_step_", backend)
    if not torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA" if device == "cuda" else "CPU"):
        pytest.skip(f"{name} has no {device} kernel yet")


# ----------------------------------------------------------------------------- helpers

def _initial(dtype, device, shapes=SHAPES, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen).to(device=device, dtype=dtype) for s in shapes]


def _grads(step, params, seed=1):
    """Gradients for `step` (the same for every optimizer), None for some params on some steps."""
    gen = torch.Generator().manual_seed(seed * 1000 + step)
    grads = [torch.randn(p.shape, generator=gen, dtype=torch.complex64 if p.is_complex() else torch.float32)
             for p in params]
    return [None if (step + k) % 5 == 4 else g.to(device=p.device, dtype=p.dtype)
            for k, (g, p) in enumerate(zip(grads, params))]


def _split(params, options):
    """One param group per entry of `options`, params dealt round-robin."""
    n = len(options)
    return [dict(opts, params=params[k::n]) for k, opts in enumerate(options)]


def _train(runs, steps, start=0, grads_fn=_grads):
    """Give every (params, optimizer) of `runs` the same gradients and step it, `steps` times."""
    for k in range(start, start + steps):
        grads = grads_fn(k, runs[0][0])
        for params, opt in runs:
            for p, g in zip(params, grads):
                p.grad = None if g is None or not p.requires_grad else g.clone()
            opt.step()


def _pair(options, dtype, device, backend, torch_kwargs=None, ours_kwargs=None, shapes=SHAPES):
    """(torch params, torch.optim.AdamW(foreach=False), our params, AdamW) from the same start;
    `options()` builds fresh group options (so Tensor lrs are not shared); a frozen parameter
    rides along in the first group."""
    base = _initial(dtype, device, shapes)
    frozen_base = _initial(dtype, device, [(4, 3)], seed=9)[0]
    runs = []
    for make in (lambda g: torch.optim.AdamW(g, foreach=False, **(torch_kwargs or {})),
                 lambda g: AdamW(g, backend=backend, **(ours_kwargs or {}))):
        params = [torch.nn.Parameter(b.clone()) for b in base]
        frozen = torch.nn.Parameter(frozen_base.clone(), requires_grad=False)
        groups = _split(params, options())
        groups[0]["params"].append(frozen)
        runs.append((params + [frozen], make(groups)))
    return runs


def _assert_matches(runs, atol, rtol):
    (theirs, t_opt), (mine, m_opt) = runs
    for tp, mp in zip(theirs, mine):
        torch.testing.assert_close(mp.detach(), tp.detach(), atol=atol, rtol=rtol)
        ts, ms = t_opt.state.get(tp, {}), m_opt.state.get(mp, {})
        assert set(ms) == set(ts)
        if not ts:
            assert not mp.requires_grad  # only the frozen parameter never gets a step
            continue
        assert float(ms["step"]) == float(ts["step"])
        assert ms["step"].dtype == torch.float32 and ms["step"].device == mp.device
        assert ms["step"].dim() == 0
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            if key in ts:
                assert ms[key].dtype == mp.dtype and ms[key].device == mp.device
                torch.testing.assert_close(ms[key].to(ts[key].dtype), ts[key], atol=atol, rtol=rtol)


CONFIGS = {
    "default": lambda device: [{}],
    "lr": lambda device: [{"lr": 2e-2}],
    "no_weight_decay": lambda device: [{"weight_decay": 0.0, "lr": 1e-2}],
    "weight_decay": lambda device: [{"weight_decay": 0.3, "lr": 1e-2}],
    "maximize": lambda device: [{"maximize": True, "weight_decay": 0.1}],
    "amsgrad": lambda device: [{"amsgrad": True, "lr": 1e-2}],
    "amsgrad_maximize": lambda device: [{"amsgrad": True, "maximize": True, "lr": 1e-2}],
    "tensor_lr": lambda device: [{"lr": torch.tensor(1e-2, device=device)}],
    "tensor_betas": lambda device: [{"betas": (torch.tensor(0.8, device=device),
                                               torch.tensor(0.99, device=device))}],
    "groups": lambda device: [{"betas": (0.8, 0.99), "eps": 1e-6},
                              {"lr": torch.tensor(5e-3, device=device), "weight_decay": 0.0},
                              {"amsgrad": True, "weight_decay": 0.1, "lr": 2e-2}],
}


# ----------------------------------------------------------------------------- trajectories

@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("config", list(CONFIGS))
def test_fp32_matches_torch(device, backend, config):
    runs = _pair(lambda: CONFIGS[config](device), torch.float32, device, backend)
    _train(runs, STEPS)
    _assert_matches(runs, **FP32_TOL)


@pytest.mark.parametrize("device,backend", PAIRS)
def test_capturable_matches_torch(device, backend):
    """capturable=True builds the hyperparameter rows on the device every step (torch's own
    capturable path needs a GPU, so the comparison is with the plain one)."""
    options = lambda: [{"lr": torch.tensor(1e-2, device=device)}, {"amsgrad": True}]  # noqa: E731
    runs = _pair(options, torch.float32, device, backend, ours_kwargs={"capturable": True})
    _train(runs, STEPS)
    _assert_matches(runs, **FP32_TOL)


@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("amsgrad", [False, True])
def test_float64_matches_torch(device, backend, amsgrad):
    runs = _pair(lambda: [{"amsgrad": amsgrad, "lr": 1e-2, "weight_decay": 0.1}], torch.float64,
                 device, backend)
    _train(runs, STEPS)
    _assert_matches(runs, *TOLERANCES[torch.float64])


def _max_error(params, exact):
    return max((p.detach().float() - e.detach()).abs().max().item()
               for p, e in zip(params, exact) if e.numel())


@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("state_dtype", [None, torch.float32])
def test_low_precision_no_worse_than_twice_torch(device, backend, dtype, state_dtype):
    """Against the fp32 trajectory from the same rounded start and gradients, the error is at most
    twice PyTorch's own error on the low-precision parameters."""
    options = lambda: [{"lr": 1e-2}, {"lr": 1e-2, "amsgrad": True}]  # noqa: E731
    runs = _pair(options, dtype, device, backend, ours_kwargs={"state_dtype": state_dtype})
    exact = [torch.nn.Parameter(p.detach().float()) for p in runs[0][0]]
    _train(runs, STEPS)
    exact_opt = torch.optim.AdamW(_split(exact[:-1], options()), foreach=False)
    _train([(exact[:-1], exact_opt)], STEPS,
           grads_fn=lambda k, ps: [None if g is None else g.to(dtype).float()
                                   for g in _grads(k, runs[0][0][:-1])])
    torch_err, our_err = _max_error(runs[0][0], exact), _max_error(runs[1][0], exact)
    assert 0 < torch_err and our_err <= 2 * torch_err, (our_err, torch_err)
    for p in runs[1][0][:-1]:
        if p.numel():
            assert runs[1][1].state[p]["exp_avg"].dtype == (state_dtype or dtype)


@pytest.mark.parametrize("device,backend", [pair for pair in PAIRS if pair[1] != "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("state_dtype", [None, torch.float32])
def test_backend_matches_reference(device, backend, dtype, state_dtype):
    base = _initial(dtype, device)
    runs = []
    for name in ("reference", backend):
        params = [torch.nn.Parameter(b.clone()) for b in base]
        runs.append((params, AdamW(_split(params, [{"lr": 1e-2}, {"amsgrad": True, "maximize": True}]),
                                   backend=name, state_dtype=state_dtype)))
    _train(runs, STEPS)
    atol, rtol = TOLERANCES[dtype]
    for rp, bp in zip(runs[0][0], runs[1][0]):
        torch.testing.assert_close(bp.detach(), rp.detach(), atol=atol, rtol=rtol)


@pytest.mark.parametrize("device,backend", PAIRS)
def test_non_dense_and_relaid_out_params_match_torch(device, backend):
    """A sliced (non-dense) parameter is stepped through a dense copy; a transposed or
    channels_last one in place, with gradients given in another layout re-laid out."""
    def make():
        gen = torch.Generator().manual_seed(3)
        return [torch.nn.Parameter(torch.randn(6, 10, generator=gen).to(device)[:, ::3]),
                torch.nn.Parameter(torch.randn(5, 7, generator=gen).to(device).t()),
                torch.nn.Parameter(torch.randn(2, 3, 4, 5, generator=gen).to(device)
                                   .to(memory_format=torch.channels_last))]

    def grads(k, params):  # contiguous gradients whatever the parameter's layout
        gen = torch.Generator().manual_seed(100 + k)
        return [torch.randn(p.shape, generator=gen).to(device) for p in params]

    theirs, mine = make(), make()
    strides = [p.stride() for p in mine]
    ptrs = [p.data_ptr() for p in mine]
    runs = [(theirs, torch.optim.AdamW(theirs, lr=1e-2, foreach=False)),
            (mine, AdamW(mine, lr=1e-2, backend=backend))]
    _train(runs, STEPS, grads_fn=grads)
    for tp, mp, stride, ptr in zip(theirs, mine, strides, ptrs):
        assert mp.stride() == stride and mp.data_ptr() == ptr  # stepped in place
        torch.testing.assert_close(mp.detach(), tp.detach(), **FP32_TOL)


@pytest.mark.parametrize("device,backend", PAIRS)
def test_complex_params_match_torch(device, backend):
    runs = _pair(lambda: [{"lr": 1e-2}], torch.complex64, device, backend, shapes=[(5, 3), (4,)])
    _train(runs, STEPS)
    _assert_matches(runs, **FP32_TOL)


# ----------------------------------------------------------------------------- launches and caching

class _KernelSpy:
    """Records the arguments of every adamw_step_ call the optimizer makes."""

    def __init__(self, monkeypatch):
        self.calls = []
        real = adamw_module.kernel

        def spying(name, backend, reference):
            fn = real(name, backend, reference)
            return lambda *args: (self.calls.append(args), fn(*args))[1]
        monkeypatch.setattr(adamw_module, "kernel", spying)


def test_one_launch_per_device_dtype_group(monkeypatch):
    spy = _KernelSpy(monkeypatch)
    fp32 = [torch.nn.Parameter(torch.randn(s)) for s in [(3, 4), (5,), (2, 2), (0,), (7,)]]
    bf16 = [torch.nn.Parameter(torch.randn(s).bfloat16()) for s in [(6,), (3, 3)]]
    groups = [{"params": fp32[:2] + bf16[:1]}, {"params": fp32[2:4], "lr": 0.5, "eps": 1e-3},
              {"params": fp32[4:] + bf16[1:], "lr": 0.25, "betas": (0.5, 0.75), "weight_decay": 0.0}]
    opt = AdamW(groups, backend="reference")
    for p in fp32 + bf16:
        p.grad = torch.randn_like(p)
    opt.step()
    assert len(spy.calls) == 2
    by_dtype = {call[0][0].dtype: call for call in spy.calls}
    params, hparams = by_dtype[torch.float32][0], by_dtype[torch.float32][6]
    assert [p.shape for p in params] == [(3, 4), (5,), (2, 2), (7,)]  # zero-size left out
    assert hparams.dtype == torch.float64 and hparams.shape == (4, 5) and hparams.is_contiguous()
    assert hparams.tolist() == [[1e-3, 0.9, 0.999, 1e-2, 1e-8]] * 2 + [[0.5, 0.9, 0.999, 1e-2, 1e-3],
                                                                      [0.25, 0.5, 0.75, 0.0, 1e-8]]
    assert by_dtype[torch.bfloat16][6].tolist() == [[1e-3, 0.9, 0.999, 1e-2, 1e-8],
                                                    [0.25, 0.5, 0.75, 0.0, 1e-8]]
    assert float(opt.state[fp32[3]]["step"]) == 1.0  # the zero-size parameter counts its step


def test_state_dtype_makes_its_own_group(monkeypatch):
    spy = _KernelSpy(monkeypatch)
    params = [torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(5).bfloat16())]
    opt = AdamW(params, backend="reference", state_dtype=torch.float32)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    assert len(spy.calls) == 2
    assert {(c[0][0].dtype, c[2][0].dtype) for c in spy.calls} == {(torch.float32, torch.float32),
                                                                  (torch.bfloat16, torch.float32)}


def test_hparams_cached_until_a_value_changes(monkeypatch):
    spy = _KernelSpy(monkeypatch)
    params = [torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(3))]
    lr = torch.tensor(0.1)
    opt = AdamW([{"params": params[:1]}, {"params": params[1:], "lr": lr}], backend="reference")

    def step():
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
        return spy.calls[-1][6]

    first = step()
    assert step() is first  # nothing changed: no rebuild
    opt.param_groups[0]["lr"] = 0.02  # a float lr (what schedulers assign)
    second = step()
    assert second is not first and second[:, 0].tolist() == pytest.approx([0.02, 0.1])
    lr.fill_(0.3)  # a Tensor lr changed in place (what schedulers do to Tensor lrs)
    third = step()
    assert third is not second and third[:, 0].tolist() == pytest.approx([0.02, 0.3])
    opt.param_groups[0]["betas"] = (0.5, 0.999)  # OneCycleLR cycles beta1
    assert step()[:, 1].tolist() == [0.5, 0.9]
    params[0].grad = None  # a parameter without a gradient changes the rows too
    params[1].grad = torch.randn_like(params[1])
    opt.step()
    assert spy.calls[-1][6].shape == (1, 5) and spy.calls[-1][6][0, 0] == pytest.approx(0.3)


# ----------------------------------------------------------------------------- state and checkpoints

def _save_load(state_dict):
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


GROUPS = [{"lr": 1e-2}, {"amsgrad": True, "weight_decay": 0.1, "betas": (0.8, 0.99)}]


@pytest.mark.parametrize("device,backend", PAIRS)
def test_checkpoint_loads_into_torch_and_training_continues(device, backend):
    runs = _pair(lambda: GROUPS, torch.float32, device, backend)
    _train(runs[1:], 5)
    (mine, m_opt) = runs[1]
    theirs = [torch.nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad) for p in mine]
    t_groups = _split(theirs[:-1], GROUPS)
    t_groups[0]["params"].append(theirs[-1])
    t_opt = torch.optim.AdamW(t_groups, foreach=False)
    t_opt.load_state_dict(_save_load(m_opt.state_dict()))
    runs = [(theirs, t_opt), (mine, m_opt)]
    _train(runs, 7, start=5)
    _assert_matches(runs, **FP32_TOL)


@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("torch_mode", [{"foreach": False}, {"foreach": True}, {"fused": True}])
def test_torch_checkpoint_loads_and_training_continues(device, backend, torch_mode):
    base = _initial(torch.float32, device)
    theirs = [torch.nn.Parameter(b.clone()) for b in base]
    t_opt = torch.optim.AdamW(_split(theirs, GROUPS), **torch_mode)
    _train([(theirs, t_opt)], 5)
    mine = [torch.nn.Parameter(p.detach().clone()) for p in theirs]
    m_opt = AdamW(_split(mine, GROUPS), backend=backend)
    m_opt.load_state_dict(_save_load(t_opt.state_dict()))
    for p in mine:
        assert m_opt.state[p]["step"].device == p.device and m_opt.state[p]["step"].dtype == torch.float32
    reference = torch.optim.AdamW(_split(theirs, GROUPS), foreach=False)  # continue torch's run
    reference.load_state_dict(t_opt.state_dict())
    runs = [(theirs, reference), (mine, m_opt)]
    _train(runs, 7, start=5)
    _assert_matches(runs, **FP32_TOL)


@pytest.mark.parametrize("device,backend", PAIRS)
def test_float32_state_survives_a_checkpoint(device, backend):
    """fp32 moments of bf16 parameters reload bit for bit (not through the parameter dtype that
    torch's loading casts to); torch.optim.AdamW gets them in the parameter dtype."""
    params = [torch.nn.Parameter(torch.randn(7, 5, device=device).bfloat16())]
    opt = AdamW(params, backend=backend, state_dtype=torch.float32, amsgrad=True)
    _train([(params, opt)], 3)
    saved = _save_load(opt.state_dict())
    again = AdamW([torch.nn.Parameter(params[0].detach().clone())], backend=backend,
                  state_dtype=torch.float32, amsgrad=True)
    again.load_state_dict(saved)
    (s1,), (s2,) = opt.state.values(), again.state.values()
    for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
        assert s2[key].dtype == torch.float32 and torch.equal(s2[key], s1[key])
    into_torch = torch.optim.AdamW([torch.nn.Parameter(params[0].detach().clone())], amsgrad=True)
    into_torch.load_state_dict(saved)
    assert next(iter(into_torch.state.values()))["exp_avg"].dtype == torch.bfloat16


def test_state_dict_has_torchs_format():
    params = [torch.nn.Parameter(torch.randn(3))]
    mine, theirs = AdamW(params, backend="reference"), torch.optim.AdamW(params)
    for opt in (mine, theirs):
        params[0].grad = torch.ones(3)
        opt.step()
    m_sd, t_sd = mine.state_dict(), theirs.state_dict()
    assert set(m_sd["param_groups"][0]) == set(t_sd["param_groups"][0])
    assert set(m_sd["state"][0]) == set(t_sd["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}


def test_deepcopy_keeps_the_configuration():
    params = [torch.nn.Parameter(torch.randn(4))]
    opt = AdamW(params, backend="reference", max_grad_norm=0.5, state_dtype=torch.float32)
    _train([(params, opt)], 2)
    clone = copy.deepcopy(opt)
    assert (clone.max_grad_norm, clone.backend, clone.state_dtype) == (0.5, "reference", torch.float32)
    assert torch.equal(next(iter(clone.state.values()))["exp_avg"], opt.state[params[0]]["exp_avg"])


# ----------------------------------------------------------------------------- LR schedulers

SCHEDULERS = {
    "step": lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5),
    "onecycle": lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=STEPS),
}


@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
@pytest.mark.parametrize("tensor_lr", [False, True])
def test_lr_scheduler_trajectory_matches_torch(device, backend, scheduler, tensor_lr):
    lr = (lambda: torch.tensor(1e-2, device=device)) if tensor_lr else (lambda: 1e-2)
    runs = _pair(lambda: [{"lr": lr()}, {"lr": lr(), "amsgrad": True}], torch.float32, device, backend)
    schedulers = [SCHEDULERS[scheduler](opt) for _, opt in runs]
    for k in range(STEPS):
        _train(runs, 1, start=k)
        for s in schedulers:
            s.step()
    last_lrs = [[float(lr) for lr in s.get_last_lr()] for s in schedulers]
    assert last_lrs[1] == last_lrs[0]
    _assert_matches(runs, **FP32_TOL)


# ----------------------------------------------------------------------------- GradScaler, clipping

def _model(device, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).to(device)


def _loss(model, k, device, overflow_steps=()):
    gen = torch.Generator().manual_seed(k)
    x, y = torch.randn(4, 5, generator=gen).to(device), torch.randn(4, 3, generator=gen).to(device)
    loss = torch.nn.functional.mse_loss(model(x), y)
    return loss * float("inf") if k in overflow_steps else loss


def _scaler(device):
    return torch.amp.GradScaler(device, init_scale=2.0 ** 12, growth_interval=3)


@pytest.mark.parametrize("device,backend", PAIRS)
def test_grad_scaler_matches_torch(device, backend):
    """GradScaler hands grad_scale/found_inf to the optimizer: unscaled in the kernel, the step
    (count included) skipped on overflow; the same trajectory and scales as torch + GradScaler."""
    overflow = (2, 7)
    t_model, m_model = _model(device), _model(device)
    t_opt = torch.optim.AdamW(t_model.parameters(), lr=1e-2, foreach=False)
    m_opt = AdamW(m_model.parameters(), lr=1e-2, backend=backend)
    scalers = [_scaler(device), _scaler(device)]
    for k in range(STEPS):
        for model, opt, scaler in zip((t_model, m_model), (t_opt, m_opt), scalers):
            opt.zero_grad()
            scaler.scale(_loss(model, k, device, overflow)).backward()
            scaler.step(opt)
            scaler.update()
        assert scalers[1].get_scale() == scalers[0].get_scale()
    for tp, mp in zip(t_model.parameters(), m_model.parameters()):
        torch.testing.assert_close(mp, tp, **FP32_TOL)
        assert float(m_opt.state[mp]["step"]) == float(t_opt.state[tp]["step"]) == STEPS - len(overflow)


@pytest.mark.parametrize("device,backend", PAIRS)
def test_grad_scale_and_found_inf_as_keywords(device, backend):
    base = _initial(torch.float32, device, [(4, 3), (5,)])
    plain, scaled = ([torch.nn.Parameter(b.clone()) for b in base] for _ in range(2))
    opts = AdamW(plain, backend=backend), AdamW(scaled, backend=backend)
    scale = torch.tensor([256.0], device=device)
    for k in range(3):
        grads = [torch.randn_like(b) for b in base]
        for p, q, g in zip(plain, scaled, grads):
            p.grad, q.grad = g.clone(), g * 256
        opts[0].step()
        opts[1].step(grad_scale=scale, found_inf=torch.zeros(1, device=device))
    before = [p.detach().clone() for p in scaled]
    opts[1].step(grad_scale=scale, found_inf=torch.ones(1, device=device))
    for p, q, b in zip(plain, scaled, before):
        torch.testing.assert_close(q, p, **FP32_TOL)
        assert torch.equal(q.detach(), b) and float(opts[1].state[q]["step"]) == 3


@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("amsgrad", [False, True])
def test_max_grad_norm_matches_clip_grad_norm_then_step(device, backend, amsgrad):
    max_norm = 0.7
    runs = _pair(lambda: [{"lr": 1e-2, "amsgrad": amsgrad}], torch.float32, device, backend,
                 ours_kwargs={"max_grad_norm": max_norm})
    (theirs, t_opt), (mine, m_opt) = runs
    clipped_steps = 0
    for k in range(STEPS):
        factor = 0.05 if k % 3 == 0 else 1.0  # some steps are under the threshold
        grads = [None if g is None else g * factor for g in _grads(k, theirs)]
        for params in (theirs, mine):
            for p, g in zip(params, grads):
                p.grad = None if g is None or not p.requires_grad else g.clone()
        norm = torch.nn.utils.clip_grad_norm_(theirs, max_norm, foreach=False)
        clipped_steps += bool(norm > max_norm)
        t_opt.step()
        m_opt.step()
        torch.testing.assert_close(m_opt.last_grad_norm, norm, atol=1e-6, rtol=1e-5)
    assert 0 < clipped_steps < STEPS
    _assert_matches(runs, **FP32_TOL)


@pytest.mark.parametrize("device,backend", PAIRS)
def test_max_grad_norm_with_grad_scaler(device, backend):
    """The norm is of the unscaled gradients (no unscale_ pass needed); overflow skips the step."""
    max_norm, overflow = 0.3, (4,)
    t_model, m_model = _model(device), _model(device)
    t_opt = torch.optim.AdamW(t_model.parameters(), lr=1e-2, foreach=False)
    m_opt = AdamW(m_model.parameters(), lr=1e-2, backend=backend, max_grad_norm=max_norm)
    t_scaler, m_scaler = _scaler(device), _scaler(device)
    for k in range(STEPS):
        t_opt.zero_grad()
        t_scaler.scale(_loss(t_model, k, device, overflow)).backward()
        t_scaler.unscale_(t_opt)
        norm = torch.nn.utils.clip_grad_norm_(t_model.parameters(), max_norm, foreach=False)
        t_scaler.step(t_opt)
        t_scaler.update()
        m_opt.zero_grad()
        m_scaler.scale(_loss(m_model, k, device, overflow)).backward()
        m_scaler.step(m_opt)
        m_scaler.update()
        assert m_scaler.get_scale() == t_scaler.get_scale()
        if k not in overflow:
            torch.testing.assert_close(m_opt.last_grad_norm, norm, atol=1e-6, rtol=1e-5)
    for tp, mp in zip(t_model.parameters(), m_model.parameters()):
        torch.testing.assert_close(mp, tp, **FP32_TOL)
        assert float(m_opt.state[mp]["step"]) == STEPS - len(overflow)


@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("bad", [float("inf"), float("nan"), 1e30])
def test_non_finite_norm_skips_the_step(device, backend, bad):
    """Also when GradScaler saw no overflow: finite gradients whose squared norm overflows."""
    params = [torch.nn.Parameter(torch.randn(4, 3, device=device)),
              torch.nn.Parameter(torch.randn(5, device=device))]
    opt = AdamW(params, backend=backend, max_grad_norm=1.0, amsgrad=True)
    _train([(params, opt)], 2, grads_fn=lambda k, ps: [torch.randn_like(p) for p in ps])
    before = [p.detach().clone() for p in params]
    state_before = copy.deepcopy(opt.state_dict()["state"])
    params[0].grad = torch.randn_like(params[0])
    params[0].grad[1, 2] = bad
    params[1].grad = torch.randn_like(params[1])
    no_overflow = torch.zeros(1, device=device)
    opt.step(grad_scale=torch.ones(1, device=device), found_inf=no_overflow)
    assert not torch.isfinite(opt.last_grad_norm) and not no_overflow.any()
    for p, b in zip(params, before):
        assert torch.equal(p.detach(), b)
    for i, saved in state_before.items():
        for key, value in saved.items():
            assert torch.equal(opt.state_dict()["state"][i][key], value), key


@pytest.mark.parametrize("device,backend", PAIRS)
def test_low_precision_grad_norm_is_float32(device, backend):
    """The clip coefficient comes from a float32 norm of bfloat16 gradients (torch's
    clip_grad_norm_ would round the norm to bfloat16)."""
    params = [torch.nn.Parameter(torch.randn(s, device=device).bfloat16()) for s in [(37, 11), (5,)]]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = AdamW(params, backend=backend, max_grad_norm=0.5)
    opt.step()
    exact = torch.cat([p.grad.double().flatten() for p in params]).norm()
    assert opt.last_grad_norm.dtype == torch.float32
    assert abs(opt.last_grad_norm.double().item() - exact.item()) <= 1e-6 * exact.item()


# ----------------------------------------------------------------------------- torch.optim behaviour

def _torch_error(**kwargs):
    with pytest.raises(Exception) as caught:
        torch.optim.AdamW([torch.nn.Parameter(torch.randn(2))], **kwargs)
    return caught.value


@pytest.mark.parametrize("kwargs", [
    dict(lr=-1e-3), dict(eps=-1.0), dict(betas=(1.0, 0.999)), dict(betas=(0.9, -0.1)),
    dict(weight_decay=-0.1), dict(betas=(0, 0.999)), dict(betas=(torch.tensor(0.9), 0.999)),
    dict(lr=torch.tensor([1e-3, 1e-3])), dict(betas=(torch.tensor([0.9, 0.9]), torch.tensor(0.99))),
    dict(lr=torch.tensor(1e-3), foreach=True), dict(fused=True, foreach=True),
], ids=lambda kw: ",".join(kw))
def test_bad_hyperparameters_raise_like_torch(kwargs):
    expected = _torch_error(**kwargs)
    with pytest.raises(type(expected), match=re.escape(str(expected))):
        AdamW([torch.nn.Parameter(torch.randn(2))], **kwargs)


def test_sparse_gradient_raises_like_torch():
    errors = []
    for make in (lambda ps: torch.optim.AdamW(ps), lambda ps: AdamW(ps, backend="reference")):
        p = torch.nn.Parameter(torch.randn(4, 3))
        p.grad = torch.randn(4, 3).to_sparse()
        with pytest.raises(RuntimeError) as caught:
            make([p]).step()
        errors.append(str(caught.value))
    assert errors[0] == errors[1]


def test_unsupported_arguments_are_rejected_clearly():
    p = torch.nn.Parameter(torch.randn(2))
    with pytest.raises(RuntimeError, match="differentiable=True"):
        AdamW([p], differentiable=True)
    opt = AdamW([p])
    with pytest.raises(RuntimeError, match="differentiable=True"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(2))], "differentiable": True})
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="max_grad_norm"):
            AdamW([p], max_grad_norm=bad)
    for bad in (torch.int32, torch.float64, torch.float16, "float32"):  # bfloat16 is a valid one
        with pytest.raises(ValueError, match="state_dtype"):
            AdamW([p], state_dtype=bad)
    with pytest.raises(ValueError, match="backend"):
        AdamW([p], backend="nope")
    AdamW([p], foreach=True)  # accepted for compatibility
    AdamW([p], fused=True)


@pytest.mark.parametrize("device,backend", PAIRS)
def test_hooks_zero_grad_and_closure(device, backend):
    model = _model(device)
    opt = AdamW(model.parameters(), lr=1e-2, backend=backend)
    seen = []
    opt.register_step_pre_hook(lambda o, args, kwargs: seen.append(("pre", kwargs.get("grad_scale"))))
    opt.register_step_post_hook(lambda o, args, kwargs: seen.append(("post", None)))

    def closure():
        assert torch.is_grad_enabled()
        opt.zero_grad()
        loss = _loss(model, 0, device)
        loss.backward()
        return loss

    with torch.no_grad():
        loss = opt.step(closure)
    assert loss.requires_grad and seen == [("pre", None), ("post", None)]
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    closure()
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())
    assert opt.step() is None  # zero gradients still step (weight decay) and count
    assert all(float(opt.state[p]["step"]) == 2 for p in model.parameters())


# ----------------------------------------------------------------------------- GPU only

CUDA_BACKENDS = ["reference"] + native_backends("cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("capturable", [False, True])
def test_no_host_sync(backend, capturable):
    model = _model("cuda")
    opt = AdamW(model.parameters(), lr=torch.tensor(1e-2, device="cuda"), backend=backend,
                capturable=capturable, max_grad_norm=0.5, amsgrad=True)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    scaler = _scaler("cuda")
    _loss(model, 0, "cuda").backward()
    opt.step()  # first use: builds libraries, creates state
    torch.cuda.synchronize()
    for k in range(4):
        opt.zero_grad()
        scaler.scale(_loss(model, k, "cuda", overflow_steps=(2,))).backward()
        torch.cuda.set_sync_debug_mode("error")
        try:
            scaler.step(opt)
            scaler.update()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        scheduler.step()  # changes the Tensor lr in place: picked up without a sync
    assert all(float(opt.state[p]["step"]) == 4 for p in model.parameters())  # 5 steps, 1 overflow
    assert float(opt.param_groups[0]["lr"]) == pytest.approx(2.5e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_cuda_graph_replay_matches_eager(backend):
    """A captured step replayed on new gradients (and a Tensor lr changed between replays) gives
    the eager trajectory."""
    base = _initial(torch.float32, "cuda", [(33, 7), (129,), (5, 3, 2)])
    graphed, eager = ([torch.nn.Parameter(b.clone()) for b in base] for _ in range(2))
    lrs = [torch.tensor(1e-2, device="cuda") for _ in range(2)]
    g_opt = AdamW(graphed, lr=lrs[0], backend=backend, capturable=True, amsgrad=True, max_grad_norm=2.0)
    e_opt = AdamW(eager, lr=lrs[1], backend=backend, amsgrad=True, max_grad_norm=2.0)
    static_grads = [torch.zeros_like(p) for p in graphed]
    for p, g in zip(graphed, static_grads):
        p.grad = g

    def feed(k):
        grads = [torch.randn(p.shape, generator=torch.Generator().manual_seed(k * 10 + i)).cuda()
                 for i, p in enumerate(base)]
        for g, s, p in zip(grads, static_grads, eager):
            s.copy_(g)
            p.grad = g.clone()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for k in range(3):
            feed(k)
            g_opt.step()
            e_opt.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        g_opt.step()
    for k in range(3, 9):
        feed(k)
        if k == 6:
            for lr in lrs:
                lr.fill_(3e-3)
        graph.replay()
        e_opt.step()
    torch.cuda.synchronize()
    for gp, ep in zip(graphed, eager):
        torch.testing.assert_close(gp, ep, **FP32_TOL)
        assert float(g_opt.state[gp]["step"]) == float(e_opt.state[ep]["step"]) == 9


@pytest.mark.gpu
def test_capture_needs_capturable():
    p = torch.nn.Parameter(torch.randn(8, device="cuda"))
    p.grad = torch.randn_like(p)
    opt = AdamW([p], backend="reference")
    opt.step()
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="capturable is False"):
        with torch.cuda.graph(graph):
            opt.step()


@pytest.mark.parametrize("device,backend", PAIRS)
def test_grad_with_other_strides_on_size_one_dims(device, backend):
    """p of shape [1, 8] (strides (8, 1)) with a contiguous grad of strides (1, 1), as autograd
    leaves it for a transposed [8, 1] result: steps like torch.optim.AdamW."""
    torch.manual_seed(0)
    ours = torch.nn.Parameter(torch.randn(1, 8, device=device))
    theirs = torch.nn.Parameter(ours.detach().clone())
    opt_ours = AdamW([ours], lr=1e-2, max_grad_norm=0.5, backend=backend)
    opt_theirs = torch.optim.AdamW([theirs], lr=1e-2)
    for _ in range(3):
        grad = torch.randn(8, 1, device=device).t()
        assert grad.stride() == (1, 1) and grad.is_contiguous()
        ours.grad = grad
        theirs.grad = grad.clone()
        opt_ours.step()
        torch.nn.utils.clip_grad_norm_([theirs], 0.5)
        opt_theirs.step()
    torch.testing.assert_close(ours, theirs, **FP32_TOL)


def test_same_layout_ignores_strides_of_size_one_dims():
    from fusedreg._layout import same_layout

    p = torch.empty(1, 8)
    assert same_layout(torch.empty(8, 1).t(), p)                      # (1, 1) vs (8, 1)
    assert same_layout(torch.empty(5, 3).unsqueeze(1), torch.empty(5, 1, 3))
    assert not same_layout(torch.empty(8, 3).t(), torch.empty(3, 8))  # a real transpose
    assert not same_layout(torch.empty(8), p)                         # other sizes


def test_duplicate_parameters_in_a_group_are_refused():
    """torch warns (and will raise); one fused step would update the tensor from two places."""
    p, q = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match=r"duplicate parameters \(params\[0\] and params\[2\]"):
        AdamW([p, q, p])
    opt = AdamW([p])
    with pytest.raises(ValueError, match="duplicate parameters"):
        opt.add_param_group({"params": [q, q], "lr": 1e-2})
    with pytest.raises(ValueError, match="more than one parameter group"):  # torch's own check
        opt.add_param_group({"params": [p]})
    assert len(opt.param_groups) == 1


class _capturing:
    """Makes AdamW see a CUDA-graph capture in progress (CPU tensors: the logic, not a graph)."""

    def __enter__(self):
        self.patch = pytest.MonkeyPatch()
        self.patch.setattr(torch.cuda, "is_initialized", lambda: True)
        self.patch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)

    def __exit__(self, *exc):
        self.patch.undo()


def test_first_step_inside_capture_is_refused():
    """State created during capture would be zero-filled again by every replay."""
    p = torch.nn.Parameter(torch.randn(5))
    p.grad = torch.randn(5)
    opt = AdamW([p], capturable=True, backend="reference")
    before = p.detach().clone()
    with _capturing(), pytest.raises(RuntimeError, match=r"run step\(\) eagerly at least once"):
        opt.step()
    assert torch.equal(p, before) and not opt.state[p]


def test_hyperparameter_rows_are_not_shared_with_a_capture(monkeypatch):
    """Rows built while capturing hold nothing until a replay, and rows cached eagerly may be freed
    while a graph still reads them: a captured step builds its own and caches nothing."""
    calls = []
    real_kernel = adamw_module.kernel

    def spy(name, backend, reference):
        op = real_kernel(name, backend, reference)

        def run(*args):
            calls.append(args[6])  # hparams
            return op(*args)
        return run

    monkeypatch.setattr(adamw_module, "kernel", spy)
    p = torch.nn.Parameter(torch.randn(5))
    opt = AdamW([p], lr=1e-3, capturable=True, backend="reference")
    for captured in (False, True, False, True):
        p.grad = torch.randn(5)
        if captured:
            with _capturing():
                opt.step()
        else:
            opt.step()
        if len(calls) == 2:
            opt.param_groups[0]["lr"] = 2e-3
    eager_1, captured_1, eager_2, captured_2 = calls
    assert captured_1 is not eager_1 and captured_2 is not eager_2 and eager_2 is not captured_1
    expected = torch.tensor([[2e-3, 0.9, 0.999, 1e-2, 1e-8]], dtype=torch.float64)
    torch.testing.assert_close(eager_2, expected)
    torch.testing.assert_close(captured_2, expected)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_cuda_first_step_inside_capture_is_refused(backend):
    p = torch.nn.Parameter(torch.randn(8, device="cuda"))
    p.grad = torch.randn_like(p)
    opt = AdamW([p], capturable=True, backend=backend)
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match=r"run step\(\) eagerly at least once"):
        with torch.cuda.graph(graph):
            opt.step()


@pytest.mark.gpu
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_cuda_eager_step_after_capture_reads_its_own_rows(backend):
    """A float lr changed between warm-up and capture makes the captured step build new rows. An
    eager step before any replay must not read those (unwritten until a replay), and the graph
    keeps its own rows whatever the eager steps cache."""
    torch.manual_seed(0)
    ours = torch.nn.Parameter(torch.randn(4099, device="cuda"))
    theirs = torch.nn.Parameter(ours.detach().clone())
    opt = AdamW([ours], lr=1e-3, capturable=True, backend=backend)
    ref = torch.optim.AdamW([theirs], lr=1e-3)
    static_grad = torch.zeros_like(ours)
    ours.grad = static_grad
    grads = [torch.randn_like(ours) for _ in range(4)]

    def eager(k, lr):
        static_grad.copy_(grads[k])
        opt.param_groups[0]["lr"] = lr
        opt.step()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        eager(0, 1e-3)
    torch.cuda.current_stream().wait_stream(side)
    opt.param_groups[0]["lr"] = 2e-3
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    eager(1, 2e-3)            # before any replay
    eager(2, 5e-3)            # replaces the eager cache entry
    static_grad.copy_(grads[3])
    graph.replay()            # still lr 2e-3
    for k, lr in enumerate([1e-3, 2e-3, 5e-3, 2e-3]):
        ref.param_groups[0]["lr"] = lr
        theirs.grad = grads[k].clone()
        ref.step()
    torch.testing.assert_close(ours, theirs, **FP32_TOL)
