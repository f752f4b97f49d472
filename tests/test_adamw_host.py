"""fusedreg.optim.AdamW's step plan (fusedreg/optim/_adamw_plan.py): steps after the first reuse its
bucketing, hyperparameter rows and op lookups; hyperparameters changed between steps (schedulers,
edits) and the backend choice are followed, giving torch.optim.AdamW's trajectory and, bitwise, that
of steps taken without a plan; the plan keeps no tensor alive. Structure, state and `.data` changes:
tests/test_adamw_host_changes.py."""
import weakref

import pytest
import torch

import fusedreg
import fusedreg.optim.adamw as adamw_module
from adamw_runs import BACKEND, Runs, count_full_steps, make_params, one_group, two_groups
from conftest import native_backends
from fusedreg.optim import AdamW

BACKENDS = ["reference"] + native_backends("cpu")


@pytest.fixture
def full_steps(monkeypatch):
    return count_full_steps(monkeypatch)


# ----------------------------------------------------------------------------- the plan is used

@pytest.mark.parametrize("backend", BACKENDS)
def test_unchanged_steps_reuse_bucketing_rows_and_ops(backend, full_steps, monkeypatch):
    lookups, rows = [], []
    real_kernel = adamw_module.kernel

    def spy(name, chosen, reference):
        lookups.append(chosen)
        op = real_kernel(name, chosen, reference)
        return lambda *args: (rows.append(args[6]), op(*args))[1]
    monkeypatch.setattr(adamw_module, "kernel", spy)
    runs = Runs(two_groups, backend=backend)
    runs.step(6)
    runs.check()
    mine = runs.opts[1]
    assert full_steps.count(mine) == 1 and full_steps.count(runs.opts[2]) == 6
    # one bucket (float32, amsgrad) per group: looked up on the first step only, rows built once
    assert lookups[:2] == [backend, backend] and len(lookups) == 2 + 2 * 6
    mine_rows = rows[0::4] + rows[1::4]  # per step: ours (2 buckets), then the one without a plan (2)
    assert len(mine_rows) == 12 and len({id(r) for r in mine_rows}) == 2


def test_plan_keeps_no_tensor_alive():
    """Gradients let go of (zero_grad) and state replaced (offloaded, cleared) are freed at once."""
    params = make_params()
    opt = AdamW(params, backend=BACKEND)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    grad = weakref.ref(params[0].grad)
    opt.zero_grad(set_to_none=True)
    assert grad() is None
    state = opt.state[params[1]]
    moment, step = weakref.ref(state["exp_avg"]), weakref.ref(state["step"])
    state["exp_avg"] = state["exp_avg"].clone()  # "offloaded" to a copy
    assert moment() is None
    del state
    opt.state.clear()
    assert step() is None


# ----------------------------------------------------------------------------- hyperparameters

SCHEDULERS = {
    "lambda": lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 / (k + 1)),
    "onecycle": lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=12),  # betas too
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
@pytest.mark.parametrize("tensor_lr", [False, True])
def test_lr_scheduler_every_step_follows_torch(backend, scheduler, tensor_lr, full_steps):
    def groups(params):
        lr = torch.tensor(1e-2) if tensor_lr else 1e-2
        return [{"params": params[:2], "lr": lr}, {"params": params[2:], "lr": lr, "amsgrad": True}]
    runs = Runs(groups, backend=backend)
    schedulers = [SCHEDULERS[scheduler](opt) for opt in runs.opts]
    for _ in range(12):
        runs.step()
        for s in schedulers:
            s.step()
    assert [float(v) for v in schedulers[1].get_last_lr()] == [float(v) for v in schedulers[0].get_last_lr()]
    runs.check()
    assert full_steps.count(runs.opts[1]) == 1  # a new lr rebuilds the rows, not the buckets


