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


# ----------------------------------------------------------------------------- CUDA kernel bookkeeping

_HOST_HARNESS = r"""
// Host build of the CUDA launcher's integer logic (csrc/dropout.h, csrc/common/philox.h).
#include <cstdio>
#include <iostream>
#include <vector>

#include "dropout.h"

using namespace fusedreg;

static int failures = 0;
#define EXPECT(cond, ...) do { if (!(cond)) { ++failures; std::printf("FAIL %d: ", __LINE__); \
    std::printf(__VA_ARGS__); std::printf("\n"); } } while (0)

// Cursors carried along (next) and jumped (advance) agree with (i / stride) % size.
template <typename index_t>
void check_cursor(int64_t start, int64_t stride, int64_t size, int64_t jump, int steps) {
  BiasCursor<index_t> walk = BiasCursor<index_t>::at(start, stride, size), hop = walk;
  const auto s = static_cast<index_t>(stride), z = static_cast<index_t>(size);
  for (int k = 1; k <= steps; ++k) {
    walk.next(s, z);
    const int64_t i = start + k;
    EXPECT(walk.r == static_cast<index_t>(i % stride) && walk.b == static_cast<index_t>((i / stride) % size),
           "next: start %lld stride %lld size %lld step %d", (long long)start, (long long)stride,
           (long long)size, k);
    hop.advance(static_cast<index_t>(jump % stride), static_cast<index_t>((jump / stride) % size), s, z);
    const int64_t j = start + k * jump;
    EXPECT(hop.r == static_cast<index_t>(j % stride) && hop.b == static_cast<index_t>((j / stride) % size),
           "advance: start %lld stride %lld size %lld jump %lld step %d", (long long)start,
           (long long)stride, (long long)size, (long long)jump, k);
  }
}

int main() {
  // Philox with the round keys derived once gives the words of the per-call version.
  for (uint64_t key : {0ull, 1ull, 0x0123456789ABCDEFull, ~0ull}) {
    const PhiloxKeys keys = philox_keys(key);
    for (uint64_t group : {0ull, 1ull, 12345ull, (1ull << 32) - 1, 1ull << 32, (5ull << 32) + 77, ~0ull}) {
      const Philox4x32Words a = dropout_group_words(key, group), b = dropout_group_words(keys, group);
      for (int k = 0; k < 4; ++k) {
        EXPECT(a.w[k] == b.w[k], "philox key %llx group %llx", (unsigned long long)key, (unsigned long long)group);
      }
    }
  }
  // 32-bit cursors up to stride, size < 2**31 (the plan's limit), jumps up to a grid step.
  const int64_t big = (int64_t{1} << 31) - 1;
  for (int64_t stride : {int64_t{1}, int64_t{3}, int64_t{7}, int64_t{4096}, big}) {
    for (int64_t size : {int64_t{1}, int64_t{2}, int64_t{13}, int64_t{1000}, big}) {
      for (int64_t jump : {int64_t{8}, int64_t{2162688}, big - 5}) {
        for (int64_t start : {int64_t{0}, int64_t{5}, int64_t{1} << 33, stride * size - 1}) {
          check_cursor<uint32_t>(start, stride, size, jump, 40);
          check_cursor<int64_t>(start, stride, size, jump, 40);
        }
      }
    }
  }
  check_cursor<int64_t>(int64_t{3} << 40, int64_t{1} << 33, int64_t{5} << 31, int64_t{1} << 35, 40);
  // Segments: disjoint, covering, chunks inside, group words without a carry.
  for (int64_t n : {int64_t{1}, int64_t{4099}, (int64_t{1} << 31) - 1, int64_t{1} << 31,
                    (int64_t{1} << 31) + 4101, (int64_t{1} << 34) + 4101, int64_t{40} << 31}) {
    for (int64_t lead : {0, 1, 3, 4, 7}) {
      int64_t next = 0;
      for (int64_t base = 0; base < n; base += kDropoutSegment) {
        const DropoutSegment seg = dropout_segment(n, lead, 8, base);
        EXPECT(seg.base == next && seg.count > 0 && seg.count <= kDropoutSegment, "segment %lld", (long long)base);
        EXPECT(seg.lead == std::min(lead, seg.count) && (seg.body_end - seg.lead) % 8 == 0 &&
               seg.body_end <= seg.count && seg.count - seg.body_end < 8, "segment chunks %lld", (long long)base);
        const uint64_t first = (static_cast<uint64_t>(seg.group_hi) << 32) | seg.group_lo;
        EXPECT(first == static_cast<uint64_t>(base) / 4, "segment group %lld", (long long)base);
        EXPECT(uint64_t{seg.group_lo} + uint64_t(seg.count - 1) / 4 < (uint64_t{1} << 32), "carry %lld",
               (long long)base);
        next = base + seg.count;
      }
      EXPECT(next == n, "coverage n %lld", (long long)n);
    }
  }
  // Plans for the cases the test lists on stdin: elem_size chunk n offsets... bias stride size.
  long long elem, chunk, n, count;
  while (std::cin >> elem >> chunk >> n >> count) {
    std::vector<uintptr_t> streamed;
    for (long long k = 0, off; k < count && std::cin >> off; ++k) streamed.push_back(uintptr_t{1} << 20 | off);
    long long bias_off, stride, size;
    std::cin >> bias_off >> stride >> size;
    const uintptr_t bias = bias_off < 0 ? 0 : (uintptr_t{1} << 21) | bias_off;
    DropoutPlan plan;
    if (count == 2) plan = plan_dropout_cuda({streamed[0], streamed[1]}, elem, chunk, n, bias, stride, size);
    else plan = plan_dropout_cuda({streamed[0], streamed[1], streamed[2]}, elem, chunk, n, bias, stride, size);
    std::printf("plan %d %lld %d\n", static_cast<int>(plan.path), static_cast<long long>(plan.lead),
                plan.bias_rows ? 1 : 0);
  }
  std::printf(failures ? "failures %d\n" : "ok\n", failures);
  return failures != 0;
}
"""

