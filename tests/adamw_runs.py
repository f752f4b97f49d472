"""What the AdamW step-plan tests share (tests/test_adamw_host*.py): the same parameters under
torch.optim.AdamW, fusedreg's AdamW, and fusedreg's AdamW with its plan dropped before every step
(so that every step takes the full path: the oracle the plan must match bitwise)."""
import torch

from conftest import native_backends
from fusedreg.optim import AdamW

BACKEND = native_backends("cpu")[0]  # the compiled CPU kernels
SHAPES = [(4, 4), (7,), (0,), (2, 3)]
TOL = dict(atol=1e-6, rtol=1e-5)


def count_full_steps(monkeypatch) -> list:
    """A list that gets the optimizer of every step that buckets the parameters from scratch
    (AdamW._buckets), for as long as `monkeypatch` lasts."""
    calls = []
    real = AdamW._buckets

    def counting(self, capturing):
        calls.append(self)
        return real(self, capturing)
    monkeypatch.setattr(AdamW, "_buckets", counting)
    return calls


def make_params(dtype=torch.float32, shapes=SHAPES, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes]


def without_plan(opt):
    """`opt` with its plan dropped before every step: every step takes the full path."""
    opt.register_step_pre_hook(lambda o, args, kwargs: setattr(o, "_plan", None))
    return opt


class Runs:
    """The same parameters under torch.optim.AdamW(foreach=False), AdamW, and AdamW without a plan,
    all given the same gradients; groups(params) builds each one's param groups."""

    def __init__(self, groups, backend=BACKEND, dtype=torch.float32, shapes=SHAPES, torch_kwargs=None, **kwargs):
        base = make_params(dtype, shapes)
        self.params = [[torch.nn.Parameter(b.detach().clone()) for b in base] for _ in range(3)]
        self.opts = [torch.optim.AdamW(groups(self.params[0]), foreach=False, **(torch_kwargs or {})),
                     AdamW(groups(self.params[1]), backend=backend, **kwargs),
                     without_plan(AdamW(groups(self.params[2]), backend=backend, **kwargs))]
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

    def check(self, with_torch=True):
        """Parameters and state: bitwise those of the run without a plan, close to torch's."""
        theirs, mine, planless = self.params
        for tp, mp, fp in zip(theirs, mine, planless):
            assert torch.equal(mp, fp)
            ms, fs = self.opts[1].state.get(mp, {}), self.opts[2].state.get(fp, {})
            assert set(ms) == set(fs) and all(torch.equal(ms[key], fs[key]) for key in ms)
            if with_torch:
                torch.testing.assert_close(mp.detach(), tp.detach(), **TOL)
                ts = self.opts[0].state.get(tp, {})
                assert set(ms) == set(ts)
                for key in ts:
                    torch.testing.assert_close(ms[key].to(ts[key].dtype), ts[key], **TOL)


def one_group(params):
    return [{"params": params}]


def two_groups(params):
    return [{"params": params[::2], "lr": 1e-2}, {"params": params[1::2], "weight_decay": 0.1, "amsgrad": True}]
