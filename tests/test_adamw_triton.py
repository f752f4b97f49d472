"""The Triton AdamW launcher's host side (fusedreg/triton/adamw.py, fusedreg/triton/_pointer_table.py):
which tensors get 16-byte vector accesses, the pointer-table cache and what a cache hit skips, and
CUDA graph capture.

Kernels run on CUDA tensors (cases marked gpu by conftest.py) and on CPU tensors under the Triton
interpreter; their numbers are checked against the eager reference on the same inputs. Host-side
tests use CPU tensors (the launcher's host part needs no kernel) and look at what it computes
(tables, flags, calls), never at times.
"""
import pytest
import torch

from conftest import TOLERANCES, native_backends
from fusedreg.reference.adamw import adamw_step_ as reference_step

pytest.importorskip("triton")
from fusedreg.triton import _pointer_table, adamw as triton_adamw  # noqa: E402

DEVICES = [d for d in ("cpu", "cuda") if "triton" in native_backends(d)]  # where kernels run

LISTS = ("params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs")


def _flat_views(shapes, dtype, device, offset, gen):
    """Tensors of `shapes` packed one after another into one flat buffer from element `offset` on,
    as DDP's gradient_as_bucket_view lays grads out: an odd size puts the next one off 16 bytes."""
    total = sum(torch.Size(s).numel() for s in shapes)
    flat = torch.randn(offset + total, generator=gen).to(device, dtype)
    views, start = [], offset
    for s in shapes:
        n = torch.Size(s).numel()
        views.append(flat[start:start + n].view(s))
        start += n
    return views