# (bytes per element, chunk, n, byte offsets of the streamed operands from a 16-byte boundary,
#  bias byte offset (-1: none), bias stride, bias size) -> (path, lead, bias rows);
# path 0 fast, 1 vector, 2 scalar (DropoutPath).
_PLANS = [
    ((2, 8, 1000, (0, 0), -1, 1, 1), (0, 0, 0)),           # aligned bf16
    ((2, 8, 1000, (2, 2), -1, 1, 1), (1, 7, 0)),           # 1 element off: 7 to peel, chunks straddle
    ((2, 8, 1000, (4, 4), -1, 1, 1), (1, 6, 0)),           # 2 elements off
    ((2, 8, 1000, (6, 6), -1, 1, 1), (1, 5, 0)),           # 3 elements off
    ((2, 8, 1000, (8, 8), -1, 1, 1), (0, 4, 0)),           # 4 elements off: chunks on group starts
    ((2, 8, 3, (2, 2), -1, 1, 1), (1, 3, 0)),              # fewer elements than the peel
    ((2, 8, 1000, (0, 2), -1, 1, 1), (2, 0, 0)),           # x and out at different offsets
    ((4, 8, 1000, (4, 4), -1, 1, 1), (1, 3, 0)),           # fp32, 1, 2, 3 elements off
    ((4, 8, 1000, (8, 8), -1, 1, 1), (1, 2, 0)),
    ((4, 8, 1000, (12, 12), -1, 1, 1), (1, 1, 0)),
    ((8, 4, 1000, (8, 8), -1, 1, 1), (1, 1, 0)),           # fp64, 1 element off
    ((8, 4, 1000, (0, 8), -1, 1, 1), (2, 0, 0)),
    ((2, 8, 1000, (0, 0, 0), 0, 1, 64), (0, 0, 1)),        # bias rows: a whole number of chunks
    ((2, 8, 1000, (0, 0, 0), 0, 1, 13), (1, 0, 0)),        # rows that wrap inside a chunk
    ((2, 8, 1000, (0, 0, 0), 0, 5, 64), (1, 0, 0)),        # bias over a strided last dim
    ((2, 8, 1000, (0, 0, 0), 2, 1, 64), (1, 0, 0)),        # bias at an odd address
    ((2, 8, 1000, (0, 0, 0), 8, 1, 64), (0, 0, 1)),        # 8-byte aligned is enough
    ((2, 8, 1000, (8, 8, 8), 0, 1, 64), (1, 4, 0)),        # shared offset, but rows would wrap
    ((2, 8, 1000, (0, 0, 2), 0, 1, 64), (2, 0, 0)),        # residual at another offset
    ((2, 8, 1000, (0, 0, 0), 0, 2**31, 1), (2, 0, 0)),     # bias dims beyond 32-bit cursors
    ((4, 8, 1000, (0, 0, 0), 0, 1, 2**31), (2, 0, 0)),
]


