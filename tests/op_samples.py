"""Sample arguments for every op in fusedreg._library.SCHEMAS, used by opcheck and fake-kernel tests.

Each factory takes (device, dtype) and returns a list of argument tuples. Shapes are small and odd
on purpose. An op without an entry here fails test_every_schema_has_samples.
"""
import torch


def _seed(device):
    return torch.tensor([0x1234_5678_9ABC], dtype=torch.int64, device=device)


def _dense(shape, device, dtype, channels_last=False):
    x = torch.randn(shape, device=device, dtype=torch.float32).to(dtype)
    return x.to(memory_format=torch.channels_last) if channels_last else x


def dropout_fwd(device, dtype):
    return [(_dense((3, 5, 7), device, dtype), _seed(device), 0.3),
            (_dense((2, 3, 4, 5), device, dtype, channels_last=True), _seed(device), 0.5)]


def dropout_fwd_(device, dtype):
    return dropout_fwd(device, dtype)


def dropout_bwd(device, dtype):
    return dropout_fwd(device, dtype)


def dropout_add_fwd(device, dtype):
    x, r, b = (_dense((4, 13), device, dtype), _dense((4, 13), device, dtype), _dense((13,), device, dtype))
    return [(x, r, b, _seed(device), 0.2), (x, r, None, _seed(device), 0.2)]


def _tensor_lists(device, dtype, sizes=(7, 1, 33)):
    return [_dense((n,), device, dtype) for n in sizes]


def adamw_step_(device, dtype):
    params = _tensor_lists(device, dtype)
    grads, m, v = (_tensor_lists(device, dtype) for _ in range(3))
    v = [t.abs() for t in v]
    steps = [torch.tensor(3.0, device=device) for _ in params]
    hparams = torch.tensor([[1e-3, 0.9, 0.999, 1e-2, 1e-8]] * len(params), device=device, dtype=torch.float64)
    one = torch.ones(1, device=device)
    return [(params, grads, m, v, [], steps, hparams, False, False, None, None, None),
            (params, grads, m, v, [t.clone() for t in v], steps, hparams, True, True, one * 2,
             torch.zeros(1, device=device), one * 0.5)]


def grad_norm_pow(device, dtype):
    return [(_tensor_lists(device, dtype), 2.0), (_tensor_lists(device, dtype), float("inf"))]


def multi_tensor_scale_(device, dtype):
    return [(_tensor_lists(device, dtype), torch.tensor(0.25, device=device))]


def batch_norm_fwd(device, dtype):
    c = 3
    w, b = torch.randn(c, device=device), torch.randn(c, device=device)
    rm, rv = torch.zeros(c, device=device), torch.ones(c, device=device)
    x = _dense((4, c, 5, 2), device, dtype)
    return [(x, w, b, rm, rv, True, 0.1, 1e-5), (x, None, None, None, None, True, 0.1, 1e-5),
            (x, w, b, rm, rv, False, 0.1, 1e-5)]


def batch_norm_bwd(device, dtype):
    c = 3
    x = _dense((4, c, 5), device, dtype)
    mean, invstd = torch.randn(c, device=device), torch.rand(c, device=device) + 0.5
    return [(torch.randn_like(x), x, torch.randn(c, device=device), mean, invstd, True),
            (torch.randn_like(x), x, None, mean, invstd, False)]


def batch_norm_stats(device, dtype):
    return [(_dense((4, 3, 5, 2), device, dtype),), (_dense((6, 5), device, dtype),)]


def batch_norm_elemt(device, dtype):
    c = 3
    x = _dense((4, c, 5), device, dtype)
    mean, invstd = torch.randn(c, device=device), torch.rand(c, device=device) + 0.5
    return [(x, torch.randn(c, device=device), torch.randn(c, device=device), mean, invstd),
            (x, None, None, mean, invstd)]


def batch_norm_bwd_reduce(device, dtype):
    x = _dense((4, 3, 5), device, dtype)
    return [(torch.randn_like(x), x, torch.randn(3, device=device))]


def batch_norm_bwd_elemt(device, dtype):
    c = 3
    x = _dense((4, c, 5), device, dtype)
    stats = [torch.randn(c, device=device) for _ in range(4)]
    stats[1] = stats[1].abs() + 0.5
    return [(torch.randn_like(x), x, torch.randn(c, device=device), *stats),
            (torch.randn_like(x), x, None, *stats)]


def _philox4x32(device, dtype):
    g = torch.Generator().manual_seed(0)
    counter = torch.randint(0, 2**32, (9, 4), generator=g, dtype=torch.int64).to(device)
    key = torch.randint(0, 2**32, (9, 2), generator=g, dtype=torch.int64).to(device)
    return [(counter, key)]


def _multi_tensor_sumsq(device, dtype):
    return [(_tensor_lists(device, dtype, sizes=(5, 129, 2, 1000)),)]


SAMPLES = {name: globals()[name] for name in (
    "dropout_fwd", "dropout_fwd_", "dropout_bwd", "dropout_add_fwd", "adamw_step_", "grad_norm_pow",
    "multi_tensor_scale_", "batch_norm_fwd", "batch_norm_bwd", "batch_norm_stats", "batch_norm_elemt",
    "batch_norm_bwd_reduce", "batch_norm_bwd_elemt", "_philox4x32", "_multi_tensor_sumsq")}
