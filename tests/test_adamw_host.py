"""fusedreg.optim.AdamW's step plan (fusedreg/optim/_adamw_plan.py): steps after the first reuse its
bucketing, hyperparameter rows and op lookups, and whatever changes between steps (schedulers,
edited hyperparameters, new groups, checkpoints, `.data =`, gradients, state, the backend) is
noticed: the trajectory stays torch.optim.AdamW's, and bitwise that of steps taken without a plan.
The plan keeps no tensor alive."""
import weakref

import pytest
import torch

import fusedreg
import fusedreg.optim.adamw as adamw_module
from conftest import native_backends
from fusedreg.optim import AdamW

BACKENDS = ["reference"] + native_backends("cpu")
BACKEND = native_backends("cpu")[0]  # the compiled CPU kernels
SHAPES = [(4, 4), (7,), (0,), (2, 3)]
TOL = dict(atol=1e-6, rtol=1e-5)


@pytest.fixture
def full_steps(monkeypatch):
    """Counts the steps that bucket the parameters from scratch (AdamW._buckets)."""
    calls = []
    real = AdamW._buckets

    def counting(self, capturing):
        calls.append(self)
        return real(self, capturing)
    monkeypatch.setattr(AdamW, "_buckets", counting)
    return calls


def _params(dtype=torch.float32, shapes=SHAPES, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes]


def _without_plan(opt):
    """`opt` with its plan dropped before every step: every step takes the full path."""
    opt.register_step_pre_hook(lambda o, args, kwargs: setattr(o, "_plan", None))
    return opt


class Runs:
    """The same parameters under torch.optim.AdamW(foreach=False), AdamW, and AdamW without a plan,
    all given the same gradients; groups(params) builds each one's param groups."""

    def __init__(self, groups, backend=BACKEND, dtype=torch.float32, shapes=SHAPES, torch_kwargs=None, **kwargs):
        base = _params(dtype, shapes)
        self.params = [[torch.nn.Parameter(b.detach().clone()) for b in base] for _ in range(3)]
        self.opts = [torch.optim.AdamW(groups(self.params[0]), foreach=False, **(torch_kwargs or {})),
                     AdamW(groups(self.params[1]), backend=backend, **kwargs),
                     _without_plan(AdamW(groups(self.params[2]), backend=backend, **kwargs))]
        self.k = 0

    def step(self, n=1, skip=(), grad=None, with_torch=True):
        """n steps; parameters at indices in `skip` get no gradient; grad(p, g) may re-lay one out."""
        for _ in range(n):
            gen = torch.Generator().manual_seed(100 + self.k)
            grads = [torch.randn(p.shape, generator=gen).to(p.dtype) for p in self.params[0]]
            for params, opt in list(zip(self.params, self.opts))[0 if with_torch else 1:]:
                for i, (p, g) in enumerate(zip(params, grads)):
                    g = g.to(device=p.device, dtype=p.dtype)
                    p.grad = None if i in skip else (g.clone() if grad is None else grad(p, g.clone()))
                opt.step()
            self.k += 1

    def each(self, fn, with_torch=True):
        """fn(params, opt) on every run (the same change made to each)."""
        for params, opt in list(zip(self.params, self.opts))[0 if with_torch else 1:]:
            fn(params, opt)

    def check(self):
        theirs, mine, planless = self.params
        for tp, mp, fp in zip(theirs, mine, planless):
            assert torch.equal(mp, fp)  # the plan changes nothing, bitwise
            torch.testing.assert_close(mp.detach(), tp.detach(), **TOL)
            ts, ms, fs = (opt.state.get(p, {}) for opt, p in zip(self.opts, (tp, mp, fp)))
            assert set(ms) == set(ts) == set(fs)
            for key in ts:
                assert torch.equal(ms[key], fs[key])
                torch.testing.assert_close(ms[key].to(ts[key].dtype), ts[key], **TOL)


def _one_group(params):
    return [{"params": params}]


def _two_groups(params):
    return [{"params": params[::2], "lr": 1e-2}, {"params": params[1::2], "weight_decay": 0.1, "amsgrad": True}]


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
    runs = Runs(_two_groups, backend=backend)
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
    params = _params()
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