@pytest.mark.build
def test_cuda_launch_bookkeeping_on_the_host(tmp_path):
    """The CUDA launcher's plan (kernel, peel), segments and bias cursors, built for the host."""
    import os
    import shutil
    import subprocess

    from torch.utils import cpp_extension

    from fusedreg import _build

    cxx = shutil.which(os.environ.get("CXX", "c++"))
    if cxx is None:
        pytest.skip("no C++ compiler")
    source = tmp_path / "harness.cpp"
    source.write_text(_HOST_HARNESS)
    libs = cpp_extension.library_paths()
    cmd = [cxx, "-std=c++20", "-O1", f"-I{_build.csrc_dir()}", *(f"-isystem{p}" for p in cpp_extension.include_paths()),
           str(source), "-o", str(tmp_path / "harness"), *(f"-L{p}" for p in libs),
           *(f"-Wl,-rpath,{p}" for p in libs), "-lc10", "-ltorch_cpu"]
    build = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-4000:]
    stdin = "".join(f"{e} {c} {n} {len(offs)} {' '.join(map(str, offs))} {b} {s} {z}\n"
                    for (e, c, n, offs, b, s, z), _ in _PLANS)
    run = subprocess.run([str(tmp_path / "harness")], input=stdin, capture_output=True, text=True, timeout=600)
    lines = run.stdout.split("\n")
    assert run.returncode == 0 and lines[-2] == "ok", run.stdout[-4000:] + run.stderr[-2000:]
    plans = [tuple(map(int, line.split()[1:])) for line in lines if line.startswith("plan ")]
    assert plans == [expected for _, expected in _PLANS]
    for ((elem, _, n, offs, *_), (path, lead, _)) in _PLANS:  # the peel reaches a 16-byte boundary
        if path != 2 and lead < n:
            assert all((off + lead * elem) % 16 == 0 for off in offs)


# ----------------------------------------------------------------------------- GPU: CUDA kernel variants

_CUDA_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
_SEED = 0x1234_5678_9ABC
# More elements than one grid-stride step of the CUDA kernels moves on an H200 (132 SMs x 2048
# threads x 8 elements): every thread runs several iterations.
_SEVERAL_STEPS = 132 * 2048 * 8 * 3 + 5


def _cuda_ops():
    from fusedreg import _build

    _build.load_library("cuda")
    return torch.ops.fusedreg


