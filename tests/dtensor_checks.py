"""The checks test_fsdp2.py runs in every process of a group: fusedreg's clip_grad_norm_ /
get_total_norm / AdamW on DTensor parameters against torch's on a twin model, collective counts,
torch.distributed.checkpoint round trips, SyncBatchNorm under FSDP2 and DDP.

Each check is check(rank, world_size, out_dir, device="cpu") and raises on a mismatch; every
process of the default group calls it. CHECKS: name -> (check, the world sizes it runs at).
"""
import contextlib
import math
import os

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
from torch.utils._python_dispatch import TorchDispatchMode

import fusedreg

LR, WEIGHT_DECAY, MAX_NORM, STEPS = 0.05, 0.1, 0.5, 3
TOL = dict(atol=1e-5, rtol=1e-5)        # parameters against torch's
NORM_TOL = dict(atol=0.0, rtol=1e-5)    # norms against torch's
TP_PLAN = {"0": ColwiseParallel(), "2": RowwiseParallel()}


# ----------------------------------------------------------------------------- helpers

def _mlp(device, hidden=7, seed=0):
    """Linear(5, hidden) -> Tanh -> Linear(hidden, 3); hidden 7 shards unevenly over 2 and 4 ranks
    (over 4, the (3, 7) weight leaves one rank an empty shard)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, hidden), nn.Tanh(), nn.Linear(hidden, 3)).to(device)


def _fully_shard(model, mesh=None):
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def _batch(step, seed, device):
    gen = torch.Generator().manual_seed(1000 * step + seed)
    return torch.randn(4, 5, generator=gen).to(device)


def _backward(model, x, mean=False):
    """A sum of squares (gradients large enough for MAX_NORM to clip them), or its mean."""
    model.zero_grad(set_to_none=True)
    loss = model(x).square()
    (loss.mean() if mean else loss.sum()).backward()


def _full(t):
    return t.full_tensor() if isinstance(t, DTensor) else t


def _assert_params_close(ours, theirs, what, **tol):
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(_full(a), _full(b), **(tol or TOL), msg=lambda m: f"{what} {name}: {m}")


def _assert_norm(ours, theirs, mesh_ndim=None):
    """ours: fusedreg's norm (a DTensor replicated over the mesh when mesh_ndim is given)."""
    if mesh_ndim is not None:
        assert isinstance(ours, DTensor), type(ours)
        assert ours.placements == (Replicate(),) * mesh_ndim, ours.placements
        ours = ours.to_local()
    else:
        assert not isinstance(ours, DTensor)
    torch.testing.assert_close(ours, _full(theirs).to(ours.dtype), **NORM_TOL)


