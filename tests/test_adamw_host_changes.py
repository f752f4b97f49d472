"""fusedreg.optim.AdamW's step plan (fusedreg/optim/_adamw_plan.py) under changes between steps to
the param groups, the state, the parameters (`.data =`) and the gradients: each is noticed (the
step takes the full path once, counted), and the trajectory stays torch.optim.AdamW's and, bitwise,
that of steps taken without a plan."""
import pytest
import torch

from adamw_runs import BACKEND, SHAPES, Runs, count_full_steps, make_params, one_group, two_groups
from fusedreg.optim import AdamW


@pytest.fixture
def full_steps(monkeypatch):
    return count_full_steps(monkeypatch)


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
    runs = Runs(two_groups)
    runs.step(2)
    runs.step(2, skip=(1,))          # a parameter without a gradient
    runs.step(1)                     # ... and with one again
    new = make_params(shapes=[(4, 4)], seed=3)[0]

    def replace(params, opt):        # another parameter in the same place of its group's list
        params[0] = torch.nn.Parameter(new.detach().clone())
        opt.param_groups[0]["params"][0] = params[0]
    runs.each(replace)
    runs.step(2)
    extra = make_params(shapes=[(3,)], seed=4)[0]

    def append(params, opt):         # one more parameter in a group's list, appended in place
        params.append(torch.nn.Parameter(extra.detach().clone()))
        opt.param_groups[1]["params"].append(params[-1])
    runs.each(append)
    runs.step(2)
    runs.check()
    assert full_steps.count(runs.opts[1]) == 5


def test_load_state_dict_between_steps_follows_torch(full_steps):
    runs = Runs(two_groups)
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
    runs = Runs(one_group)
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
    runs = Runs(two_groups)
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
    runs = Runs(two_groups, backend=None)
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


def test_one_parameter_to_another_dtype_gets_its_own_bucket(full_steps):
    """torch.optim.AdamW cannot step bfloat16 parameters with float32 moments; AdamW can
    (state_dtype=torch.float32), in a bucket of their own."""
    runs = Runs(one_group, state_dtype=torch.float32)
    runs.step(2, with_torch=False)
    runs.each(lambda params, opt: setattr(params[0], "data", params[0].data.bfloat16()), with_torch=False)
    runs.step(2, with_torch=False)
    runs.check(with_torch=False)
    assert runs.params[1][0].dtype == torch.bfloat16
    assert full_steps.count(runs.opts[1]) == 2


def test_one_parameters_moments_to_another_dtype_get_their_own_bucket(full_steps):
    """Moments converted in place (`.data =`, same objects) to bfloat16, which state_dtype allows."""
    runs = Runs(one_group)
    runs.step(2, with_torch=False)

    def to_bfloat16(params, opt):
        for key in ("exp_avg", "exp_avg_sq"):
            opt.state[params[0]][key].data = opt.state[params[0]][key].data.bfloat16()
    runs.each(to_bfloat16, with_torch=False)
    runs.step(2, with_torch=False)
    runs.check(with_torch=False)
    assert runs.opts[1].state[runs.params[1][0]]["exp_avg"].dtype == torch.bfloat16
    assert full_steps.count(runs.opts[1]) == 2


def test_empty_parameter_given_elements_follows_torch(full_steps):
    """`.data =` on an empty parameter and its moments (and back): stepped as a fresh full step would."""
    runs = Runs(one_group)
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
    runs = Runs(two_groups)
    runs.step(2, with_torch=False)
    runs.each(lambda params, opt: opt.state[params[1]].pop("max_exp_avg_sq"), with_torch=False)
    runs.step(2, with_torch=False)
    runs.check(with_torch=False)
    assert full_steps.count(runs.opts[1]) == 2


def test_data_and_gradients_relaid_out_follow_torch(full_steps):
    runs = Runs(one_group)
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
