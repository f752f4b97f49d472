"""Triton kernel of fusedreg::adamw_step__triton: one AdamW step over a list of tensors, one launch.

Algorithm: a pointer table (fusedreg/triton/_pointer_table.py). One int64 device tensor holds the
data addresses of every tensor (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps), the
numels, a vector flag per tensor and, for every program, its (tensor, chunk); program i casts the
addresses back to typed pointers (`tl.load(table + k).to(tl.pointer_type(...))`) and updates chunk
i: 65536 elements of one tensor, BLOCK at a time, p, g, m, v (max_v) read once and written once (28
bytes per fp32 parameter). Each program computes its tensor's scalars from its hparams row and step
in float64, as torch does in Python floats (beta**t as exp2(t * log2(beta)), the one form Triton has
in both the compiler and the interpreter); elements are updated in fp32 (fp64 for float64 params)
with correctly rounded division and square root and no FMA contraction, in the order of
fusedreg/reference/adamw.py, and rounded once. found_inf empties every program's range.

Addresses read from memory carry no alignment for the compiler. A tensor's full blocks are told
their pointers are 16-byte aligned (tl.multiple_of: 16-byte vector accesses) only when the host
found every operand of that tensor aligned (p, g, m, v, max_v: its vector flag); a flat gradient
buffer (DDP's gradient_as_bucket_view) puts grads at any offset, so the flag is per tensor and the
kernel branches on it at run time. Only a chunk's last partial block is masked.

Host side and its trade-off: checking thousands of tensors and building their table in Python
would cost far more than the step's GPU time, so the table is cached by every tensor's address and
byte size (+ device, dtype). A call that matches a cached table - one whose tensors passed every
check - re-checks what is O(1) and the memory layout (one contiguity test per tensor, the full rule
only for tensors that are not contiguous), not shapes, dtypes and devices tensor by tensor. What it
skips cannot make the kernel touch other bytes or pair other elements: equal addresses, byte sizes
and layouts fix both (CUDA's unified addressing gives different devices different addresses). It
would miss a tensor swapped, at exactly the checked one's address, for one of another shape with as
many elements or of another dtype as wide (bfloat16 for float16). A CUDA graph can be captured once
a call with the same tensors has run: the capture reuses the cached table, which then stays alive.
"""
from __future__ import annotations

import contextlib
import operator

import torch
import triton
import triton.language as tl

from .._layout import is_dense, same_layout
from . import _common, _pointer_table
from ._common import float32_to_bfloat16_rne, interpreted, registered_as

__all__ = ["adamw_step_", "prepare_step"]

_CHUNK = 65536    # elements per program (as the cuda backend's chunks)
_BLOCK = 1024     # elements per loop step of a program
_NUM_WARPS = 4
_TABLE_CACHE_SIZE = 16  # distinct tensor sets in use at once: optimizer buckets, a few models

_TL_DTYPES = {torch.float32: tl.float32, torch.float64: tl.float64, torch.float16: tl.float16,
              torch.bfloat16: tl.bfloat16}


@triton.jit
def _load(ptr, offs, mask, math_ty, MASKED: tl.constexpr):
    if MASKED:
        return tl.load(ptr + offs, mask=mask, other=0.0).to(math_ty)
    else:
        return tl.load(ptr + offs).to(math_ty)


@triton.jit
def _store(ptr, offs, mask, value, MASKED: tl.constexpr, BF16_ROUND_BY_BITS: tl.constexpr):
    if BF16_ROUND_BY_BITS:
        if ptr.dtype.element_ty == tl.bfloat16:
            value = float32_to_bfloat16_rne(value)
    value = value.to(ptr.dtype.element_ty)
    if MASKED:
        tl.store(ptr + offs, value, mask=mask)
    else:
        tl.store(ptr + offs, value)


@triton.jit
def _div(a, b, FP64: tl.constexpr):
    if FP64:
        return a / b  # IEEE division in float64
    else:
        return tl.div_rn(a, b)  # `/` on float32 is an approximate division on GPUs


