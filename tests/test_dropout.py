"""Fused dropout through the public API, every backend against the reference (bit-exact masks)
and against PyTorch's dropout contract (statistics, gradients, edge cases, modules, compile)."""
import pytest
import torch
import torch.nn.functional as F

import fusedreg
from conftest import native_backends
from fusedreg.reference import dropout as ref

PAIRS = ([("cpu", b) for b in ["reference"] + native_backends("cpu")]
         + [("cuda", b) for b in native_backends("cuda")])
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _seeded(device, seed=1234):
    return torch.Generator(device=device).manual_seed(seed)


def _expected_seed(device, seed=1234):
    return fusedreg.ops.dropout.draw_seed(torch.device(device), _seeded(device, seed))


def _inputs(device, dtype, kind, shape=(6, 7, 5, 11)):
    x = torch.randn(shape, device=device).to(dtype)
    if kind == "channels_last":
        return x.to(memory_format=torch.channels_last)
    if kind == "permuted":
        return x.permute(2, 0, 3, 1)
    if kind == "sliced":
        return x[:, 1:6:2, :, 3:]
    return x


@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["contiguous", "channels_last", "permuted", "sliced"])
@pytest.mark.parametrize("p", [0.0, 0.3, 1.0])
def test_matches_reference_bit_for_bit(device, backend, dtype, kind, p):
    x = _inputs(device, dtype, kind)
    y = fusedreg.dropout(x, p, generator=_seeded(device), backend=backend)
    expected = ref.dropout_fwd(x, _expected_seed(device), p)
    assert y.stride() == expected.stride() == torch.empty_like(x).stride()
    assert torch.equal(y, expected)
    assert not torch.isnan(y).any()


@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("p", [0.2, 0.5, 0.8])
@pytest.mark.parametrize("kind", ["contiguous", "permuted", "sliced"])
def test_statistics_like_torch(device, backend, p, kind):
    x = torch.ones(96, 64, 33, device=device)
    x = x.permute(2, 0, 1) if kind == "permuted" else x[:, ::2, 1:] if kind == "sliced" else x
    y = fusedreg.dropout(x, p, backend=backend)
    kept = y != 0
    assert abs(kept.float().mean().item() - (1 - p)) < 0.01
    assert torch.equal(y[kept], torch.full_like(y[kept], 1 / (1 - p)))
    assert abs(y.mean().item() - 1.0) < 0.05


@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["contiguous", "channels_last"])
def test_gradient_is_dy_times_mask_over_keep_prob(device, backend, dtype, kind):
    p = 0.4
    x = _inputs(device, dtype, kind).requires_grad_()
    y = fusedreg.dropout(x, p, generator=_seeded(device), backend=backend)
    dy = torch.randn(y.shape, device=device).to(dtype)  # contiguous: a layout other than y's
    (y * dy).sum().backward()
    mask = ref.dropout_mask(x, _expected_seed(device), p)
    expected = (dy.float() * mask * torch.tensor(1 / (1 - p), dtype=torch.float32)).to(dtype)
    assert torch.equal(x.grad, expected)


@pytest.mark.parametrize("device,backend", PAIRS)
def test_saves_only_the_seed(device, backend):
    x = torch.randn(1000, device=device, requires_grad=True)
    y = fusedreg.dropout(x, 0.5, backend=backend)
    saved = y.grad_fn.saved_tensors
    assert len(saved) == 1 and saved[0].numel() == 1 and saved[0].dtype == torch.int64


@pytest.mark.parametrize("device,backend", PAIRS)
def test_inplace(device, backend):
    x = torch.randn(5, 9, device=device)
    expected = ref.dropout_fwd(x, _expected_seed(device), 0.3)
    leaf = x.clone().requires_grad_()
    work = leaf * 1.0
    out = fusedreg.dropout(work, 0.3, inplace=True, generator=_seeded(device), backend=backend)
    assert out is work and torch.equal(work, expected)
    out.sum().backward()
    assert torch.equal(leaf.grad, (expected != 0).float() / 0.7)


@pytest.mark.parametrize("device,backend", PAIRS)
def test_edge_cases(device, backend):
    x = torch.randn(4, 3, device=device, requires_grad=True)
    assert fusedreg.dropout(x, 0.5, training=False, backend=backend) is x
    y = fusedreg.dropout(x, 1.0, backend=backend)
    y.sum().backward()
    assert torch.equal(y, torch.zeros_like(y)) and torch.equal(x.grad, torch.zeros_like(x))
    assert torch.equal(fusedreg.dropout(x, 0.0, backend=backend), x)
    empty = torch.empty(0, 3, device=device, requires_grad=True)
    out = fusedreg.dropout(empty, 0.5, backend=backend)
    out.sum().backward()
    assert out.shape == (0, 3) and empty.grad.shape == (0, 3)
    inf = torch.full((64,), float("inf"), device=device)
    assert not torch.isnan(fusedreg.dropout(inf, 0.5, backend=backend)).any()
    if backend != "triton":  # float64 as PyTorch allows it
        x64 = torch.randn(33, device=device, dtype=torch.float64)
        assert torch.equal(fusedreg.dropout(x64, 0.5, generator=_seeded(device), backend=backend),
                           ref.dropout_fwd(x64, _expected_seed(device), 0.5))


