"""csrc/common (checks, dispatch, vectors, reductions, multi-tensor apply) through the self-test op
fusedreg::_multi_tensor_sumsq: per-tensor float32 sum of squares, on the C++ CPU and CUDA kernels.

Against a float64 sum of the same values; bitwise determinism; bitwise independence of how the
chunk tables split the list into launches (a list's result for tensor i equals the result for
tensor i alone); argument errors that name the argument."""
import pytest
import torch

from fusedreg import _build

from conftest import TOLERANCES

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
DTYPES = {"cpu": [torch.float32, torch.float64, torch.float16, torch.bfloat16],
          "cuda": [torch.float32, torch.float16, torch.bfloat16]}
# The kernels chunk by 2048 elements; a depth-1 table holds 256 tensors and 23488 chunks.
CHUNK = 2048
ODD_SHAPES = [(0,), (1,), (7,), (CHUNK - 1,), (CHUNK,), (CHUNK + 1,), (3, 5, 7), (13, 0), (1, 1),
              (2 * CHUNK + 3,), (10007,), (4, 3, 33, 17)]


def sumsq(tensors):
    return torch.ops.fusedreg._multi_tensor_sumsq(tensors)


def reference(tensors):
    """float64 sums of the same (already rounded) values: exact up to the final fp32 rounding."""
    return torch.stack([(t.double() ** 2).sum() for t in tensors]).float().cpu()


@pytest.fixture(params=DEVICES)
def device(request):
    kind = request.param
    reason = _build.unbuildable_reason(kind)
    if reason:
        pytest.skip(reason)
    _build.load_library(kind)
    return kind


def assert_close_to_reference(out, tensors, dtype):
    # Every dtype accumulates in fp32 (float64 in float64), so the fp32 tolerance bounds them all.
    atol, rtol = TOLERANCES[torch.float64 if dtype == torch.float64 else torch.float32]
    assert out.dtype == torch.float32 and out.shape == (len(tensors),)
    torch.testing.assert_close(out.cpu(), reference(tensors), atol=atol, rtol=rtol)


def randn(shape, device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(device=device, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_sumsq_odd_shapes_match_float64(device, dtype):
    if dtype not in DTYPES[device]:
        pytest.skip(f"{device} kernel does not take {dtype}")
    tensors = [randn(s, device, dtype, seed=i) for i, s in enumerate(ODD_SHAPES)]
    assert_close_to_reference(sumsq(tensors), tensors, dtype)


def test_sumsq_more_tensors_than_one_table(device):
    sizes = torch.randint(0, 3 * CHUNK, (700,), generator=torch.Generator().manual_seed(1)).tolist()
    sizes[::97] = [0] * len(sizes[::97])
    tensors = [randn((n,), device, torch.float32, seed=i) for i, n in enumerate(sizes)]
    out = sumsq(tensors)
    assert_close_to_reference(out, tensors, torch.float32)
    alone = torch.cat([sumsq([t]) for t in tensors[250:300]])
    assert torch.equal(out[250:300], alone)


def test_sumsq_tensor_split_across_launches(device):
    # 14649 + 12208 chunks > 23488: the second tensor starts in one launch and ends in the next.
    tensors = [randn((30_000_001,), device, torch.bfloat16, seed=0),
               randn((25_000_003,), device, torch.bfloat16, seed=1),
               randn((5, 7), device, torch.bfloat16, seed=2)]
    out = sumsq(tensors)
    assert_close_to_reference(out, tensors, torch.bfloat16)
    assert torch.equal(out, torch.cat([sumsq([t]) for t in tensors]))


def test_sumsq_is_bitwise_deterministic(device):
    tensors = [randn((n,), device, torch.float32, seed=n) for n in (100_003, 5, 70_001)]
    first = sumsq(tensors)
    for _ in range(3):
        assert torch.equal(sumsq(tensors), first)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sumsq_does_not_depend_on_alignment(device, dtype):
    base = randn((3 * CHUNK + 5,), device, dtype)
    for offset in (1, 2, 3):
        view = base[offset:]  # starts off the 16-byte grid: scalar path on the GPU
        assert torch.equal(sumsq([view]), sumsq([view.clone()]))


def test_sumsq_reads_dense_layouts_in_place(device):
    x = randn((2, 3, 5, 7), device, torch.float32)
    channels_last = x.to(memory_format=torch.channels_last)
    transposed = randn((9, 4), device, torch.float32).t()
    tensors = [channels_last, transposed]
    assert_close_to_reference(sumsq(tensors), tensors, torch.float32)


@pytest.mark.parametrize("make_bad", [
    lambda x: x[:, ::2],                   # gaps
    lambda x: x[:1].expand(4, 6),          # overlapping
], ids=["strided", "expanded"])
def test_sumsq_rejects_non_dense_naming_the_tensor(device, make_bad):
    x = randn((4, 6), device, torch.float32)
    with pytest.raises(RuntimeError, match=r"tensors\[1\] must be non-overlapping and dense"):
        sumsq([x, make_bad(x)])


def test_sumsq_argument_errors_name_the_argument(device):
    x = randn((5,), device, torch.float32)
    with pytest.raises(RuntimeError, match=r"empty list"):  # the dispatcher's words, before ours
        sumsq([])
    with pytest.raises(RuntimeError, match=r"tensors\[2\] has dtype Half, but tensors\[0\] has Float"):
        sumsq([x, x, x.half()])
    with pytest.raises(RuntimeError, match=r"tensors must have a floating-point dtype, got Int"):
        sumsq([x.int(), x.int()])


@pytest.mark.gpu
def test_sumsq_cuda_rejects_other_devices_and_double():
    _build.load_library("cuda")
    x = torch.ones(5, device="cuda")
    with pytest.raises(RuntimeError, match=r"tensors\[1\] is on cpu, but tensors\[0\] is on cuda:0"):
        sumsq([x, torch.ones(5)])
    with pytest.raises(RuntimeError, match=r"not implemented for 'Double'"):
        sumsq([x.double()])


@pytest.mark.gpu
def test_sumsq_cuda_graph_replay_sees_new_values():
    # The chunk table travels inside the launch: capture must work and replays read current data.
    _build.load_library("cuda")
    tensors = [torch.randn(n, device="cuda") for n in (3, 4099, 70_000)]
    sumsq(tensors)  # warm up outside capture (allocator, lazy init)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = sumsq(tensors)
    for t in tensors:
        t.mul_(2)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, sumsq(tensors))
    assert_close_to_reference(out, tensors, torch.float32)