@triton.jit
def _sqrt(x, FP64: tl.constexpr):
    if FP64:
        return tl.sqrt(x)
    else:
        return tl.sqrt_rn(x)  # tl.sqrt on float32 is an approximate square root on GPUs


@triton.jit
def _update_block(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, offs, mask,
                  decay, lerp_coef, lerp_from_grad, beta2, one_minus_beta2, step_size,
                  bias_correction2_sqrt, eps, grad_scale, grad_coef,
                  AMSGRAD: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr, MASKED: tl.constexpr,
                  FP64: tl.constexpr, BF16_ROUND_BY_BITS: tl.constexpr):
    math_ty = tl.float64 if FP64 else tl.float32
    param = _load(p_ptr, offs, mask, math_ty, MASKED)
    grad = _load(g_ptr, offs, mask, math_ty, MASKED)
    exp_avg = _load(m_ptr, offs, mask, math_ty, MASKED)
    exp_avg_sq = _load(v_ptr, offs, mask, math_ty, MASKED)
    if HAS_GRAD_SCALE:
        grad = _div(grad, grad_scale, FP64)
    grad = grad * grad_coef  # clip_coef (1 when not given), negated when maximizing: exact
    param = param * decay
    # torch.lerp's two forms, chosen per tensor (see csrc/adamw.h)
    exp_avg = tl.where(lerp_from_grad, grad, exp_avg) + lerp_coef * (grad - exp_avg)
    exp_avg_sq = exp_avg_sq * beta2 + one_minus_beta2 * grad * grad
    second_moment = exp_avg_sq
    if AMSGRAD:
        max_exp_avg_sq = _load(vmax_ptr, offs, mask, math_ty, MASKED)
        # max that propagates NaN, like torch.maximum
        max_exp_avg_sq = tl.where((max_exp_avg_sq > exp_avg_sq) | (max_exp_avg_sq != max_exp_avg_sq),
                                  max_exp_avg_sq, exp_avg_sq)
        second_moment = max_exp_avg_sq
        _store(vmax_ptr, offs, mask, max_exp_avg_sq, MASKED, BF16_ROUND_BY_BITS)
    denom = _div(_sqrt(second_moment, FP64), bias_correction2_sqrt, FP64) + eps
    param = param - _div(step_size * exp_avg, denom, FP64)
    _store(p_ptr, offs, mask, param, MASKED, BF16_ROUND_BY_BITS)
    _store(m_ptr, offs, mask, exp_avg, MASKED, BF16_ROUND_BY_BITS)
    _store(v_ptr, offs, mask, exp_avg_sq, MASKED, BF16_ROUND_BY_BITS)


@triton.jit
def _full_blocks(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, begin, full_end,
                 decay, lerp_coef, lerp_from_grad, beta2, one_minus_beta2, step_size,
                 bias_correction2_sqrt, eps, grad_scale, grad_coef,
                 AMSGRAD: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr, FP64: tl.constexpr,
                 BF16_ROUND_BY_BITS: tl.constexpr, BLOCK: tl.constexpr):
    for start in range(begin, full_end, BLOCK):
        offs = tl.max_contiguous(tl.multiple_of(start + tl.arange(0, BLOCK), BLOCK), BLOCK)
        _update_block(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, offs, None, decay, lerp_coef, lerp_from_grad,
                      beta2, one_minus_beta2, step_size, bias_correction2_sqrt, eps, grad_scale, grad_coef,
                      AMSGRAD, HAS_GRAD_SCALE, False, FP64, BF16_ROUND_BY_BITS)


