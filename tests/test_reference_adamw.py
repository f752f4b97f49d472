"""fusedreg.reference.adamw against torch.optim.AdamW trajectories."""
import pytest
import torch

from conftest import TOLERANCES
from fusedreg.reference.adamw import adamw_step_

SHAPES = [(7, 13), (13,), (3, 5, 7), (0,), ()]
STEPS = 12


class ReferenceAdamW:
    """The smallest optimizer around adamw_step_: torch-style param groups and state, steps counted
    here, parameters without a gradient skipped (their step count does not advance)."""

    def __init__(self, param_groups):
        self.param_groups = param_groups
        self.state = {}

    def _state(self, p, amsgrad):
        if p not in self.state:
            self.state[p] = {
                "step": torch.tensor(0.0),
                "exp_avg": torch.zeros_like(p),
                "exp_avg_sq": torch.zeros_like(p),
                "max_exp_avg_sq": torch.zeros_like(p) if amsgrad else None,
            }
        return self.state[p]

    @torch.no_grad()
    def step(self, grad_scale=None, found_inf=None, clip_coef=None):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            states = [self._state(p, group["amsgrad"]) for p in params]
            for s in states:
                s["step"] += 1
            beta1, beta2 = group["betas"]
            row = [group["lr"], beta1, beta2, group["weight_decay"], group["eps"]]
            hparams = torch.tensor([row] * len(params), dtype=torch.float64)
            adamw_step_(params, [p.grad for p in params], [s["exp_avg"] for s in states],
                        [s["exp_avg_sq"] for s in states],
                        [s["max_exp_avg_sq"] for s in states] if group["amsgrad"] else [],
                        [s["step"] for s in states], hparams, group["amsgrad"], group["maximize"],
                        grad_scale, found_inf, clip_coef)


def _groups(params, group_options):
    """Split `params` round-robin into one group per entry of `group_options`."""
    n = len(group_options)
    return [dict(opts, params=params[k::n]) for k, opts in enumerate(group_options)]


def _fill_defaults(groups):
    defaults = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False,
                    maximize=False)
    return [dict(defaults, **g) for g in groups]


def _make_params(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen).to(dtype) for s in SHAPES]


def _grads(step, n_params, seed=1):
    """Per-step gradients (float32), None for some params on some steps."""
    gen = torch.Generator().manual_seed(seed * 1000 + step)
    grads = [torch.randn(s, generator=gen) for s in SHAPES[:n_params]]
    return [None if (step + k) % 5 == 4 else g for k, g in enumerate(grads)]


def _run_pair(group_options, dtype=torch.float32):
    """Run torch.optim.AdamW(foreach=False) and ReferenceAdamW on identical params and grads."""
    base = _make_params(dtype)
    torch_params = [torch.nn.Parameter(b.clone()) for b in base]
    ref_params = [b.clone() for b in base]
    torch_groups = _groups(torch_params, group_options)
    torch_opt = torch.optim.AdamW(torch_groups, foreach=False)
    ref_opt = ReferenceAdamW(_fill_defaults(_groups(ref_params, group_options)))
    for k in range(STEPS):
        for tp, rp, g in zip(torch_params, ref_params, _grads(k, len(base))):
            g = None if g is None else g.to(dtype)
            tp.grad = None if g is None else g.clone()
            rp.grad = None if g is None else g.clone()
        torch_opt.step()
        ref_opt.step()
    return torch_params, torch_opt, ref_params, ref_opt


def _assert_match(torch_params, torch_opt, ref_params, ref_opt, atol, rtol):
    """Parameters, step counts and moments agree (every param has had a gradient by now)."""
    for tp, rp in zip(torch_params, ref_params):
        torch.testing.assert_close(rp, tp.detach(), atol=atol, rtol=rtol)
        ts, rs = torch_opt.state[tp], ref_opt.state[rp]
        assert float(rs["step"]) == float(ts["step"]) < STEPS
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            if key in ts:
                torch.testing.assert_close(rs[key], ts[key], atol=atol, rtol=rtol)