@pytest.mark.parametrize("p", [-0.1, 1.5])
def test_invalid_p_raises_like_torch(p):
    x = torch.randn(3)
    with pytest.raises(ValueError, match="between 0 and 1"):
        F.dropout(x, p)
    with pytest.raises(ValueError, match="between 0 and 1"):
        fusedreg.dropout(x, p)
    with pytest.raises(ValueError, match="between 0 and 1"):
        fusedreg.nn.Dropout(p)


@pytest.mark.parametrize("device,backend", PAIRS)
def test_rng_reproducible_and_fresh(device, backend):
    x = torch.randn(4096, device=device)
    torch.manual_seed(7)
    a, b = fusedreg.dropout(x, backend=backend), fusedreg.dropout(x, backend=backend)
    torch.manual_seed(7)
    assert torch.equal(a, fusedreg.dropout(x, backend=backend))
    assert not torch.equal(a, b)


def test_module_is_a_drop_in():
    torch_module, module = torch.nn.Dropout(0.25, inplace=True), fusedreg.nn.Dropout(0.25, inplace=True)
    assert isinstance(module, torch.nn.Dropout)
    assert repr(module) == repr(torch_module)
    assert module.state_dict().keys() == torch_module.state_dict().keys()
    x = torch.randn(8, 8)
    module.eval()
    assert module(x) is x
    module.train()
    y = fusedreg.nn.Dropout(0.25)(x)
    assert ((y == 0) | torch.isclose(y, x / 0.75)).all()


@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_dropout_add(device, backend, dtype, with_bias):
    p = 0.35
    x = torch.randn(7, 3, 13, device=device).to(dtype).requires_grad_()
    residual = torch.randn(7, 3, 13, device=device).to(dtype).requires_grad_()
    bias = torch.randn(13, device=device).to(dtype).requires_grad_() if with_bias else None
    y = fusedreg.dropout_add(x, residual, p, bias=bias, generator=_seeded(device), backend=backend)
    seed = _expected_seed(device)
    assert torch.equal(y, ref.dropout_add_fwd(x, residual, bias, seed, p))
    dy = torch.randn_like(y)
    y.backward(dy)
    mask = ref.dropout_mask(x, seed, p)
    grad_x = (dy.float() * mask * torch.tensor(1 / (1 - p))).to(dtype)
    assert torch.equal(x.grad, grad_x) and torch.equal(residual.grad, dy)
    if with_bias:
        torch.testing.assert_close(bias.grad, grad_x.float().sum((0, 1)).to(dtype))
    eval_out = fusedreg.dropout_add(x, residual, p, training=False, bias=bias, backend=backend)
    assert torch.equal(eval_out, residual + (x if bias is None else x + bias))


def test_dropout_add_rejects_bad_shapes():
    x = torch.randn(4, 5)
    with pytest.raises((ValueError, RuntimeError), match="residual"):
        fusedreg.dropout_add(x, torch.randn(4, 6))
    with pytest.raises((ValueError, RuntimeError), match="bias"):
        fusedreg.dropout_add(x, x, bias=torch.randn(4))


class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(16, 16)
        self.drop = fusedreg.nn.Dropout(0.3)

    def forward(self, x):
        return fusedreg.dropout_add(self.drop(self.linear(x)), x, 0.2, bias=self.linear.bias)


def test_compile_fullgraph_no_graph_break():
    torch.manual_seed(0)
    block = _Block()
    compiled = torch.compile(block, fullgraph=True)
    x = torch.randn(32, 16, requires_grad=True)
    y = compiled(x)
    y.sum().backward()
    assert y.shape == x.shape and x.grad is not None and block.linear.weight.grad is not None
    # the compiled path runs the same fused ops: kept outputs of the first dropout are scaled
    h = fusedreg.nn.Dropout(0.3)(torch.ones(4096))
    assert set(torch.unique(compiled.drop(torch.ones(4096))).tolist()) <= {0.0, float(h.max())}


@pytest.mark.gpu
@pytest.mark.parametrize("backend", native_backends("cuda") or ["cuda"])
def test_cuda_graph_replay_draws_fresh_masks(backend):
    x = torch.ones(1 << 16, device="cuda")
    static_out = torch.empty_like(x)
    fusedreg.dropout(x, 0.5, backend=backend)  # warm up: build, autotune, allocate
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out.copy_(fusedreg.dropout(x, 0.5, backend=backend))
    graph.replay()
    first = static_out.clone()
    graph.replay()
    assert not torch.equal(first, static_out)
    assert abs((static_out != 0).float().mean().item() - 0.5) < 0.01