@triton.jit
def _adamw_kernel(
    table_ptr,        # int64 [L * n + 2 * n + 2 * programs]: addresses [L, n] (rows params, grads,
                      # exp_avgs, exp_avg_sqs, (max_exp_avg_sqs,) steps), numels [n], vector flags
                      # [n], program -> tensor [programs], program -> chunk [programs]
    hparams_ptr,      # float64 [n, 5] contiguous: lr, beta1, beta2, weight_decay, eps per tensor
    grad_scale_ptr,   # [1] float32/float64; read only when HAS_GRAD_SCALE
    found_inf_ptr,    # [1] float32/float64; read only when HAS_FOUND_INF
    clip_coef_ptr,    # [1] float32/float64; read only when HAS_CLIP_COEF
    n_tensors,        # n
    n_programs,       # programs
    PARAM_DTYPE: tl.constexpr,   # storage dtype of params and grads
    STATE_DTYPE: tl.constexpr,   # storage dtype of exp_avgs, exp_avg_sqs, max_exp_avg_sqs
    AMSGRAD: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
    HAS_CLIP_COEF: tl.constexpr,
    FP64: tl.constexpr,          # math in float64 (float64 params)
    BF16_ROUND_BY_BITS: tl.constexpr,  # interpreter: round bfloat16 stores by integer ops
    CHUNK: tl.constexpr,         # elements per program
    BLOCK: tl.constexpr,         # elements per loop step
):
    math_ty = tl.float64 if FP64 else tl.float32
    n_lists: tl.constexpr = 6 if AMSGRAD else 5
    program = tl.program_id(0)
    numels_ptr = table_ptr + n_lists * n_tensors
    tensor = tl.load(numels_ptr + 2 * n_tensors + program)
    chunk = tl.load(numels_ptr + 2 * n_tensors + n_programs + program)
    numel = tl.load(numels_ptr + tensor)
    vector = tl.load(numels_ptr + n_tensors + tensor) != 0
    begin = chunk * CHUNK
    end = tl.minimum(begin + CHUNK, numel)
    if HAS_FOUND_INF:
        end = tl.where(tl.load(found_inf_ptr) != 0, begin, end)  # skip the step: write nothing
    full_end = begin + (end - begin) // BLOCK * BLOCK

    p_ptr = tl.load(table_ptr + tensor).to(tl.pointer_type(PARAM_DTYPE))
    g_ptr = tl.load(table_ptr + n_tensors + tensor).to(tl.pointer_type(PARAM_DTYPE))
    m_ptr = tl.load(table_ptr + 2 * n_tensors + tensor).to(tl.pointer_type(STATE_DTYPE))
    v_ptr = tl.load(table_ptr + 3 * n_tensors + tensor).to(tl.pointer_type(STATE_DTYPE))
    vmax_ptr = v_ptr
    if AMSGRAD:
        vmax_ptr = tl.load(table_ptr + 4 * n_tensors + tensor).to(tl.pointer_type(STATE_DTYPE))
    step_ptr = tl.load(table_ptr + (n_lists - 1) * n_tensors + tensor).to(tl.pointer_type(tl.float32))

    # Per-tensor scalars in float64, as torch computes them in Python floats, then rounded once.
    row = hparams_ptr + tensor * 5
    lr = tl.load(row)
    beta1 = tl.load(row + 1)
    beta2 = tl.load(row + 2)
    weight_decay = tl.load(row + 3)
    eps = tl.load(row + 4)
    step = tl.load(step_ptr).to(tl.float64)
    decay = (1.0 - lr * weight_decay).to(math_ty)
    lerp_weight = (1.0 - beta1).to(math_ty)
    lerp_from_grad = (lerp_weight >= 0.5) | (lerp_weight <= -0.5)
    lerp_coef = tl.where(lerp_from_grad, lerp_weight - 1.0, lerp_weight)
    step_size = (lr / (1.0 - tl.exp2(step * tl.log2(beta1)))).to(math_ty)
    bias_correction2_sqrt = tl.sqrt(1.0 - tl.exp2(step * tl.log2(beta2))).to(math_ty)
    one_minus_beta2 = (1.0 - beta2).to(math_ty)
    beta2 = beta2.to(math_ty)
    eps = eps.to(math_ty)
    grad_scale = 1.0
    if HAS_GRAD_SCALE:
        grad_scale = tl.load(grad_scale_ptr).to(math_ty)
    grad_coef = tl.full((), 1.0, math_ty)
    if HAS_CLIP_COEF:
        grad_coef = tl.load(clip_coef_ptr).to(math_ty)
    if MAXIMIZE:
        grad_coef = -grad_coef

    if vector:  # every operand of this tensor 16-byte aligned: 16-byte accesses on full blocks
        _full_blocks(tl.multiple_of(p_ptr, 16), tl.multiple_of(g_ptr, 16), tl.multiple_of(m_ptr, 16),
                     tl.multiple_of(v_ptr, 16), tl.multiple_of(vmax_ptr, 16), begin, full_end,
                     decay, lerp_coef, lerp_from_grad, beta2, one_minus_beta2, step_size,
                     bias_correction2_sqrt, eps, grad_scale, grad_coef,
                     AMSGRAD, HAS_GRAD_SCALE, FP64, BF16_ROUND_BY_BITS, BLOCK)
    else:
        _full_blocks(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, begin, full_end,
                     decay, lerp_coef, lerp_from_grad, beta2, one_minus_beta2, step_size,
                     bias_correction2_sqrt, eps, grad_scale, grad_coef,
                     AMSGRAD, HAS_GRAD_SCALE, FP64, BF16_ROUND_BY_BITS, BLOCK)
    offs = full_end + tl.arange(0, BLOCK)
    _update_block(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, offs, offs < end, decay, lerp_coef, lerp_from_grad,
                  beta2, one_minus_beta2, step_size, bias_correction2_sqrt, eps, grad_scale, grad_coef,
                  AMSGRAD, HAS_GRAD_SCALE, True, FP64, BF16_ROUND_BY_BITS)


