"""fusedreg on DTensor parameters (FSDP2's fully_shard, tensor parallelism): 2 and 4 gloo processes
on the CPU, each a twin of torch's clip_grad_norm_ + torch.optim.AdamW on the same sharded model.

One group of processes per world size runs every check (starting processes costs more than the
checks); each check records its outcome and the tests below report them one by one. The checks
live in dtensor_checks.py.
"""
import datetime
import json
import multiprocessing
import os
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

if not dist.is_available():
    pytest.skip("this torch is built without torch.distributed", allow_module_level=True)

import dtensor_checks  # noqa: E402
from fusedreg import _build  # noqa: E402


def _worker(rank, world_size, init_file, out_dir, backend):
    torch.set_num_threads(1)  # 2 or 4 processes share the machine's cores
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=60))
    outcomes = {}
    try:
        for name, (check, sizes) in dtensor_checks.CHECKS.items():
            if world_size not in sizes:
                continue
            try:
                check(rank, world_size, out_dir)
                outcomes[name] = None
            except Exception:  # recorded, reported by the test of that name
                outcomes[name] = traceback.format_exc()
            # after every check: a process that dies later (and takes the others down) loses nothing
            with open(os.path.join(out_dir, f"outcomes-{rank}.json"), "w") as f:
                json.dump(outcomes, f)
            dist.barrier()
    finally:
        dist.destroy_process_group()


def _run(world_size, out_dir):
    _build.load_library("cpu")  # build here, if needed, rather than in every worker at once
    # Not fork: once this process has run a compiled backward (other test files do), autograd in a
    # forked child refuses to run. A fork server imports torch and the checks once, in a fresh
    # process, and forks the workers from there (spawn would import torch in every worker).
    multiprocessing.get_context("forkserver").set_forkserver_preload(["dtensor_checks"])
    try:
        mp.start_processes(_worker, args=(world_size, str(out_dir / "init"), str(out_dir), "gloo"),
                           nprocs=world_size, join=True, start_method="forkserver")
    except Exception:  # a process died (a check left the others waiting in a collective): its outcomes stand
        crash = traceback.format_exc()
    else:
        crash = None
    outcomes = []
    for rank in range(world_size):
        path = out_dir / f"outcomes-{rank}.json"
        ranks = json.loads(path.read_text()) if path.exists() else {}
        if crash is not None:  # every check that failed or did not run gets the crash attached
            ranks = {name: None if ranks.get(name, "") is None else f"{ranks.get(name, 'did not run')}\n{crash}"
                     for name in dtensor_checks.CHECKS}
        outcomes.append(ranks)
    return outcomes


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    """world size -> per rank {check name: None or its traceback}, from one run of every check at
    that world size (made on first use)."""
    runs = {}

    def at(world_size):
        if world_size not in runs:
            runs[world_size] = _run(world_size, tmp_path_factory.mktemp(f"dtensor{world_size}"))
        return runs[world_size]
    return at


@pytest.mark.parametrize("world_size,name", [pytest.param(size, name, id=f"{size}ranks-{name}")
                                             for size in (2, 4)
                                             for name, (_, sizes) in dtensor_checks.CHECKS.items()
                                             if size in sizes])
def test_dtensor(outcomes, world_size, name):
    failures = [f"rank {rank}:\n{ranks.get(name, 'did not run')}"
                for rank, ranks in enumerate(outcomes(world_size)) if ranks.get(name, "") is not None]
    assert not failures, "\n".join(failures)


def _nccl_worker(rank, world_size, init_file, out_dir):
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=120))
    try:
        dtensor_checks.fully_shard_follows_torch(rank, world_size, out_dir, device="cuda")
        dtensor_checks.one_all_reduce_per_sharding_group(rank, world_size, out_dir, device="cuda")
    finally:
        dist.destroy_process_group()


@pytest.mark.gpu
def test_fully_shard_nccl(tmp_path):
    """The FSDP2 twin and collective-count checks over NCCL on CUDA tensors (the cuda backend's
    kernels on local shards), one GPU per process: two processes where there are two GPUs."""
    world_size = min(2, torch.cuda.device_count())
    mp.start_processes(_nccl_worker, args=(world_size, str(tmp_path / "init"), str(tmp_path)),
                       nprocs=world_size, join=True, start_method="spawn")