def test_hyperparameters_edited_between_steps_follow_torch(full_steps):
    def groups(params):
        return [{"params": params[:2], "lr": torch.tensor(1e-2)}, {"params": params[2:], "betas": [0.8, 0.99]}]
    runs = Runs(groups)
    edits = [
        lambda params, opt: opt.param_groups[0]["lr"].fill_(3e-2),         # Tensor lr, in place
        lambda params, opt: opt.param_groups[0].update(lr=5e-3),           # Tensor lr -> float
        lambda params, opt: opt.param_groups[1]["betas"].__setitem__(0, 0.5),  # betas list, in place
        lambda params, opt: opt.param_groups[1].update(betas=(0.7, 0.9)),  # a new tuple
        lambda params, opt: opt.param_groups[0].update(weight_decay=0.5),
        lambda params, opt: opt.param_groups[1].update(eps=1e-3),
        lambda params, opt: opt.param_groups[0].update(maximize=True),
        lambda params, opt: opt.param_groups[0].update(lr=torch.tensor(2e-2)),  # float -> Tensor lr
    ]
    runs.step(2)
    for edit in edits:
        runs.each(edit)
        runs.step(2)
        runs.check()
    assert full_steps.count(runs.opts[1]) == 2  # maximize changes the bucket key


def test_numpy_lr_changed_in_place_is_followed(full_steps):
    """A hyperparameter that is neither a Python number nor a Tensor is read again every step."""
    np = pytest.importorskip("numpy")
    runs = Runs(lambda params: [{"params": params, "lr": np.array(1e-2)}])
    runs.step(2, with_torch=False)
    runs.each(lambda params, opt: opt.param_groups[0]["lr"].fill(5e-2), with_torch=False)
    runs.step(2, with_torch=False)
    runs.check(with_torch=False)
    assert full_steps.count(runs.opts[1]) == 1


def test_amsgrad_switched_on_between_steps_matches_steps_without_a_plan(full_steps):
    """torch.optim.AdamW cannot do this (its state lacks max_exp_avg_sq); AdamW makes one."""
    runs = Runs(one_group)
    runs.step(2)
    runs.each(lambda params, opt: opt.param_groups[0].update(amsgrad=True), with_torch=False)
    runs.step(2, with_torch=False)
    runs.check(with_torch=False)
    assert all("max_exp_avg_sq" in state for state in runs.opts[1].state.values())
    assert full_steps.count(runs.opts[1]) == 2


def test_stochastic_rounding_plan_matches_steps_without_a_plan(full_steps):
    """Planned steps keep each tensor's random stream (its index in the flat parameter order)."""
    def groups(params):
        return [{"params": params[:2]}, {"params": params[2:], "lr": 5e-3}]
    runs = Runs(groups, dtype=torch.bfloat16, torch_kwargs={}, bf16_stochastic_round=True)
    for k in range(4):
        for params, opt in zip(runs.params[1:], runs.opts[1:]):
            for i, p in enumerate(params):
                p.grad = None if (i == 1 and k == 2) else torch.full_like(p, 1e-3 * (k + 1))
            torch.manual_seed(k)
            opt.step()
    runs.check(with_torch=False)
    assert full_steps.count(runs.opts[1]) == 3  # first, a gradient missing, and back


# ----------------------------------------------------------------------------- backend choice

@pytest.mark.skipif(BACKEND == "reference", reason="needs a second backend on CPU tensors")
def test_backend_choice_changed_between_steps_is_followed(monkeypatch):
    chosen = []
    real_kernel = adamw_module.kernel
    monkeypatch.setattr(adamw_module, "kernel", lambda name, backend, ref: (chosen.append(backend),
                                                                            real_kernel(name, backend, ref))[1])
    p = torch.nn.Parameter(torch.randn(8))
    opt = AdamW([p])
    for _ in range(2):
        p.grad = torch.randn(8)
        opt.step()
    with fusedreg.use_backend("reference"):
        for _ in range(2):
            p.grad = torch.randn(8)
            opt.step()
    opt.backend = "reference"
    p.grad = torch.randn(8)
    opt.step()
    opt.backend = None
    p.grad = torch.randn(8)
    opt.step()
    assert chosen == [BACKEND, "reference", BACKEND]