# ----------------------------------------------------------------------------- host side

_tables = _pointer_table.TableCache(_TABLE_CACHE_SIZE)
_dtype = operator.attrgetter("dtype")
_device = operator.attrgetter("device")
_shape = operator.attrgetter("shape")


def _check_scalar(t, name, device):
    if t is None:
        return
    if t.numel() != 1:
        raise ValueError(f"{name} must have exactly one element, got shape {tuple(t.shape)}")
    if t.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"{name} must be float32 or float64, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} must be on {device}, got {t.device}")


def _check_constant_time(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, hparams, amsgrad,
                         grad_scale, found_inf, clip_coef) -> torch.dtype:
    """The checks of csrc/adamw.h (same rules, same wording) whose cost does not grow with the number
    of tensors, run on every call; returns the states' dtype."""
    if len(params) == 0:
        raise ValueError("params must be a non-empty list of tensors")
    device, dtype = params[0].device, params[0].dtype
    if dtype not in _TL_DTYPES:
        raise ValueError(f"params must have a floating-point dtype, got {dtype}")
    named = [("grads", grads), ("exp_avgs", exp_avgs), ("exp_avg_sqs", exp_avg_sqs)]
    for name, lst in named + [("max_exp_avg_sqs", max_exp_avg_sqs)] * amsgrad + [("steps", steps)]:
        if len(lst) != len(params):
            raise ValueError(f"params and {name} must have the same length, got {len(params)} and {len(lst)}")
    if not amsgrad and len(max_exp_avg_sqs):
        raise ValueError(f"max_exp_avg_sqs must be empty when amsgrad=False, got {len(max_exp_avg_sqs)} tensors")
    state_dtype = exp_avgs[0].dtype
    low_precision = dtype in (torch.float16, torch.bfloat16)
    if state_dtype != dtype and not (low_precision and state_dtype == torch.float32):
        raise ValueError(f"exp_avgs[0] has dtype {state_dtype}; optimizer states must have the params' dtype "
                         f"({dtype}){' or float32' if low_precision else ''}")
    if hparams.dtype != torch.float64:
        raise ValueError(f"hparams must have dtype torch.float64, got {hparams.dtype}")
    if hparams.shape != (len(params), 5):
        raise ValueError(f"hparams must have shape [len(params), 5] = [{len(params)}, 5], got {list(hparams.shape)}")
    if not hparams.is_contiguous():
        raise ValueError(f"hparams must be contiguous, got strides {hparams.stride()}")
    if hparams.device != device:
        raise ValueError(f"hparams must be on {device}, got {hparams.device}")
    _check_scalar(grad_scale, "grad_scale", device)
    _check_scalar(found_inf, "found_inf", device)
    _check_scalar(clip_coef, "clip_coef", device)
    return state_dtype


