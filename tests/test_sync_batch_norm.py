"""fusedreg.nn.SyncBatchNorm: two gloo processes on CPU with unequal (and empty) per-rank batches
against one process's BatchNorm on the concatenated batch; single-process and eval behaviour;
convert_sync_batchnorm."""
import datetime
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fusedreg
from conftest import TOLERANCES, native_backends
from fusedreg import _backend, _library

C = 3
WORLD = 2
# per step, each rank's batch size: unequal, then one rank empty
BATCHES = [(3, 5), (2, 4), (4, 0)]
CONFIGS = {"momentum_0.3": {"momentum": 0.3}, "momentum_none_no_affine": {"momentum": None,
                                                                          "affine": False}}
OPS = ("batch_norm_stats", "batch_norm_elemt", "batch_norm_bwd_reduce", "batch_norm_bwd_elemt",
       "batch_norm_fwd", "batch_norm_bwd")


def _close(actual, expected):
    atol, rtol = TOLERANCES[torch.float32]
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


def _ready(backend):
    """Skip a native backend whose BatchNorm kernels are not registered (yet) for CPU."""
    if backend == "reference":
        return
    _backend.select("cpu", backend)
    missing = [op for op in OPS if not torch._C._dispatch_has_kernel_for_dispatch_key(
        _library.qualname(op, backend), "CPU")]
    if missing:
        pytest.skip(f"backend {backend!r} has no cpu kernel for {', '.join(missing)}")


def _batch(step: int, rank: int):
    """Rank `rank`'s (input, upstream grad) at `step`; channels_last on step 1."""
    n = BATCHES[step][rank]
    gen = torch.Generator().manual_seed(100 * step + rank)
    offset = torch.tensor([0.5, -2.0, 3.0]).reshape(1, C, 1, 1)
    x = torch.randn(n, C, 4, 5, generator=gen) * (1 + step) + offset
    dy = torch.randn(n, C, 4, 5, generator=gen)
    if step == 1:
        x, dy = (t.contiguous(memory_format=torch.channels_last) for t in (x, dy))
    return x, dy


def _init_params(module):
    if module.affine:
        with torch.no_grad():
            module.weight.copy_(torch.tensor([1.5, 0.7, -1.1]))
            module.bias.copy_(torch.tensor([0.2, -0.3, 0.4]))


def _step(module, x, dy):
    x = x.clone().requires_grad_()
    out = module(x)
    out.backward(dy)
    grads = [None if p.grad is None else p.grad.clone() for p in module.parameters()]
    module.zero_grad()
    return {"out": out.detach(), "grad_input": x.grad, "grad_params": grads,
            "is_channels_last": out.is_contiguous(memory_format=torch.channels_last) and out.numel() > 0}


def _worker(rank, init_file, out_dir, backend):
    # two processes on shared cores: one thread each
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        for name, config in CONFIGS.items():
            module = fusedreg.nn.SyncBatchNorm(C, **config, backend=backend)
            _init_params(module)
            steps = [_step(module, *_batch(step, rank)) for step in range(len(BATCHES))]
            module.eval()
            steps.append(_step(module, *_batch(0, rank)))
            buffers = {k: v.clone() for k, v in module.named_buffers()}
            torch.save({"steps": steps, "buffers": buffers}, os.path.join(out_dir, f"{name}-{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _expected(config):
    """What each rank must see, from one process's torch BatchNorm2d on the concatenated batch:
    per step and rank (out, grad_input, grad_params summed over ranks), then the buffers."""
    single = torch.nn.BatchNorm2d(C, **config)
    _init_params(single)
    steps = []
    for step, sizes in enumerate(BATCHES):
        batches = [_batch(step, rank) for rank in range(WORLD)]
        whole = _step(single, torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]))
        steps.append([{"out": out, "grad_input": grad_input, "grad_params": whole["grad_params"]}
                      for out, grad_input in zip(whole["out"].split(sizes),
                                                 whole["grad_input"].split(sizes))])
    single.eval()  # eval: no synchronization, every rank on its own batch
    steps.append([_step(single, *_batch(0, rank)) for rank in range(WORLD)])
    return steps, dict(single.named_buffers())