def _state(shapes, device, dtype=torch.float32, packed=(), amsgrad=True, seed=0):
    """Every list of one step; the lists named in `packed` are views into one flat buffer starting one
    element in, the others tensors of their own (16-byte aligned allocations)."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name in LISTS if amsgrad else LISTS[:-1]:
        if name in packed:
            tensors = _flat_views(shapes, dtype, device, 1, gen)
        else:
            tensors = [torch.randn(s, generator=gen).to(device, dtype) for s in shapes]
        if name == "exp_avg_sqs" or name == "max_exp_avg_sqs":
            tensors = [t.abs_().mul_(0.01) for t in tensors]
        state[name] = tensors
    state["max_exp_avg_sqs"] = state.get("max_exp_avg_sqs", [])
    state["steps"] = [torch.tensor(float(i + 1), device=device) for i in range(len(shapes))]
    rows = [[1e-2, 0.9, 0.999, 0.1 * (i % 2), 1e-8] for i in range(len(shapes))]
    state["hparams"] = torch.tensor(rows, dtype=torch.float64, device=device)
    return state


def _args(state, amsgrad=True):
    return [state["params"], state["grads"], state["exp_avgs"], state["exp_avg_sqs"], state["max_exp_avg_sqs"],
            state["steps"], state["hparams"], amsgrad]


def _prepare(state, amsgrad=True, tables=None):
    return triton_adamw.prepare_step(*_args(state, amsgrad), None, None, None, tables=tables)


def _step(fn, state, amsgrad=True):
    fn(*_args(state, amsgrad), False, None, None, None)


def _clone(state):
    return {k: v.clone() if isinstance(v, torch.Tensor) else [t.clone() for t in v] for k, v in state.items()}


def _assert_close(actual, expected, dtype):
    atol, rtol = TOLERANCES[dtype]
    for name in ("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"):
        for i, (a, e) in enumerate(zip(actual[name], expected[name])):
            torch.testing.assert_close(a, e, atol=atol, rtol=rtol, msg=lambda m: f"{name}[{i}]: {m}")


# ----------------------------------------------------------------------------- vector flags

def test_vector_flags_need_every_row_aligned():
    rows = [[0, 16, 32, 48], [16, 20, 48, 64], [32, 48, 72, 80]]
    assert _pointer_table.vector_flags(rows) == [True, False, False, True]


def test_table_layout_and_the_rows_left_out_of_the_flags():
    """Addresses row by row, numels, flags, then (tensor, chunk) per program; the last row (odd
    addresses, as step counters may have) does not clear any flag."""
    rows = [(0, 32, 64), (16, 36, 80), (4, 8, 12)]
    entry = _pointer_table.build(rows, [5, 0, 25], 2, 10, torch.device("cpu"))
    assert entry.vector == (True, False, True) and entry.programs == 4 and entry.n_tensors == 3
    assert entry.table.tolist() == [0, 32, 64, 16, 36, 80, 4, 8, 12,   # addresses
                                    5, 0, 25,                           # numels
                                    1, 0, 1,                            # vector flags
                                    0, 2, 2, 2,                         # program -> tensor
                                    0, 0, 1, 2]                         # program -> chunk


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("packed", ["grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"])
def test_one_misaligned_operand_takes_its_tensor_off_the_vector_path(packed, device):
    """Aligned params, one list packed into a flat buffer at odd offsets: exactly the tensors with a
    misaligned operand lose their vector flag (a flag computed from the params alone would keep it
    and make the GPU fault on a 16-byte access)."""
    shapes = [(4,), (3,), (5, 3), (8,), (1031,), (2,)]
    state = _state(shapes, device, packed=(packed,))
    entry, _ = _prepare(state, tables=_pointer_table.TableCache(1))
    expected = tuple(all(state[name][i].data_ptr() % 16 == 0 for name in LISTS) for i in range(len(shapes)))
    assert entry.vector == expected
    assert any(expected) and not all(expected)
    assert all(p.data_ptr() % 16 == 0 for p in state["params"])


def test_steps_do_not_take_tensors_off_the_vector_path():
    shapes = [(16,), (8,)]
    state = _state(shapes, "cpu")
    counters = torch.zeros(5)
    state["steps"] = [counters[1], counters[2]]   # 4-byte aligned only: read one element at a time
    entry, _ = _prepare(state)
    assert entry.vector == (True, True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_grads_match_the_reference(dtype, device):
    """Grads at odd offsets of one buffer (some tensors vector-flagged, some not), tensors longer
    than a few 1024-element blocks: the same update as the reference."""
    shapes = [(2 * 1024 + 39,), (3, 1024), (11,), (4,)]   # from element 1: offsets 1, 2088, 5160, 5171
    state = _state(shapes, device, dtype=dtype, packed=("grads",))
    assert _prepare(state)[0].vector == (False, True, True, False)
    expected = _clone(state)
    _step(reference_step, expected)
    _step(triton_adamw.adamw_step_, state)
    _assert_close(state, expected, dtype)


# ----------------------------------------------------------------------------- the table cache

def _counting(fn):
    """fn, counting its calls in .calls (a function, so that it binds as a method too)."""
    def counted(*args, **kwargs):
        counted.calls += 1
        return fn(*args, **kwargs)
    counted.calls = 0
    return counted


@pytest.fixture
def counted(monkeypatch):
    """Counts table builds and per-tensor checks (_check_each_tensor, Tensor.stride)."""
    counts = {"build": _counting(_pointer_table.build),
              "check_each_tensor": _counting(triton_adamw._check_each_tensor),
              "stride": _counting(torch.Tensor.stride)}
    monkeypatch.setattr(_pointer_table, "build", counts["build"])
    monkeypatch.setattr(triton_adamw, "_check_each_tensor", counts["check_each_tensor"])
    monkeypatch.setattr(torch.Tensor, "stride", counts["stride"])
    return counts


def test_same_tensors_reuse_their_table_and_skip_per_tensor_checks(counted):
    state = _state([(7, 3), (13,), (0,), ()] * 25, "cpu")   # 100 tensors
    tables = _pointer_table.TableCache(4)
    first, _ = _prepare(state, tables=tables)
    assert counted["build"].calls == 1 and counted["check_each_tensor"].calls == 1
    counted["stride"].calls = 0
    for _ in range(3):
        again, _ = _prepare(state, tables=tables)
        assert again is first
    assert counted["build"].calls == 1 and counted["check_each_tensor"].calls == 1
    assert counted["stride"].calls == 0


def test_other_addresses_or_sizes_get_another_table(counted):
    state = _state([(7, 3), (13,)], "cpu")
    tables = _pointer_table.TableCache(4)
    first, _ = _prepare(state, tables=tables)
    state["grads"] = [g.clone() for g in state["grads"]]       # new addresses
    second, _ = _prepare(state, tables=tables)
    assert second is not first and counted["build"].calls == 2
    # same addresses, fewer elements: the numels in the table follow
    shorter = {k: v if k in ("steps", "hparams") else [v[0], v[1][:5]] for k, v in state.items()}
    third, _ = _prepare(shorter, tables=tables)
    assert third is not second and third.table[6 * 2 + 1].item() == 5
    assert _prepare(state, tables=tables)[0] is second and counted["build"].calls == 3


def test_a_hit_still_refuses_another_layout_at_the_same_address():
    """A transposed view of the same memory has the same address and byte size as the tensor the
    cached table was checked with: the layout test still catches it and names it."""
    state = _state([(6, 6), (5,)], "cpu")
    tables = _pointer_table.TableCache(4)
    _prepare(state, tables=tables)
    state["exp_avgs"] = [state["exp_avgs"][0].t(), state["exp_avgs"][1]]
    with pytest.raises(ValueError, match=r"exp_avgs\[0\] has strides"):
        _prepare(state, tables=tables)


@pytest.mark.parametrize("device", DEVICES)
def test_channels_last_tensors_hit_without_per_tensor_checks(counted, device):
    gen = torch.Generator().manual_seed(3)
    state = _state([(3,), (2, 3, 4, 5)], device)
    for name in LISTS:
        state[name][1] = torch.rand(2, 3, 4, 5, generator=gen).to(device).contiguous(
            memory_format=torch.channels_last)
    tables = _pointer_table.TableCache(4)
    first, _ = _prepare(state, tables=tables)
    assert _prepare(state, tables=tables)[0] is first and counted["check_each_tensor"].calls == 1
    expected = _clone(state)
    _step(reference_step, expected)
    _step(triton_adamw.adamw_step_, state)
    _assert_close(state, expected, torch.float32)


def test_cache_is_bounded_and_keeps_tables_used_in_capture():
    tables = _pointer_table.TableCache(2)
    entries = {k: _pointer_table.build([(16 * k,)], [1], 1, 8, torch.device("cpu")) for k in range(6)}
    for k in (0, 1):
        tables.put(k, entries[k])
    assert tables.get(0, capturing=True) is entries[0]    # kept: a graph reads it on every replay
    for k in (2, 3, 4):
        tables.put(k, entries[k])
    assert len(tables) == 3 and tables.get(0) is entries[0]
    assert tables.get(1) is None and tables.get(2) is None
    assert tables.get(3) is entries[3]
    tables.put(5, entries[5])                              # evicts 4, the least recently used
    assert tables.get(4) is None and tables.get(3) is entries[3] and tables.get(5) is entries[5]


# ----------------------------------------------------------------------------- CUDA graphs

@pytest.mark.gpu
@pytest.mark.skipif("triton" not in native_backends("cuda"), reason="no Triton backend for CUDA tensors")
def test_step_replays_in_a_cuda_graph_after_one_call():
    """One step with the same tensors, then capture; replays with new grads, steps and found_inf
    written in place match the reference, also after the cache has seen more tensor sets than it
    holds (the captured table is kept)."""
    state = _state([(2 * 1024 + 39,), (3, 1024), (11,), (4,)], "cuda", dtype=torch.bfloat16, packed=("grads",))
    found_inf = torch.zeros(1, device="cuda")

    def step():
        triton_adamw.adamw_step_(*_args(state), False, None, found_inf, None)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    gen = torch.Generator().manual_seed(11)
    for k in range(4):
        if k == 2:  # more tensor sets than the cache holds (alive: each its own addresses)
            others = [_state([(5,)], "cuda") for _ in range(triton_adamw._TABLE_CACHE_SIZE + 2)]
            for other in others:
                _prepare(other)
        for g in state["grads"]:
            g.copy_(torch.randn(g.shape, generator=gen))
        for s in state["steps"]:
            s += 1
        found_inf.fill_(float(k == 1))
        expected = _clone(state)
        reference_step(*_args(expected), False, None, found_inf, None)
        graph.replay()
        torch.cuda.synchronize()
        _assert_close(state, expected, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.skipif("triton" not in native_backends("cuda"), reason="no Triton backend for CUDA tensors")
def test_new_tensors_during_capture_are_refused():
    state = _state([(5,), (7,)], "cuda")
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="new tensors during CUDA graph capture"):
        with torch.cuda.graph(graph):
            _step(triton_adamw.adamw_step_, state)