def _twin_steps(ours, theirs, data_seed, device, mesh_ndim, steps=STEPS):
    """ours: fusedreg.clip_grad_norm_ + fusedreg AdamW, and (a third model) fusedreg
    AdamW(max_grad_norm); theirs: torch's clip_grad_norm_ + torch.optim.AdamW. The same batches;
    norms and parameters compared after every step."""
    ours, fused = ours
    opt_ours = fusedreg.optim.AdamW(ours.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    opt_fused = fusedreg.optim.AdamW(fused.parameters(), lr=LR, weight_decay=WEIGHT_DECAY, max_grad_norm=MAX_NORM)
    opt_theirs = torch.optim.AdamW(theirs.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    for step in range(steps):
        x = _batch(step, data_seed, device)
        for model in (ours, fused, theirs):
            _backward(model, x)
        if step == 0:
            grads = [p.grad for p in ours.parameters()]
            every = torch.cat([_full(g).reshape(-1) for g in grads]).double()
            for norm_type in (1.0, 3.0, math.inf):
                norm = fusedreg.get_total_norm(grads, norm_type)
                _assert_norm(norm, torch.linalg.vector_norm(every, norm_type), mesh_ndim)
                if not math.isinf(norm_type):  # torch's inf norm raises on an empty shard
                    _assert_norm(norm, torch.nn.utils.get_total_norm(grads, norm_type), mesh_ndim)
        norm_theirs = torch.nn.utils.clip_grad_norm_(theirs.parameters(), MAX_NORM)
        norm_ours = fusedreg.clip_grad_norm_(ours.parameters(), MAX_NORM)
        _assert_norm(norm_ours, norm_theirs, mesh_ndim)
        if step == 0:
            assert _full(norm_theirs) > MAX_NORM  # the clip does something
        opt_theirs.step()
        opt_ours.step()
        opt_fused.step()
        _assert_norm(opt_fused.last_grad_norm, norm_theirs)
        _assert_params_close(ours, theirs, f"step {step}, clip + AdamW:")
        _assert_params_close(fused, theirs, f"step {step}, AdamW(max_grad_norm):")
    for p in ours.parameters():  # moments as torch keeps them: DTensors placed like the parameter
        state = opt_ours.state[p]
        for key in ("exp_avg", "exp_avg_sq"):
            if isinstance(p, DTensor):
                assert isinstance(state[key], DTensor) and state[key].placements == p.placements, key
                torch.testing.assert_close(_full(state[key]), _full(opt_theirs.state[_twin(ours, theirs, p)][key]),
                                           **TOL)


def _twin(ours, theirs, p):
    return dict(zip((id(q) for q in ours.parameters()), theirs.parameters()))[id(p)]


class _CollectiveOps(TorchDispatchMode):
    """Records every c10d collective issued at the Python level (dist.* and functional ones)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace in ("c10d", "_c10d_functional", "c10d_functional"):
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def _collectives():
    """(sizes of the groups dist.all_reduce was called over, every collective op issued) in the block."""
    sizes = []
    original = dist.all_reduce

    def counting_all_reduce(tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
        sizes.append(dist.get_world_size(group))
        return original(tensor, op=op, group=group, async_op=async_op)

    dist.all_reduce = counting_all_reduce
    try:
        with _CollectiveOps() as mode:
            yield sizes, mode.ops
    finally:
        dist.all_reduce = original


def _assert_collectives(run, expected_sizes, what):
    with _collectives() as (sizes, ops):
        run()
    assert sorted(sizes) == sorted(expected_sizes), f"{what}: all_reduce over groups of {sizes}"
    assert ops == ["c10d.allreduce_.default"] * len(expected_sizes), f"{what}: {ops}"


# ----------------------------------------------------------------------------- checks

def fully_shard_follows_torch(rank, world_size, out_dir, device="cpu"):
    models = [_fully_shard(_mlp(device)) for _ in range(3)]
    _twin_steps(models[:2], models[2], rank, device, mesh_ndim=1)


def tensor_parallel_follows_torch(rank, world_size, out_dir, device="cpu"):
    """TP alone on a 1-D mesh: the row-parallel bias is Replicate and must count once."""
    mesh = init_device_mesh(device, (world_size,))
    models = [parallelize_module(_mlp(device, hidden=8), mesh, TP_PLAN) for _ in range(3)]
    assert models[0][2].bias.placements == (Replicate(),)
    _twin_steps(models[:2], models[2], 0, device, mesh_ndim=1)  # TP ranks see one batch


def _fsdp_x_tp(device, mesh):
    return _fully_shard(parallelize_module(_mlp(device, hidden=8), mesh["tp"], TP_PLAN), mesh["dp"])


def fsdp_x_tp_follows_torch(rank, world_size, out_dir, device="cpu"):
    mesh = init_device_mesh(device, (2, world_size // 2), mesh_dim_names=("dp", "tp"))
    models = [_fsdp_x_tp(device, mesh) for _ in range(3)]
    assert models[0][2].bias.placements == (Shard(0), Replicate())
    _twin_steps(models[:2], models[2], mesh.get_coordinate()[0], device, mesh_ndim=2)


def hsdp_follows_torch(rank, world_size, out_dir, device="cpu"):
    """HSDP: fully_shard over a 2-D (replicate, shard) mesh; the replicate dim must count once."""
    mesh = init_device_mesh(device, (2, world_size // 2), mesh_dim_names=("replicate", "shard"))
    models = [_fully_shard(_mlp(device), mesh) for _ in range(3)]
    assert models[0][0].weight.placements == (Replicate(), Shard(0))
    _twin_steps(models[:2], models[2], rank, device, mesh_ndim=2)


def mixed_dtensor_and_plain_parameters(rank, world_size, out_dir, device="cpu"):
    """A sharded and a plain parameter in one optimizer (the plain one identical on every process,
    as a replicated parameter is): the norm counts the plain one once, and is a plain tensor."""
    mesh = init_device_mesh(device, (world_size,))
    gen = torch.Generator().manual_seed(1)
    weight, bias = torch.randn(6, 3, generator=gen).to(device), torch.randn(5, generator=gen).to(device)

    def params():
        return [nn.Parameter(distribute_tensor(weight, mesh, [Shard(0)])), nn.Parameter(bias.clone())]

    ours, fused, theirs = params(), params(), params()
    hyper = dict(lr=LR, weight_decay=WEIGHT_DECAY, amsgrad=True)  # a third moment, a DTensor too
    opt_ours = fusedreg.optim.AdamW(ours, **hyper)
    opt_fused = fusedreg.optim.AdamW(fused, **hyper, max_grad_norm=MAX_NORM)
    opt_theirs = torch.optim.AdamW(theirs, **hyper)
    for step in range(STEPS):
        gw, gb = torch.randn(6, 3, generator=gen).to(device), torch.randn(5, generator=gen).to(device)
        exact = torch.linalg.vector_norm(torch.cat([gw.double().reshape(-1), gb.double()]))
        coef = min(1.0, MAX_NORM / (exact.item() + 1e-6))
        for (w, b), scale in ((ours, 1.0), (fused, 1.0), (theirs, coef)):
            w.grad = distribute_tensor(gw * scale, mesh, [Shard(0)])
            b.grad = gb * scale
        norm = fusedreg.clip_grad_norm_(ours, MAX_NORM)
        _assert_norm(norm, exact)
        for opt in (opt_ours, opt_fused, opt_theirs):
            opt.step()
        _assert_norm(opt_fused.last_grad_norm, exact)
        for got in (ours, fused):
            for a, b in zip(got, theirs):
                torch.testing.assert_close(_full(a), _full(b), **TOL)
    max_exp_avg_sq = opt_ours.state[ours[0]]["max_exp_avg_sq"]
    assert isinstance(max_exp_avg_sq, DTensor) and max_exp_avg_sq.placements == (Shard(0),)

    # process_group= still adds up plain tensors sharded by hand (a different piece on every
    # process), while a DTensor among them reduces over its mesh
    pieces = [torch.randn(3 + r, generator=gen).to(device) for r in range(world_size)]
    every = torch.cat([weight.reshape(-1)] + pieces).double()
    for norm_type in (2.0, math.inf):
        norm = fusedreg.get_total_norm([distribute_tensor(weight, mesh, [Shard(0)]), pieces[rank]], norm_type,
                                       process_group=dist.group.WORLD)
        _assert_norm(norm, torch.linalg.vector_norm(every, norm_type))


def misuse_raises_clear_errors(rank, world_size, out_dir, device="cpu"):
    """A DTensor parameter with a plain gradient, or with plain moments (a full optimizer state
    dict loaded into a sharded optimizer by hand): an error naming the remedy, not a wrong step."""
    mesh = init_device_mesh(device, (world_size,))
    weight = torch.randn(4, 3).to(device)
    p = nn.Parameter(distribute_tensor(weight, mesh, [Shard(0)]))
    p.grad = torch.ones(4, 3, device=device)
    opt = fusedreg.optim.AdamW([p])
    try:
        opt.step()
    except RuntimeError as error:
        assert "plain-tensor gradient" in str(error), error
    else:
        raise AssertionError("a plain gradient of a DTensor parameter was accepted")
    p.grad = distribute_tensor(torch.ones(4, 3, device=device), mesh, [Shard(0)])
    opt.step()
    opt.state[p]["exp_avg"] = torch.zeros(4, 3, device=device)
    try:
        opt.step()
    except RuntimeError as error:
        assert "set_optimizer_state_dict" in str(error), error
    else:
        raise AssertionError("a plain exp_avg of a DTensor parameter was accepted")


def partial_gradients(rank, world_size, out_dir, device="cpu"):
    """Gradients whose placement is Partial (addends on every process): the norm is the norm of the
    sum, clipping scales the addends, AdamW steps with the sum (as torch would after reducing)."""
    mesh = init_device_mesh(device, (world_size,))
    gen = torch.Generator().manual_seed(2)
    weight = torch.randn(4, 3, generator=gen).to(device)
    parts = [torch.randn(4, 3, generator=gen).to(device) for _ in range(world_size)]
    total = sum(parts)

    def partial_grad():
        return DTensor.from_local(parts[rank].clone(), mesh, [Partial()], run_check=False)

    for norm_type in (2.0, math.inf):
        exact = torch.linalg.vector_norm(total, norm_type)
        _assert_norm(fusedreg.get_total_norm([partial_grad()], norm_type), exact, mesh_ndim=1)
        _assert_norm(fusedreg.get_total_norm([partial_grad()], norm_type),
                     torch.nn.utils.get_total_norm([partial_grad()], norm_type), mesh_ndim=1)
    p = nn.Parameter(distribute_tensor(weight, mesh, [Replicate()]))
    p.grad = partial_grad()
    norm = fusedreg.clip_grad_norm_([p], MAX_NORM)
    coef = MAX_NORM / (torch.linalg.vector_norm(total) + 1e-6)
    torch.testing.assert_close(p.grad.full_tensor(), total * coef, **TOL)
    _assert_norm(norm, torch.linalg.vector_norm(total), mesh_ndim=1)

    p.grad = partial_grad()
    plain = nn.Parameter(weight.clone())
    plain.grad = total.clone()
    fusedreg.optim.AdamW([p], lr=LR).step()
    torch.optim.AdamW([plain], lr=LR).step()
    torch.testing.assert_close(p.full_tensor(), plain.detach(), **TOL)


def one_all_reduce_per_sharding_group(rank, world_size, out_dir, device="cpu"):
    """Counted around dist.all_reduce and at the dispatcher: the norm costs one all-reduce per
    sharding group and no other collective; the update none."""
    cases = [("fully_shard", _fully_shard(_mlp(device)), [world_size])]
    mesh = init_device_mesh(device, (world_size,))
    # column-parallel weight and bias and row-parallel weight: one group; the replicated bias: none
    cases.append(("tensor parallel", parallelize_module(_mlp(device, hidden=8), mesh, TP_PLAN), [world_size]))
    if world_size == 4:
        mesh2 = init_device_mesh(device, (2, 2), mesh_dim_names=("dp", "tp"))
        # weights sharded over dp and tp: over all 4 ranks; the row-parallel bias over dp: 2 ranks
        cases.append(("fsdp x tp", _fsdp_x_tp(device, mesh2), [4, 2]))
        # HSDP: sharded over the second dim, replicated over the first: 2 ranks
        hsdp_mesh = init_device_mesh(device, (2, 2), mesh_dim_names=("replicate", "shard"))
        cases.append(("hsdp", _fully_shard(_mlp(device), hsdp_mesh), [2]))
    for what, model, sizes in cases:
        _backward(model, _batch(0, rank, device))
        params = list(model.parameters())
        for norm_type in (2.0, math.inf):
            _assert_collectives(lambda: fusedreg.get_total_norm([p.grad for p in params], norm_type), sizes,
                                f"{what} get_total_norm({norm_type})")
        holder = {}
        _assert_collectives(lambda: holder.update(norm=fusedreg.clip_grad_norm_(params, MAX_NORM)), sizes,
                            f"{what} clip_grad_norm_")
        _assert_collectives(lambda: fusedreg.clip_grads_with_norm_(params, MAX_NORM, holder["norm"]), [],
                            f"{what} clip_grads_with_norm_")
        _assert_collectives(fusedreg.optim.AdamW(params).step, [], f"{what} AdamW")
        _assert_collectives(fusedreg.optim.AdamW(params, max_grad_norm=MAX_NORM).step, sizes,
                            f"{what} AdamW(max_grad_norm)")


def _train(model, opt, steps, rank, device, torch_clip=False):
    for step in steps:
        _backward(model, _batch(step, rank, device))
        if torch_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
        opt.step()


def _load(model, opt, checkpoint):
    model_sd, optim_sd = get_state_dict(model, opt)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=checkpoint)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])


def checkpoint_resumes_and_loads_into_torch(rank, world_size, out_dir, device="cpu"):
    """A sharded fusedreg AdamW(max_grad_norm) saved through torch.distributed.checkpoint after two
    steps resumes exactly in a fresh fusedreg run, and within float32 rounding in a fresh
    torch.optim.AdamW (+ torch's clip_grad_norm_) run; torch's checkpoint resumes in fusedreg."""
    checkpoint = os.path.join(out_dir, "checkpoint")
    hyper = dict(lr=LR, weight_decay=WEIGHT_DECAY)
    model = _fully_shard(_mlp(device))
    opt = fusedreg.optim.AdamW(model.parameters(), **hyper, max_grad_norm=MAX_NORM)
    _train(model, opt, range(2), rank, device)
    for p, state in zip(model.parameters(), opt.state_dict()["state"].values()):
        assert isinstance(state["exp_avg"], DTensor) and state["exp_avg"].placements == p.placements
        assert float(state["step"]) == 2.0
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=checkpoint)
    _train(model, opt, range(2, 4), rank, device)

    resumed = _fully_shard(_mlp(device, seed=1))  # other weights: the load must replace them
    resumed_opt = fusedreg.optim.AdamW(resumed.parameters(), **hyper, max_grad_norm=MAX_NORM)
    _load(resumed, resumed_opt, checkpoint)
    _train(resumed, resumed_opt, range(2, 4), rank, device)
    _assert_params_close(resumed, model, "fusedreg resumed:", atol=0.0, rtol=0.0)

    theirs = _fully_shard(_mlp(device, seed=1))
    theirs_opt = torch.optim.AdamW(theirs.parameters(), **hyper)
    _load(theirs, theirs_opt, checkpoint)
    _train(theirs, theirs_opt, range(2, 4), rank, device, torch_clip=True)
    _assert_params_close(theirs, model, "torch.optim.AdamW resumed:")

    # and the other way: torch.optim.AdamW's sharded checkpoint resumed by fusedreg
    checkpoint = os.path.join(out_dir, "checkpoint-torch")
    source = _fully_shard(_mlp(device))
    source_opt = torch.optim.AdamW(source.parameters(), **hyper)
    _train(source, source_opt, range(2), rank, device, torch_clip=True)
    model_sd, optim_sd = get_state_dict(source, source_opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=checkpoint)
    _train(source, source_opt, range(2, 4), rank, device, torch_clip=True)
    ours = _fully_shard(_mlp(device, seed=1))
    ours_opt = fusedreg.optim.AdamW(ours.parameters(), **hyper, max_grad_norm=MAX_NORM)
    _load(ours, ours_opt, checkpoint)
    for p in ours.parameters():
        state = ours_opt.state[p]
        assert isinstance(state["exp_avg_sq"], DTensor) and state["exp_avg_sq"].placements == p.placements
        assert state["step"].dtype == torch.float32 and float(state["step"]) == 2.0
    _train(ours, ours_opt, range(2, 4), rank, device)
    _assert_params_close(ours, source, "fusedreg resumed from torch.optim.AdamW:")


def _bn_mlp(device, norm):
    torch.manual_seed(3)
    # no bias before the norm: its gradient is zero up to rounding, which AdamW would amplify
    return nn.Sequential(nn.Linear(5, 6, bias=False), norm(6), nn.Tanh(), nn.Linear(6, 2)).to(device)


def _ddp(model, device):
    """DistributedDataParallel(model). On the CPU, DDP refuses any torch.nn.SyncBatchNorm (whose
    subclass fusedreg's is) because torch's kernels for it are CUDA-only; fusedreg's run on the CPU,
    so the guard is lifted here to exercise DDP's gradient all-reduce and buffer broadcast with it."""
    ddp = nn.parallel.DistributedDataParallel
    if device != "cpu":
        return ddp(model)
    guard = ddp._passing_sync_batchnorm_handle
    ddp._passing_sync_batchnorm_handle = lambda self, module: None
    try:
        return ddp(model)
    finally:
        ddp._passing_sync_batchnorm_handle = guard


def sync_batch_norm_under_fsdp2_and_ddp(rank, world_size, out_dir, device="cpu"):
    """fusedreg.nn.SyncBatchNorm in a model wrapped by fully_shard and by DistributedDataParallel,
    stepped by fusedreg AdamW: one process's BatchNorm1d + torch AdamW on the concatenated batch."""
    single = _bn_mlp(device, nn.BatchNorm1d)
    single_opt = torch.optim.AdamW(single.parameters(), lr=LR)
    fsdp = _fully_shard(_bn_mlp(device, fusedreg.nn.SyncBatchNorm))
    ddp = _ddp(_bn_mlp(device, fusedreg.nn.SyncBatchNorm), device)
    opts = [fusedreg.optim.AdamW(m.parameters(), lr=LR) for m in (fsdp, ddp)]
    for step in range(2):
        batches = [_batch(step, r, device) for r in range(world_size)]
        _backward(single, torch.cat(batches), mean=True)
        single_opt.step()
        for model, opt in zip((fsdp, ddp), opts):
            _backward(model, batches[rank], mean=True)
            opt.step()
    for what, model in (("fully_shard", fsdp), ("DDP", ddp.module)):
        _assert_params_close(model, single, f"SyncBatchNorm under {what}:")
        for key, buffer in single[1].named_buffers():
            torch.testing.assert_close(getattr(model[1], key), buffer, **TOL)


from dtensor_sr_checks import pure_bf16_under_fully_shard  # noqa: E402  (uses the helpers above)

CHECKS = {
    "fully_shard_follows_torch": (fully_shard_follows_torch, (2, 4)),
    "tensor_parallel_follows_torch": (tensor_parallel_follows_torch, (2, 4)),
    "fsdp_x_tp_follows_torch": (fsdp_x_tp_follows_torch, (4,)),
    "hsdp_follows_torch": (hsdp_follows_torch, (4,)),
    "mixed_dtensor_and_plain_parameters": (mixed_dtensor_and_plain_parameters, (2, 4)),
    "partial_gradients": (partial_gradients, (2,)),
    "misuse_raises_clear_errors": (misuse_raises_clear_errors, (2,)),
    "one_all_reduce_per_sharding_group": (one_all_reduce_per_sharding_group, (2, 4)),
    "checkpoint_resumes_and_loads_into_torch": (checkpoint_resumes_and_loads_into_torch, (2, 4)),
    "sync_batch_norm_under_fsdp2_and_ddp": (sync_batch_norm_under_fsdp2_and_ddp, (2,)),
    "pure_bf16_under_fully_shard": (pure_bf16_under_fully_shard, (2, 4)),
}