def test_amsgrad_switched_on_between_steps_matches_steps_without_a_plan(full_steps):
    """torch.optim.AdamW cannot do this (its state lacks max_exp_avg_sq); AdamW makes one."""
    runs = Runs(_one_group)
    runs.step(2)
    runs.each(lambda params, opt: opt.param_groups[0].update(amsgrad=True), with_torch=False)
    runs.step(2, with_torch=False)
    mine, planless = runs.params[1:]
    for mp, fp in zip(mine, planless):
        assert torch.equal(mp, fp)
        assert torch.equal(runs.opts[1].state[mp]["max_exp_avg_sq"], runs.opts[2].state[fp]["max_exp_avg_sq"])
    assert full_steps.count(runs.opts[1]) == 2


# ----------------------------------------------------------------------------- structure and state

def test_add_param_group_after_steps_follows_torch(full_steps):
    n = len(SHAPES)
    runs = Runs(lambda params: [{"params": params[:n]}], shapes=SHAPES + [(5,), (3, 2)])
    runs.step(2, skip=(n, n + 1))  # the last two parameters join in a new group after two steps
    runs.each(lambda params, opt: opt.add_param_group({"params": params[n:], "lr": 3e-2, "amsgrad": True}))
    runs.step(3)
    runs.check()
    assert full_steps.count(runs.opts[1]) == 2


def test_parameter_replaced_or_without_gradient_follows_torch(full_steps):
    runs = Runs(_two_groups)
    runs.step(2)
    runs.step(2, skip=(1,))          # a parameter without a gradient
    runs.step(1)                     # ... and with one again
    new = _params(shapes=[(4, 4)], seed=3)[0]

    def replace(params, opt):        # another parameter in the same place of its group's list
        params[0] = torch.nn.Parameter(new.detach().clone())
        opt.param_groups[0]["params"][0] = params[0]
    runs.each(replace)
    runs.step(2)
    extra = _params(shapes=[(3,)], seed=4)[0]

    def append(params, opt):         # one more parameter in a group's list, appended in place
        params.append(torch.nn.Parameter(extra.detach().clone()))
        opt.param_groups[1]["params"].append(params[-1])
    runs.each(append)
    runs.step(2)
    runs.check()
    assert full_steps.count(runs.opts[1]) == 5


def test_load_state_dict_between_steps_follows_torch(full_steps):
    runs = Runs(_two_groups)
    runs.step(3)
    saved = [opt.state_dict() for opt in runs.opts]
    snapshot = [[p.detach().clone() for p in params] for params in runs.params]
    runs.step(3)

    def restore(params, opt):
        index = runs.opts.index(opt)
        with torch.no_grad():
            for p, s in zip(params, snapshot[index]):
                p.copy_(s)
        opt.load_state_dict(saved[index])
    runs.each(restore)
    runs.step(3)
    runs.check()
    assert full_steps.count(runs.opts[1]) == 2


def test_state_replaced_or_cleared_follows_torch(full_steps):
    runs = Runs(_one_group)
    runs.step(2)

    def offload_and_back(params, opt):
        for state in opt.state.values():
            for key, value in state.items():
                state[key] = value.clone()
    runs.each(offload_and_back)
    runs.step(2)
    runs.check()
    runs.each(lambda params, opt: opt.state.__setitem__(params[0], {}))  # one parameter starts over
    runs.step(2)
    runs.each(lambda params, opt: opt.state.clear())
    runs.step(2)
    runs.check()
    assert full_steps.count(runs.opts[1]) == 3


def test_data_to_another_dtype_follows_torch(full_steps):
    """`.data =` keeps the Parameter objects (model.double() does this), state converted alike."""
    runs = Runs(_two_groups)
    runs.step(2)

    def to_double(params, opt):
        for p in params:
            p.data = p.data.double()
            for value in opt.state[p].values():
                if value.dim():  # the moments (torch keeps a float32 step)
                    value.data = value.data.double()
    runs.each(to_double)
    runs.step(3)
    runs.check()
    assert runs.params[1][0].dtype == torch.float64
    assert full_steps.count(runs.opts[1]) == 2


@pytest.mark.gpu
def test_data_to_another_device_follows_torch(full_steps):
    """Parameters and state moved to the GPU in place (model.cuda(), then every state tensor's
    `.data`, as optimizer-offloading code does): the same objects, on another device."""
    runs = Runs(_two_groups, backend=None)
    runs.step(2)

    def to_cuda(params, opt):
        for p in params:
            p.data = p.data.cuda()
            for value in opt.state[p].values():
                value.data = value.data.cuda()
    runs.each(to_cuda)
    runs.step(2)
    runs.check()
    assert runs.params[1][0].is_cuda and runs.opts[1].state[runs.params[1][0]]["exp_avg"].is_cuda
    assert full_steps.count(runs.opts[1]) == 2