@pytest.mark.parametrize("backend", ["reference"] + native_backends("cpu"))
def test_two_processes_match_one_process_on_the_concatenated_batch(backend, tmp_path):
    _ready(backend)
    # forkserver, not fork: autograd refuses to run in a child forked after this process ran a
    # compiled backward (other tests do); the server imports torch once for every later start
    mp.start_processes(_worker, args=(str(tmp_path / "init"), str(tmp_path), backend), nprocs=WORLD,
                       join=True, start_method="forkserver")
    for name, config in CONFIGS.items():
        expected_steps, expected_buffers = _expected(config)
        ranks = [torch.load(tmp_path / f"{name}-{rank}.pt") for rank in range(WORLD)]
        for step, expected in enumerate(expected_steps):
            got = [ranks[rank]["steps"][step] for rank in range(WORLD)]
            for rank in range(WORLD):
                _close(got[rank]["out"], expected[rank]["out"])
                _close(got[rank]["grad_input"], expected[rank]["grad_input"])
            assert got[0]["is_channels_last"] == (step == 1)
            for i, want in enumerate(expected[0]["grad_params"]):
                if step == len(BATCHES):  # eval: each rank's own
                    _close(got[0]["grad_params"][i], want)
                    continue
                # training: each rank's local sums, as torch's SyncBatchNorm (DDP all-reduces)
                _close(got[0]["grad_params"][i] + got[1]["grad_params"][i], want)
                if BATCHES[step][1] > 0:
                    assert not torch.allclose(got[0]["grad_params"][i], want, atol=1e-3)
        for rank in range(WORLD):
            for key, want in expected_buffers.items():
                _close(ranks[rank]["buffers"][key].to(want.dtype), want)
        assert int(ranks[0]["buffers"]["num_batches_tracked"]) == len(BATCHES)


# ----------------------------------------------------------------------------- one process

@pytest.mark.parametrize("backend", ["reference"] + native_backends("cpu"))
def test_without_process_group_it_is_batch_norm(backend):
    _ready(backend)
    ours = fusedreg.nn.SyncBatchNorm(C, momentum=None, backend=backend)
    theirs = torch.nn.BatchNorm2d(C, momentum=None)
    _init_params(ours), _init_params(theirs)
    for step in range(2):
        x, dy = _batch(step, 1)
        got, want = _step(ours, x, dy), _step(theirs, x, dy)
        for key in ("out", "grad_input"):
            _close(got[key], want[key])
        for g, w in zip(got["grad_params"], want["grad_params"]):
            _close(g, w)
    _close(ours.running_var, theirs.running_var)
    ours.eval(), theirs.eval()
    x, dy = _batch(0, 0)
    _close(_step(ours, x, dy)["out"], _step(theirs, x, dy)["out"])
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        ours.train()(torch.randn(1, C))


def test_drop_in_for_torch_sync_batch_norm():
    ours, theirs = fusedreg.nn.SyncBatchNorm(5, eps=1e-3), torch.nn.SyncBatchNorm(5, eps=1e-3)
    assert isinstance(ours, torch.nn.SyncBatchNorm)
    assert repr(ours) == repr(theirs)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())
    with pytest.raises(ValueError, match="expected at least 2D input"):
        ours(torch.randn(5))
    with pytest.raises(ValueError, match="number of input channels should be non-zero"):
        ours(torch.randn(4, 0, 3))


def test_convert_sync_batchnorm():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, C, 1), torch.nn.BatchNorm2d(C, momentum=None),
                                torch.nn.Sequential(fusedreg.nn.BatchNorm1d(4, affine=False,
                                                                           backend="reference")))
    model[1](torch.randn(4, C, 2, 2))  # some state to carry over
    bn_weight, running_var = model[1].weight, model[1].running_var
    model.eval()
    converted = fusedreg.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert converted is model
    assert type(model[1]) is fusedreg.nn.SyncBatchNorm and type(model[2][0]) is fusedreg.nn.SyncBatchNorm
    assert model[1].weight is bn_weight and model[1].running_var is running_var
    assert model[1].momentum is None and int(model[1].num_batches_tracked) == 1
    assert not model[1].training and not model[2][0].affine
    assert model[2][0].backend == "reference" and model[1].backend is None
    single = fusedreg.nn.SyncBatchNorm.convert_sync_batchnorm(torch.nn.BatchNorm3d(2), backend="reference")
    assert type(single) is fusedreg.nn.SyncBatchNorm and single.backend == "reference"
