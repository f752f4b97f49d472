"""get_total_norm / clip_grad_norm_ with process_group=: two processes on the gloo backend (CPU), each
holding a shard of one gradient list (one tensor split between them), must both get the norm of the
full list and clip their shards exactly as the full list would be clipped."""
import datetime
import math

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import native_backends
from fusedreg import _build

WORLD_SIZE = 2
NORM_TYPES = [2.0, 1.0, math.inf, 3.0]
MAX_NORM = 0.5


def _full_grads():
    gen = torch.Generator().manual_seed(0)
    shapes = [(7, 13), (101,), (3, 5), (64,), (1,)]
    return [torch.randn(s, generator=gen, dtype=torch.float64).float() for s in shapes]


def _shard(grads, rank):
    """Rank 0 holds tensors 0, 1 and the first 30 elements of tensor 3; rank 1 the rest."""
    if rank == 0:
        return [grads[0], grads[1], grads[3][:30]]
    return [grads[2], grads[3][30:], grads[4]]


def _full_norm(grads, norm_type):
    return torch.linalg.vector_norm(torch.cat([g.double().reshape(-1) for g in grads]), norm_type)


def _params(grads):
    params = []
    for g in grads:
        p = torch.nn.Parameter(torch.zeros_like(g))
        p.grad = g.clone()
        params.append(p)
    return params


def _worker(rank, init_method, backends):
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=WORLD_SIZE,
                            timeout=datetime.timedelta(seconds=60))
    try:
        import fusedreg

        group = dist.group.WORLD
        full = _full_grads()
        for backend in backends:
            for norm_type in NORM_TYPES:
                exact = _full_norm(full, norm_type)
                local = _shard(full, rank)
                norm = fusedreg.get_total_norm(local, norm_type, process_group=group, backend=backend)
                assert norm.dtype == torch.float32
                torch.testing.assert_close(norm, exact.float(), atol=0, rtol=1e-5)
                # the local norm alone is smaller: the all-reduce did something
                assert fusedreg.get_total_norm(local, norm_type, backend=backend) < norm or norm_type == math.inf

                params = _params(local)
                clipped_norm = fusedreg.clip_grad_norm_(params, MAX_NORM, norm_type, process_group=group,
                                                        backend=backend)
                assert torch.equal(clipped_norm, norm)
                coef = min(1.0, MAX_NORM / (exact.item() + 1e-6))
                expected = _shard([g.double() * coef for g in full], rank)
                for p, e in zip(params, expected):
                    torch.testing.assert_close(p.grad, e.float(), atol=1e-7, rtol=1e-5)

            # a process without gradients still takes part in the all-reduce
            local = _shard(full, 0) if rank == 0 else []
            for norm_type in (2.0, math.inf):
                norm = fusedreg.clip_grad_norm_(_params(local), MAX_NORM, norm_type, process_group=group,
                                                backend=backend)
                torch.testing.assert_close(norm, _full_norm(_shard(full, 0), norm_type).float(), atol=0, rtol=1e-5)

            # a NaN on one process reaches every process, for the sum and for the max
            local = [g.clone() for g in _shard(full, rank)]
            if rank == 1:
                local[0][1, 2] = math.nan
            for norm_type in (2.0, math.inf):
                norm = fusedreg.get_total_norm(local, norm_type, process_group=group, backend=backend)
                assert torch.isnan(norm), (rank, norm_type, norm)
                try:
                    fusedreg.clip_grad_norm_(_params(local), MAX_NORM, norm_type, error_if_nonfinite=True,
                                             process_group=group, backend=backend)
                except RuntimeError as error:
                    assert "non-finite" in str(error)
                else:
                    raise AssertionError(f"rank {rank}: error_if_nonfinite did not raise")
    finally:
        dist.destroy_process_group()


def test_sharded_gradients_clip_by_the_global_norm(tmp_path):
    # The all-reduce sits between the kernels and the root, the same for every backend: the
    # reference and the C++ CPU kernels cover it (Triton would only add its interpreter's start-up).
    backends = ["reference"] + [b for b in native_backends("cpu") if b == "cpu"]
    if "cpu" in backends:
        _build.load_library("cpu")  # build here, if needed, rather than in both workers at once
    mp.spawn(_worker, args=(f"file://{tmp_path / 'init'}", backends), nprocs=WORLD_SIZE, join=True)