def _all_are(values, expected) -> bool:
    return set(values) == {expected}


def _name_the_culprit(params, named, steps):
    """The per-tensor checks of csrc/adamw.h, one tensor at a time: raises naming the first at fault."""
    device, dtype = params[0].device, params[0].dtype
    for i, p in enumerate(params):
        if p.device != device:
            raise ValueError(f"params[{i}] is on {p.device}, but params[0] is on {device}; all must share one device")
        if p.dtype != dtype:
            raise ValueError(f"params[{i}] has dtype {p.dtype}, but params[0] has {dtype}; all must share one dtype")
        if p.numel() and not is_dense(p):
            raise ValueError(f"params[{i}] must be non-overlapping and dense (e.g. contiguous or channels_last), "
                             f"got sizes {tuple(p.shape)} and strides {p.stride()}; call .contiguous() first")
    for name, lst, want, rule in named:
        for i, (p, t) in enumerate(zip(params, lst)):
            if t.shape != p.shape:
                raise ValueError(f"{name}[{i}] has shape {tuple(t.shape)}, but params[{i}] has shape {tuple(p.shape)}")
            if t.device != p.device:
                raise ValueError(f"{name}[{i}] is on {t.device}, but params are on {p.device}")
            if t.dtype != want:
                raise ValueError(f"{name}[{i}] has dtype {t.dtype}, expected {want} ({rule})")
            if t.numel() and not same_layout(t, p):
                raise ValueError(f"{name}[{i}] has strides {t.stride()}, but params[{i}] has {p.stride()}; "
                                 "grads and states must have their parameter's memory layout")
    for i, s in enumerate(steps):
        if s.numel() != 1 or s.dtype != torch.float32:
            raise ValueError(f"steps[{i}] must be a float32 tensor of one element, got {s.dtype} of shape "
                             f"{tuple(s.shape)}")
        if s.device != device:
            raise ValueError(f"steps[{i}] is on {s.device}, but params are on {device}")


def _check_each_tensor(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, amsgrad, state_dtype):
    """The checks of csrc/adamw.h that look at every tensor, run when a table is built: whole-list
    comparisons (C-level maps, a few times faster than a Python loop); the loop that names the
    tensor at fault runs only when one of them fails."""
    device, dtype = params[0].device, params[0].dtype
    rule = "all optimizer states share exp_avgs[0]'s dtype"
    named = [("grads", grads, dtype, "grads must have their parameter's dtype, as in torch's fused AdamW"),
             ("exp_avgs", exp_avgs, state_dtype, rule), ("exp_avg_sqs", exp_avg_sqs, state_dtype, rule)]
    if amsgrad:
        named.append(("max_exp_avg_sqs", max_exp_avg_sqs, state_dtype, rule))
    shapes = list(map(_shape, params))
    if not (_all_are(map(_dtype, params), dtype) and _all_are(map(_device, params), device)
            and all(_all_are(map(_dtype, lst), want) and _all_are(map(_device, lst), device)
                    and list(map(_shape, lst)) == shapes for _, lst, want, _ in named)
            and _pointer_table.layouts_match([params] + [lst for _, lst, _, _ in named], len(named) + 1)
            and _all_are(map(_dtype, steps), torch.float32) and _all_are(map(torch.Tensor.numel, steps), 1)
            and _all_are(map(_device, steps), device)):
        _name_the_culprit(params, named, steps)