def _bits(t):
    return t.contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _assert_same_bits(actual, expected):
    """Bit for bit (+0 is not -0); randn data has no NaNs, whose payload is unspecified."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    assert actual.stride() == expected.stride(), (actual.stride(), expected.stride())
    differ = _bits(actual) != _bits(expected)
    assert not differ.any(), f"{int(differ.sum())} of {actual.numel()} elements differ"


@pytest.mark.gpu
@pytest.mark.parametrize("offset", [1, 2, 3])
@pytest.mark.parametrize("dtype", _CUDA_DTYPES, ids=str)
def test_gpu_cuda_misaligned_views_bit_exact(dtype, offset):
    """Dense views starting 1-3 elements past a 16-byte boundary. Out of place, x and the fresh
    output sit at different offsets (element-wise kernel); in place, they share one (a peeled head,
    then 16-byte chunks that straddle Philox groups). Odd sizes, sizes below the peel, several
    grid-stride steps; nothing outside the view is touched."""
    ops = _cuda_ops()
    seed = torch.tensor([_SEED], dtype=torch.int64, device="cuda")
    for n in [1, 2, 3, 5, 7, 8, 9, 15, 17, 4099, _SEVERAL_STEPS]:
        for p in (0.0, 0.3, 1.0):
            base = torch.randn(n + offset + 5, device="cuda").to(dtype)
            x = base[offset:offset + n]
            expected = ref.dropout_fwd(x, seed, p)
            _assert_same_bits(ops.dropout_fwd(x, seed, p), expected)
            _assert_same_bits(ops.dropout_bwd(x, seed, p), expected)
            outside = torch.cat([base[:offset], base[offset + n:]]).clone()
            ops.dropout_fwd_(x, seed, p)
            _assert_same_bits(x, expected)
            assert torch.equal(torch.cat([base[:offset], base[offset + n:]]), outside), (n, p)
    rows = torch.randn(4 * 131 + offset, device="cuda").to(dtype)[offset:].view(4, 131)  # 2-D view
    expected = ref.dropout_fwd(rows, seed, 0.5)
    ops.dropout_fwd_(rows, seed, 0.5)
    _assert_same_bits(rows, expected)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", _CUDA_DTYPES, ids=str)
def test_gpu_cuda_dropout_add_bias_layouts_bit_exact(dtype):
    """Bias rows a whole number of chunks long (read per chunk) and not (13, 1001, 1003: rows wrap
    inside chunks), a bias over a strided last dim (channels_last), a bias at an odd address, input
    and residual at an odd offset; small, odd and several-grid-step sizes; p = 0, 0.3, 1."""
    ops = _cuda_ops()
    seed = torch.tensor([_SEED], dtype=torch.int64, device="cuda")
    cases = [((7, 9, 64), None, 0, 0), ((7, 9, 13), None, 0, 0), ((3, 1001), None, 0, 0),
             ((5, 24), None, 1, 0), ((5, 24), None, 0, 1), ((1, 5), None, 0, 0),
             ((_SEVERAL_STEPS // 1600 + 1, 1600), None, 0, 0), ((_SEVERAL_STEPS // 1003 + 1, 1003), None, 0, 0),
             ((16, 24, 56, 57), torch.channels_last, 0, 0)]
    for shape, fmt, bias_offset, offset in cases:
        numel = torch.Size(shape).numel()
        for p in (0.0, 0.3, 1.0):
            x = torch.randn(numel + offset, device="cuda").to(dtype)[offset:].view(shape)
            residual = torch.randn(numel + offset, device="cuda").to(dtype)[offset:].view(shape)
            if fmt is not None:
                x = x.to(memory_format=fmt)
            bias = torch.randn(shape[-1] + bias_offset, device="cuda").to(dtype)[bias_offset:]
            for b in (bias, None):
                args = (x, residual, b, seed, p)
                _assert_same_bits(ops.dropout_add_fwd(*args), ref.dropout_add_fwd(*args))


@pytest.mark.gpu
@pytest.mark.huge
def test_gpu_cuda_misaligned_in_place_across_launch_segments():
    """2**31 + 4101 bfloat16 elements in place, one element past a 16-byte boundary: two launches
    of 32-bit indices, each with a peeled head and straddling chunks. Checked at both ends and
    around element 2**31, where the second launch starts."""
    from fusedreg.reference.philox import dropout_threshold, philox4x32

    ops = _cuda_ops()
    n, p, seed_value = 2**31 + 4101, 0.5, 0x0123_4567_89AB_CDEF
    base = torch.ones(n + 1, dtype=torch.bfloat16, device="cuda")
    ops.dropout_fwd_(base[1:], torch.tensor([seed_value], device="cuda"), p)
    for start in (0, 2**31 - 4096, n - 4101):
        i = torch.arange(start, start + 4101, device="cuda")
        groups = i // 4
        counter = torch.stack([groups & 0xFFFFFFFF, groups >> 32, groups * 0, groups * 0], -1)
        key = torch.tensor([seed_value & 0xFFFFFFFF, seed_value >> 32], device="cuda").expand(len(i), 2)
        keep = philox4x32(counter, key).gather(1, (i % 4)[:, None]).squeeze(1) >= dropout_threshold(p)
        expected = torch.where(keep, 2.0, 0.0).to(torch.bfloat16)
        assert torch.equal(base[1:][start:start + 4101], expected), start
    assert base[0].item() == 1.0