@pytest.mark.gpu
@pytest.mark.huge
@pytest.mark.parametrize("backend", native_backends("cuda") or ["cuda"])
def test_more_than_2_31_elements(backend):
    from fusedreg.reference.philox import dropout_threshold, philox4x32

    n = 2**31 + 4099
    x = torch.ones(n, device="cuda", dtype=torch.bfloat16)
    y = fusedreg.dropout(x, 0.5, generator=_seeded("cuda"), backend=backend)
    seed = int(_expected_seed("cuda").item()) & (2**64 - 1)
    tail = torch.arange(n - 4096, n, device="cuda")
    groups = tail // 4
    counter = torch.stack([groups & 0xFFFFFFFF, groups >> 32, groups * 0, groups * 0], -1)
    key = torch.tensor([seed & 0xFFFFFFFF, seed >> 32], device="cuda").expand(len(groups), 2)
    words = philox4x32(counter, key).gather(1, (tail % 4)[:, None]).squeeze(1)
    assert torch.equal(y[tail] != 0, words >= dropout_threshold(0.5))


_SIZE_ONE_LAST_DIM = r"""
import sys
import torch
from fusedreg.ops.dropout import DropoutAddFunction
from fusedreg.reference import dropout as ref

device, backend = sys.argv[1], sys.argv[2]
for shape, stride in [((4, 1), (1, 0)), ((3, 5, 1), (5, 1, 0)), ((2, 3, 1), (3, 1, 7))]:
    x = torch.randn(15, device=device).as_strided(shape, stride)
    residual = torch.randn(shape, device=device)
    bias = torch.randn(1, device=device, requires_grad=True)
    x.requires_grad_(True)
    seed = torch.tensor([987654321], device=device)
    ours = DropoutAddFunction.apply(x, residual, bias, 0.5, seed, backend)
    oracle = DropoutAddFunction.apply(x, residual, bias, 0.5, seed, "reference")
    assert torch.equal(ours, oracle), (shape, stride, ours, oracle)
    # torch's residual + F.dropout(x + bias) under the same mask
    keep = ref.dropout_mask(x, seed, 0.5)
    torch.testing.assert_close(oracle, residual + torch.where(keep, (x + bias) * 2.0, 0.0))
    grad_x, grad_b = torch.autograd.grad(ours, (x, bias), torch.ones_like(ours))
    assert torch.equal(grad_x, torch.where(keep, 2.0, 0.0)), grad_x
    torch.testing.assert_close(grad_b, grad_x.sum().reshape(1))
print("ok")
"""


@pytest.mark.parametrize("device,backend", PAIRS)
def test_dropout_add_bias_over_size_one_last_dim_of_any_stride(device, backend):
    """A size-1 last dim may have stride 0 (a dense broadcast view): the bias index must not divide
    by it. Run in a child process: the CPU kernel used to die of SIGFPE there."""
    import subprocess
    import sys

    child = subprocess.run([sys.executable, "-c", _SIZE_ONE_LAST_DIM, device, backend],
                           capture_output=True, text=True, timeout=600)
    assert child.returncode == 0 and child.stdout.strip().endswith("ok"), (
        f"exit code {child.returncode}\n{child.stdout[-2000:]}\n{child.stderr[-4000:]}")


_FIRST_USE_IN_CAPTURE = r"""
import sys
import torch
import fusedreg
from fusedreg import _backend
from fusedreg.ops.dropout import DropoutAddFunction

backend = sys.argv[1]
_backend.select(torch.device("cuda"), backend)  # load the library (or import Triton) first
x = torch.randn(3, 1 << 16, device="cuda")
residual = torch.randn_like(x)
bias = torch.randn(1 << 16, device="cuda")
seed = torch.tensor([12345], device="cuda")
graph = torch.cuda.CUDAGraph()
with torch.cuda.graph(graph):  # the launchers' first use on this device
    y = fusedreg.DropoutFunction.apply(x, 0.3, seed, backend, False)
    z = DropoutAddFunction.apply(x, residual, bias, 0.3, seed, backend)
graph.replay()
torch.cuda.synchronize()
assert torch.equal(y, fusedreg.DropoutFunction.apply(x, 0.3, seed, "reference", False))
assert torch.equal(z, DropoutAddFunction.apply(x, residual, bias, 0.3, seed, "reference"))
print("ok")
"""


@pytest.mark.gpu
def test_cuda_first_launch_inside_cuda_graph_capture():
    """The CUDA launcher's first use queries the device (SMs, occupancy) inside the capture: only
    capture-safe queries may run there. A fresh process, so nothing is cached yet. (The Triton
    backend compiles and loads its kernel on first use, which belongs before a capture.)"""
    import subprocess
    import sys

    child = subprocess.run([sys.executable, "-c", _FIRST_USE_IN_CAPTURE, "cuda"],
                           capture_output=True, text=True, timeout=600)
    assert child.returncode == 0 and child.stdout.strip().endswith("ok"), (
        f"exit code {child.returncode}\n{child.stdout[-2000:]}\n{child.stderr[-4000:]}")
