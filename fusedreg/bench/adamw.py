"""AdamW benchmarks: one optimizer step, fusedreg.optim.AdamW against torch.optim.AdamW.

Cases:
  adamw/single  one large parameter (bandwidth: how close to the copy speed one tensor gets)
  adamw/gpt2    the parameter list of a GPT-2 (124M on CUDA: 148 tensors from 50257x768 down to
                768; a 4-layer, 256-wide one on CPU): launch-bound on the small tensors, so it is
                also timed as CUDA-graph replays (every optimizer that can be captured is built
                with capturable=True)
  adamw/pure_bf16  "pure bf16 + SR": bfloat16 parameters and moments, no fp32 master copy, written
                by stochastic rounding: read p, g, m, v and write p, m, v = 14 B/param, against
                torch's fused AdamW on float32 parameters of the same count (28 B/param, the memory
                it replaces: target on a GPU >= 1.8x faster) and torch's AdamW on the bfloat16
                parameters (round-to-nearest: the stall stochastic rounding fixes)
  adamw/host    the host time of one fusedreg[triton] step over 100 and 1,000 small parameters,
                the kernel launch left out (prepare_step: argument checks + pointer table), on CPU
                tensors: the Python work a GPU step pays before Triton's own launch overhead, with
                the table cached (every step after the first) and rebuilt (a first step, or new
                tensors); the pinned host-to-device copy of a rebuilt table is not included

Floor (DESIGN §5): read p, g, m, v and write p, m, v = 7 x itemsize bytes per parameter (28 B
fp32), moments in the parameter's dtype as torch keeps them. torch's foreach AdamW moves ~80 B.
Every implementation takes one step in setup, so state allocation is not timed; steps after that
keep updating the same tensors (the values stay finite: Adam's update is bounded by lr).
"""
from __future__ import annotations

import torch

from ..optim import AdamW
from .registry import Case, Impl, Skip, register

LR = 1e-3


def _floor_bytes(numel: int, dtype: torch.dtype) -> int:
    return 7 * numel * dtype.itemsize


def _parameters(inputs) -> list[torch.nn.Parameter]:
    """Fresh parameters (each implementation mutates its own) sharing the read-only gradients."""
    values, grads = inputs
    params = []
    for v, g in zip(values, grads):
        p = torch.nn.Parameter(v.clone())
        p.grad = g
        params.append(p)
    return params


def _stepper(opt: torch.optim.Optimizer):
    opt.step()  # creates the state
    return opt.step


def _fusedreg(backend: str, graphable: bool):
    def setup(inputs):
        params = _parameters(inputs)
        capturable = graphable and params[0].is_cuda
        return _stepper(AdamW(params, lr=LR, backend=backend, capturable=capturable))
    return setup


def _torch(graphable: bool = False, **kwargs):
    def setup(inputs):
        params = _parameters(inputs)
        capturable = graphable and params[0].is_cuda
        return _stepper(torch.optim.AdamW(params, lr=LR, capturable=capturable, **kwargs))
    return setup


def _torch_compiled(inputs):
    opt = torch.optim.AdamW(_parameters(inputs), lr=LR, foreach=True)

    @torch.compile(fullgraph=False)
    def step():
        opt.step()

    step()
    return step


def _impls(graphable: bool) -> dict[str, Impl]:
    """Implementations, subject first; `graphable` builds those that support it capturable."""
    return {
        "fusedreg[cuda]": Impl(_fusedreg("cuda", graphable), devices=("cuda",)),
        "fusedreg[cpu]": Impl(_fusedreg("cpu", graphable), devices=("cpu",)),
        "fusedreg[triton]": Impl(_fusedreg("triton", graphable), devices=("cuda",)),
        "torch AdamW (default)": Impl(_torch()),
        "torch AdamW(foreach=False)": Impl(_torch(foreach=False)),
        "torch AdamW(fused=True)": Impl(_torch(graphable, fused=True)),
        "torch.compile(AdamW.step)": Impl(_torch_compiled, devices=("cuda",), quick=False),
        "reference (eager)": Impl(_fusedreg("reference", graphable), quick=False, paired=False),
    }


# ----------------------------------------------------------------------------- one large parameter

def _make_single(size: int, dtype: torch.dtype, device: str):
    values = torch.randn(size, device=device).to(dtype)
    return [values], [torch.randn(size, device=device).to(dtype) * 1e-2]


register(Case(
    op="adamw", name="single", make=_make_single,
    bytes_moved=_floor_bytes,
    impls=_impls(graphable=False),
    sizes={"cuda": [2**24, 2**26, 2**28], "cpu": [2**16, 2**20, 2**22]},
    quick_sizes={"cuda": [2**24, 2**26], "cpu": [2**16, 2**20]},
    note="one parameter tensor; floor 7 x itemsize bytes/param (p, g, m, v read; p, m, v written)",
))


# ----------------------------------------------------------------------------- GPT-2 parameter list

def gpt2_shapes(n_layer: int, width: int, vocab: int, context: int) -> list[tuple[int, ...]]:
    """Parameter shapes of a GPT-2 (HF Conv1D layout, lm_head tied to wte): 2 + 12 * n_layer + 2."""
    shapes: list[tuple[int, ...]] = [(vocab, width), (context, width)]
    for _ in range(n_layer):
        shapes += [(width,), (width,),                      # ln_1
                   (width, 3 * width), (3 * width,),        # attn.c_attn
                   (width, width), (width,),                # attn.c_proj
                   (width,), (width,),                      # ln_2
                   (width, 4 * width), (4 * width,),        # mlp.c_fc
                   (4 * width, width), (width,)]            # mlp.c_proj
    return shapes + [(width,), (width,)]                    # ln_f


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _gpt2_numel(size) -> int:
    return sum(_numel(s) for s in gpt2_shapes(*size))