def prepare_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, hparams, amsgrad,
                 grad_scale, found_inf, clip_coef, tables: _pointer_table.TableCache | None = None
                 ) -> tuple[_pointer_table.PointerTable, torch.dtype]:
    """Everything a step does on the host but the launch: the checks and the pointer table, from
    `tables` (default: this module's cache). Returns (table, the states' dtype); raises ValueError
    naming the argument at fault, or RuntimeError for a table to build during CUDA graph capture."""
    tables = _tables if tables is None else tables
    state_dtype = _check_constant_time(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, hparams,
                                       amsgrad, grad_scale, found_inf, clip_coef)
    lists = [params, grads, exp_avgs, exp_avg_sqs] + ([max_exp_avg_sqs] if amsgrad else []) + [steps]
    vector_rows = len(lists) - 1  # every list but steps is accessed in vectors
    key = _pointer_table.table_key(lists)
    device = params[0].device
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    entry = tables.get(key, capturing)
    if entry is None or not _pointer_table.layouts_match(lists, vector_rows):
        _check_each_tensor(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, amsgrad, state_dtype)
    if entry is None:
        if capturing:
            raise RuntimeError(
                "adamw_step_ (triton): new tensors during CUDA graph capture; run one step with the same "
                "tensors before capturing (as torch.cuda.graphs asks for warm-up), so that their pointer "
                "table is built and cached")
        entry = _pointer_table.build(_pointer_table.key_addresses(key), [p.numel() for p in params],
                                     vector_rows, _CHUNK, device)
        tables.put(key, entry)
    return entry, state_dtype


@registered_as("adamw_step__triton")
def adamw_step_(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
                exp_avg_sqs: list[torch.Tensor], max_exp_avg_sqs: list[torch.Tensor], steps: list[torch.Tensor],
                hparams: torch.Tensor, amsgrad: bool, maximize: bool, grad_scale: torch.Tensor | None,
                found_inf: torch.Tensor | None, clip_coef: torch.Tensor | None) -> None:
    """One AdamW step (fusedreg/reference/adamw.py's math). Mutates params, exp_avgs, exp_avg_sqs
    (and max_exp_avg_sqs if amsgrad), each element rounded once to its dtype; returns nothing.
    Capturable in a CUDA graph after one call with the same tensors."""
    entry, state_dtype = prepare_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, hparams,
                                      amsgrad, grad_scale, found_inf, clip_coef)
    device = params[0].device
    if device.type == "cpu" and not _common.cpu_tensors_allowed():
        raise RuntimeError("adamw_step_ (triton): CPU tensors need the Triton interpreter "
                           "(TRITON_INTERPRET=1 set before fusedreg.triton is imported)")
    if entry.programs == 0:
        return
    dtype = params[0].dtype
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        _adamw_kernel[(entry.programs,)](
            entry.table, hparams,
            hparams if grad_scale is None else grad_scale,
            hparams if found_inf is None else found_inf,
            hparams if clip_coef is None else clip_coef,
            entry.n_tensors, entry.programs,
            PARAM_DTYPE=_TL_DTYPES[dtype], STATE_DTYPE=_TL_DTYPES[state_dtype],
            AMSGRAD=amsgrad, MAXIMIZE=maximize, HAS_GRAD_SCALE=grad_scale is not None,
            HAS_FOUND_INF=found_inf is not None, HAS_CLIP_COEF=clip_coef is not None,
            FP64=dtype == torch.float64,
            # The interpreter's float32 -> bfloat16 cast truncates; compiled kernels round to
            # nearest even in hardware (cvt.rn), as torch does.
            BF16_ROUND_BY_BITS=interpreted() and torch.bfloat16 in (dtype, state_dtype),
            CHUNK=_CHUNK, BLOCK=_BLOCK, num_warps=_NUM_WARPS,
            # the reference rounds every product and sum: no multiply-add contraction
            enable_fp_fusion=False,
        )