def _compare_without_plan(runs):
    for mp, fp in zip(*runs.params[1:]):
        assert torch.equal(mp, fp)
        for key, value in runs.opts[1].state[mp].items():
            assert torch.equal(value, runs.opts[2].state[fp][key])


def test_one_parameter_to_another_dtype_gets_its_own_bucket(full_steps):
    """torch.optim.AdamW cannot step bfloat16 parameters with float32 moments; AdamW can
    (state_dtype=torch.float32), in a bucket of their own."""
    runs = Runs(_one_group, state_dtype=torch.float32)
    runs.step(2, with_torch=False)
    runs.each(lambda params, opt: setattr(params[0], "data", params[0].data.bfloat16()), with_torch=False)
    runs.step(2, with_torch=False)
    _compare_without_plan(runs)
    assert runs.params[1][0].dtype == torch.bfloat16
    assert full_steps.count(runs.opts[1]) == 2


def test_one_parameters_moments_to_another_dtype_get_their_own_bucket(full_steps):
    """Moments converted in place (`.data =`, same objects) to bfloat16, which state_dtype allows."""
    runs = Runs(_one_group)
    runs.step(2, with_torch=False)

    def to_bfloat16(params, opt):
        for key in ("exp_avg", "exp_avg_sq"):
            opt.state[params[0]][key].data = opt.state[params[0]][key].data.bfloat16()
    runs.each(to_bfloat16, with_torch=False)
    runs.step(2, with_torch=False)
    _compare_without_plan(runs)
    assert runs.opts[1].state[runs.params[1][0]]["exp_avg"].dtype == torch.bfloat16
    assert full_steps.count(runs.opts[1]) == 2


def test_empty_parameter_given_elements_follows_torch(full_steps):
    """`.data =` on an empty parameter and its moments (and back): stepped as a fresh full step would."""
    runs = Runs(_one_group)
    empty = SHAPES.index((0,))
    runs.step(2)

    def resize(numel):
        def fn(params, opt):
            params[empty].data = torch.full((numel,), 0.5)
            for key in ("exp_avg", "exp_avg_sq"):
                opt.state[params[empty]][key].data = torch.zeros(numel)
        return fn
    runs.each(resize(5))
    runs.step(2)
    runs.check()
    runs.each(resize(0))
    runs.step(2)
    runs.check()
    assert full_steps.count(runs.opts[1]) == 3


def test_max_exp_avg_sq_deleted_between_steps_is_made_again(full_steps):
    runs = Runs(_two_groups)
    runs.step(2, with_torch=False)
    runs.each(lambda params, opt: opt.state[params[1]].pop("max_exp_avg_sq"), with_torch=False)
    runs.step(2, with_torch=False)
    _compare_without_plan(runs)
    assert full_steps.count(runs.opts[1]) == 2


def test_data_and_gradients_relaid_out_follow_torch(full_steps):
    runs = Runs(_one_group)
    runs.step(2)
    runs.each(lambda params, opt: setattr(params[0], "data", params[0].data.t()))  # (4, 4), not contiguous
    runs.step(2)
    runs.check()
    transposed = runs.params[1][0]
    assert not transposed.is_contiguous() and runs.opts[1].state[transposed]["exp_avg"].stride() == transposed.stride()
    runs.each(lambda params, opt: setattr(params[0], "data", params[0].data.contiguous()))
    runs.step(1, grad=lambda p, g: g.t().contiguous().t() if g.dim() == 2 else g)  # gradients transposed
    runs.step(1)
    runs.check()
    assert full_steps.count(runs.opts[1]) == 5  # relaid-out tensors are stepped unplanned


def test_sparse_gradient_after_planned_steps_raises_like_torch():
    p = torch.nn.Parameter(torch.randn(4))
    opt = AdamW([p], backend=BACKEND)
    for _ in range(2):
        p.grad = torch.randn(4)
        opt.step()
    p.grad = torch.randn(4).to_sparse()
    with pytest.raises(RuntimeError, match="Adam does not support sparse gradients"):
        opt.step()


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
    for mp, fp in zip(*runs.params[1:]):
        assert torch.equal(mp, fp)
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