# fp32: same operations in the same order as PyTorch's single-tensor path; what remains is where
# PyTorch's vectorized kernels fuse or reorder a multiply-add (an ulp or so per step)
FP32_TOL = dict(atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("group_options", [
    [{}],
    [{"lr": 3e-2}],
    [{"lr": 1e-4, "weight_decay": 0.0}],
    [{"weight_decay": 0.3}],
    [{"maximize": True}],
    [{"amsgrad": True}],
    [{"amsgrad": True, "maximize": True, "lr": 1e-2}],
    [{"betas": (0.8, 0.99), "eps": 1e-6}, {"lr": 5e-3, "weight_decay": 0.0},
     {"amsgrad": True, "weight_decay": 0.1, "lr": 2e-2}],
], ids=["default", "lr", "no_wd", "wd", "maximize", "amsgrad", "amsgrad_maximize", "groups"])
def test_fp32_matches_torch(group_options):
    _assert_match(*_run_pair(group_options), **FP32_TOL)


# float64 parameters: all math in float64, like PyTorch's, with hyperparameters float32 cannot hold
# (float64 hparams keep them exact)
F64_OPTIONS = {"lr": 3e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.1}


@pytest.mark.parametrize("amsgrad", [False, True])
def test_float64_matches_torch(amsgrad):
    _assert_match(*_run_pair([dict(F64_OPTIONS, amsgrad=amsgrad)], dtype=torch.float64),
                  *TOLERANCES[torch.float64])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lr", [1e-3, 3e-2])
def test_low_precision_no_worse_than_twice_torch(dtype, lr):
    """Error against the fp32 trajectory (from the same rounded start and gradients) is at most
    twice PyTorch's own error on the low-precision parameters."""
    options = [{"lr": lr, "amsgrad": False}, {"lr": lr, "amsgrad": True}]
    torch_params, torch_opt, ref_params, _ = _run_pair(options, dtype=dtype)
    exact = [torch.nn.Parameter(b.float()) for b in _make_params(dtype)]
    exact_opt = torch.optim.AdamW(_groups(exact, options), foreach=False)
    for k in range(STEPS):
        for p, g in zip(exact, _grads(k, len(exact))):
            p.grad = None if g is None else g.to(dtype).float()
        exact_opt.step()
    torch_err = max((tp.detach().float() - e.detach()).abs().max().item()
                    for tp, e in zip(torch_params, exact) if e.numel())
    ref_err = max((rp.float() - e.detach()).abs().max().item()
                  for rp, e in zip(ref_params, exact) if e.numel())
    assert torch_err > 0
    assert ref_err <= 2 * torch_err, (ref_err, torch_err)


def _one_step_inputs(amsgrad=True, seed=3):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(7, 3), (13,)]
    params = [torch.randn(s, generator=gen) for s in shapes]
    grads = [torch.randn(s, generator=gen) for s in shapes]
    exp_avgs = [torch.randn(s, generator=gen) * 0.1 for s in shapes]
    exp_avg_sqs = [torch.rand(s, generator=gen) * 0.01 for s in shapes]
    max_sqs = [v + torch.rand(v.shape, generator=gen) * 0.01 for v in exp_avg_sqs]
    max_sqs = max_sqs if amsgrad else []
    steps = [torch.tensor(4.0), torch.tensor(9.0)]
    hparams = torch.tensor([[1e-2, 0.9, 0.999, 0.1, 1e-8], [3e-3, 0.8, 0.99, 0.0, 1e-6]],
                           dtype=torch.float64)
    return params, grads, exp_avgs, exp_avg_sqs, max_sqs, steps, hparams


def _stepped(inputs, amsgrad=True, maximize=False, grad_scale=None, found_inf=None, clip_coef=None):
    params, grads, m, v, vmax, steps, hparams = [
        [t.clone() for t in x] if isinstance(x, list) else x.clone() for x in inputs]
    adamw_step_(params, grads, m, v, vmax, steps, hparams, amsgrad, maximize, grad_scale,
                found_inf, clip_coef)
    return params + m + v + vmax


def _assert_all_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_per_tensor_hyperparameters_and_steps():
    """Each row of hparams and each step applies to its own tensor only."""
    inputs = _one_step_inputs()
    together = _stepped(inputs)
    params, grads, m, v, vmax, steps, hparams = inputs
    for i in range(2):
        alone = _stepped(([params[i]], [grads[i]], [m[i]], [v[i]], [vmax[i]], [steps[i]],
                          hparams[i:i + 1]))
        _assert_all_equal(alone, together[i::2])