def _gpt2_label(size) -> str:
    n_layer, width, _, _ = size
    shapes = gpt2_shapes(*size)
    return f"GPT-2 L{n_layer} d{width}: {_gpt2_numel(size) / 1e6:.1f}M in {len(shapes)} tensors"


def _make_gpt2(size, dtype: torch.dtype, device: str):
    values, grads = [], []
    for shape in gpt2_shapes(*size):
        values.append((torch.randn(shape, device=device) * 0.02).to(dtype))
        grads.append((torch.randn(shape, device=device) * 1e-3).to(dtype))
    return values, grads


GPT2_124M = (12, 768, 50257, 1024)
GPT2_CPU = (4, 256, 8192, 256)
GPT2_CPU_QUICK = (2, 128, 4096, 128)

register(Case(
    op="adamw", name="gpt2", make=_make_gpt2,
    bytes_moved=lambda size, dtype: _floor_bytes(_gpt2_numel(size), dtype),
    impls=_impls(graphable=True),
    sizes={"cuda": [GPT2_124M], "cpu": [GPT2_CPU]},
    quick_sizes={"cuda": [GPT2_124M], "cpu": [GPT2_CPU_QUICK]},
    size_label=_gpt2_label,
    cuda_graph=True,
    note="GPT-2 parameter list, one step; floor 7 x itemsize bytes/param; "
         "fusedreg and torch fused built capturable=True (CUDA-graph replays)",
))


# ----------------------------------------------------------------------------- pure bf16 + SR

def _pure_bf16(backend: str):
    def setup(inputs):
        opt = AdamW(_parameters(inputs), lr=LR, backend=backend, state_dtype=torch.bfloat16,
                    bf16_stochastic_round=True)
        return _stepper(opt)
    return setup


def _torch_as(dtype: torch.dtype, **kwargs):
    """torch.optim.AdamW on the parameters (and gradients) converted to `dtype`."""
    def setup(inputs):
        values, grads = inputs
        return _torch(**kwargs)(([v.to(dtype) for v in values], [g.to(dtype) for g in grads]))
    return setup


register(Case(
    op="adamw", name="pure_bf16", make=_make_gpt2,
    bytes_moved=lambda size, dtype: _floor_bytes(_gpt2_numel(size), torch.bfloat16),
    impls={
        "fusedreg[cuda] pure bf16 + SR": Impl(_pure_bf16("cuda"), devices=("cuda",)),
        "fusedreg[cpu] pure bf16 + SR": Impl(_pure_bf16("cpu"), devices=("cpu",)),
        "fusedreg[triton] pure bf16 + SR": Impl(_pure_bf16("triton"), devices=("cuda",)),
        "torch AdamW(fused=True), fp32 params": Impl(_torch_as(torch.float32, fused=True)),
        "torch AdamW(fused=True), bf16 params": Impl(_torch_as(torch.bfloat16, fused=True)),
        "torch AdamW (default), bf16 params": Impl(_torch_as(torch.bfloat16)),
    },
    sizes={"cuda": [GPT2_124M], "cpu": [GPT2_CPU]},
    quick_sizes={"cuda": [GPT2_124M], "cpu": [GPT2_CPU_QUICK]},
    dtypes=(torch.bfloat16,),
    size_label=_gpt2_label,
    note="pure bf16 + SR: bfloat16 params and moments, stochastic rounding, 14 B/param (read 8, write 6; "
         "GB/s counts these bytes for every row); torch fused on fp32 params of the same count moves 28",
))


# ----------------------------------------------------------------------------- host time of a step

def _make_host(size, dtype: torch.dtype, device: str):
    """prepare_step's arguments for n tensors of numel elements, in their own allocations."""
    n, numel = size
    params = [torch.randn(numel, device=device).to(dtype) for _ in range(n)]
    grads = [torch.randn(numel, device=device).to(dtype) * 1e-2 for _ in range(n)]
    exp_avgs = [torch.zeros(numel, device=device, dtype=dtype) for _ in range(n)]
    exp_avg_sqs = [torch.zeros(numel, device=device, dtype=dtype) for _ in range(n)]
    steps = [torch.ones((), device=device) for _ in range(n)]
    hparams = torch.tensor([[LR, 0.9, 0.999, 1e-2, 1e-8]] * n, dtype=torch.float64, device=device)
    return [params, grads, exp_avgs, exp_avg_sqs, [], steps, hparams, False, None, None, None]


def _triton_host(cached: bool):
    def setup(args):
        try:
            from ..triton import _pointer_table, adamw as triton_adamw
        except Exception as exc:  # no triton here
            raise Skip(f"fusedreg.triton does not import: {type(exc).__name__}: {exc}") from exc
        # its own cache; one that keeps nothing checks every tensor and builds the table every call
        tables = _pointer_table.TableCache(1 if cached else 0)
        return lambda: triton_adamw.prepare_step(*args, tables=tables)
    return setup


register(Case(
    op="adamw", name="host", make=_make_host,
    bytes_moved=lambda size, dtype: _floor_bytes(size[0] * size[1], dtype),
    impls={"fusedreg[triton] host, cached table": Impl(_triton_host(cached=True)),
           "fusedreg[triton] host, table rebuilt": Impl(_triton_host(cached=False))},
    sizes={"cpu": [(100, 64), (1000, 64)]},
    quick_sizes={"cpu": [(1000, 64)]},
    dtypes=(torch.float32,),
    devices=("cpu",),
    size_label=lambda size: f"{size[0]} x {size[1]}",
    note="host time of one fusedreg[triton] step before its launch (checks + pointer table), "
         "CPU tensors; GB/s = the step's floor bytes over host time, the most the host lets a GPU reach",
))