def test_grad_scale_divides_grads():
    inputs = _one_step_inputs()
    scaled = list(inputs)
    scaled[1] = [g * 1024 for g in inputs[1]]  # a power of two: unscaling is exact
    _assert_all_equal(_stepped(scaled, grad_scale=torch.tensor(1024.0)), _stepped(inputs))
    _assert_all_equal(_stepped(scaled, grad_scale=torch.tensor([1024.0]),
                               found_inf=torch.tensor([0.0])), _stepped(inputs))


def test_clip_coef_multiplies_grads():
    inputs = _one_step_inputs()
    coef = torch.tensor(0.37)
    clipped = list(inputs)
    clipped[1] = [g * coef for g in inputs[1]]
    _assert_all_equal(_stepped(inputs, clip_coef=coef), _stepped(clipped))
    assert not torch.equal(_stepped(inputs, clip_coef=coef)[0], _stepped(inputs)[0])


def test_found_inf_changes_nothing():
    inputs = _one_step_inputs()
    before = _stepped(inputs, found_inf=torch.tensor(1.0), grad_scale=torch.tensor(2.0))
    params, _, m, v, vmax, _, _ = inputs
    _assert_all_equal(before, params + m + v + vmax)
    # the no-op must hold even when the grads it skips are not finite
    inputs[1][0][0, 0] = float("inf")
    inputs[1][1][3] = float("nan")
    _assert_all_equal(_stepped(inputs, found_inf=torch.tensor([1.0])), params + m + v + vmax)


def test_grad_scaler_semantics_match_torch_fused():
    """Same inputs as torch's fused AdamW gets from GradScaler (its grad_scale/found_inf)."""
    gen = torch.Generator().manual_seed(5)
    base = [torch.randn(s, generator=gen) for s in [(7, 13), (3,)]]
    torch_params = [torch.nn.Parameter(b.clone()) for b in base]
    ref_params = [b.clone() for b in base]
    torch_opt = torch.optim.AdamW(torch_params, lr=1e-2, fused=True)
    ref_opt = ReferenceAdamW(_fill_defaults([{"params": ref_params, "lr": 1e-2}]))
    scale = torch.tensor(256.0)
    for k in range(6):
        found_inf = torch.tensor(float(k == 2))
        grads = [torch.randn(b.shape, generator=gen) * scale for b in base]
        for tp, rp, g in zip(torch_params, ref_params, grads):
            tp.grad, rp.grad = g.clone(), g.clone()
        torch_opt.grad_scale, torch_opt.found_inf = scale, found_inf
        torch_opt.step()
        before = [p.clone() for p in ref_params]
        ref_opt.step(grad_scale=scale, found_inf=found_inf)
        if k == 2:
            _assert_all_equal(ref_params, before)
            for p in ref_params:  # the optimizer, not the kernel, takes the step count back
                ref_opt.state[p]["step"] -= 1
    for tp, rp in zip(torch_params, ref_params):
        torch.testing.assert_close(rp, tp.detach(), **FP32_TOL)
        assert float(ref_opt.state[rp]["step"]) == float(torch_opt.state[tp]["step"]) == 5


def test_amsgrad_keeps_the_maximum():
    inputs = _one_step_inputs()
    out = _stepped(inputs)
    v_new, vmax_new = out[4:6], out[6:8]
    for vm_old, v, vm in zip(inputs[4], v_new, vmax_new):
        assert torch.equal(vm, torch.maximum(vm_old, v))
        assert (vm > v).any()  # the previous maximum still wins somewhere


def test_states_keep_their_dtype_and_layout():
    p = torch.randn(3, 7, 5, 2).to(memory_format=torch.channels_last).to(torch.bfloat16)
    g = torch.randn_like(p)
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    ptr = p.data_ptr()
    hparams = torch.tensor([[1e-2, 0.9, 0.999, 0.0, 1e-8]], dtype=torch.float64)
    adamw_step_([p], [g], [m], [v], [], [torch.tensor(1.0)], hparams, False, False,
                None, None, None)
    assert p.data_ptr() == ptr and p.dtype == torch.bfloat16
    assert p.is_contiguous(memory_format=torch.channels_last)
    # first step from zero: m = (1 - beta1) * g, rounded once to bfloat16
    torch.testing.assert_close(m.float(), 0.1 * g.float(), atol=0, rtol=8e-3)
