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

Stochastic rounding (sr_seed given: the SR specialisation; pure-bf16 training): bfloat16 stores
round by integer ops with the Philox words of csrc/adamw.h's stream (fusedreg/triton/_adamw_sr.py),
one tl.philox per four elements and word pair, inside the same loop; the tensors' ids in the stream
are one more pointer-table row. The float32 math already rounds every operation as the reference
does, so the bits match every other backend's (the per-tensor float64 scalars could differ in their
last bit from pow's, which changes their float32 rounding with a probability of order 2**-28).

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

import torch
import triton
import triton.language as tl

from . import _common, _pointer_table
from ._adamw_checks import check_constant_time as _check_constant_time
from ._adamw_checks import check_each_tensor as _check_each_tensor
from ._adamw_sr import round_bf16_stochastic, sr_words
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
def _store(ptr, offs, mask, value, MASKED: tl.constexpr, BF16_ROUND_BY_BITS: tl.constexpr, SR: tl.constexpr,
           r16):
    if SR and ptr.dtype.element_ty == tl.bfloat16:  # stochastic rounding with the 16-bit r16
        value = round_bf16_stochastic(value, r16)
    elif BF16_ROUND_BY_BITS:
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
def _update_block(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, start, offs, mask,
                  decay, lerp_coef, lerp_from_grad, beta2, one_minus_beta2, step_size,
                  bias_correction2_sqrt, eps, grad_scale, grad_coef, seed, tensor_id,
                  AMSGRAD: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr, MASKED: tl.constexpr,
                  FP64: tl.constexpr, BF16_ROUND_BY_BITS: tl.constexpr, SR: tl.constexpr, BLOCK: tl.constexpr):
    math_ty = tl.float64 if FP64 else tl.float32
    word_a = 0
    word_b = 0
    if SR:  # the block's words (offs = start + arange(BLOCK)); B only for bfloat16 states
        word_a = sr_words(seed, tensor_id, start, 0, BLOCK)
        if m_ptr.dtype.element_ty == tl.bfloat16:
            word_b = sr_words(seed, tensor_id, start, 1, BLOCK)
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
        _store(vmax_ptr, offs, mask, max_exp_avg_sq, MASKED, BF16_ROUND_BY_BITS, SR, word_b >> 16)
    denom = _div(_sqrt(second_moment, FP64), bias_correction2_sqrt, FP64) + eps
    param = param - _div(step_size * exp_avg, denom, FP64)
    _store(p_ptr, offs, mask, param, MASKED, BF16_ROUND_BY_BITS, SR, word_a & 0xFFFF)
    _store(m_ptr, offs, mask, exp_avg, MASKED, BF16_ROUND_BY_BITS, SR, word_a >> 16)
    _store(v_ptr, offs, mask, exp_avg_sq, MASKED, BF16_ROUND_BY_BITS, SR, word_b & 0xFFFF)


@triton.jit
def _full_blocks(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, begin, full_end,
                 decay, lerp_coef, lerp_from_grad, beta2, one_minus_beta2, step_size,
                 bias_correction2_sqrt, eps, grad_scale, grad_coef, seed, tensor_id,
                 AMSGRAD: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr, FP64: tl.constexpr,
                 BF16_ROUND_BY_BITS: tl.constexpr, SR: tl.constexpr, BLOCK: tl.constexpr):
    for start in range(begin, full_end, BLOCK):
        offs = tl.max_contiguous(tl.multiple_of(start + tl.arange(0, BLOCK), BLOCK), BLOCK)
        _update_block(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, start, offs, None, decay, lerp_coef, lerp_from_grad,
                      beta2, one_minus_beta2, step_size, bias_correction2_sqrt, eps, grad_scale, grad_coef,
                      seed, tensor_id, AMSGRAD, HAS_GRAD_SCALE, False, FP64, BF16_ROUND_BY_BITS, SR, BLOCK)


@triton.jit
def _adamw_kernel(
    table_ptr,        # int64 [L * n + 2 * n + 2 * programs]: addresses [L, n] (rows params, grads,
                      # exp_avgs, exp_avg_sqs, (max_exp_avg_sqs,) steps, (SR: tensor ids)), numels
                      # [n], vector flags [n], program -> tensor [programs], program -> chunk
    hparams_ptr,      # float64 [n, 5] contiguous: lr, beta1, beta2, weight_decay, eps per tensor
    grad_scale_ptr,   # [1] float32/float64; read only when HAS_GRAD_SCALE
    found_inf_ptr,    # [1] float32/float64; read only when HAS_FOUND_INF
    clip_coef_ptr,    # [1] float32/float64; read only when HAS_CLIP_COEF
    sr_seed_ptr,      # [1] int64: the Philox key; read only when SR
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
    SR: tl.constexpr,            # bfloat16 stores by stochastic rounding (csrc/adamw.h's stream)
    CHUNK: tl.constexpr,         # elements per program
    BLOCK: tl.constexpr,         # elements per loop step
):
    math_ty = tl.float64 if FP64 else tl.float32
    n_lists: tl.constexpr = 6 if AMSGRAD else 5
    n_rows: tl.constexpr = n_lists + 1 if SR else n_lists
    program = tl.program_id(0)
    numels_ptr = table_ptr + n_rows * n_tensors
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
    seed = 0
    tensor_id = 0
    if SR:
        seed = tl.load(sr_seed_ptr).to(tl.uint64, bitcast=True)
        tensor_id = tl.load(table_ptr + n_lists * n_tensors + tensor)

    if vector:  # every operand of this tensor 16-byte aligned: 16-byte accesses on full blocks
        _full_blocks(tl.multiple_of(p_ptr, 16), tl.multiple_of(g_ptr, 16), tl.multiple_of(m_ptr, 16),
                     tl.multiple_of(v_ptr, 16), tl.multiple_of(vmax_ptr, 16), begin, full_end,
                     decay, lerp_coef, lerp_from_grad, beta2, one_minus_beta2, step_size,
                     bias_correction2_sqrt, eps, grad_scale, grad_coef, seed, tensor_id,
                     AMSGRAD, HAS_GRAD_SCALE, FP64, BF16_ROUND_BY_BITS, SR, BLOCK)
    else:
        _full_blocks(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, begin, full_end,
                     decay, lerp_coef, lerp_from_grad, beta2, one_minus_beta2, step_size,
                     bias_correction2_sqrt, eps, grad_scale, grad_coef, seed, tensor_id,
                     AMSGRAD, HAS_GRAD_SCALE, FP64, BF16_ROUND_BY_BITS, SR, BLOCK)
    offs = full_end + tl.arange(0, BLOCK)
    _update_block(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, full_end, offs, offs < end, decay, lerp_coef,
                  lerp_from_grad, beta2, one_minus_beta2, step_size, bias_correction2_sqrt, eps, grad_scale,
                  grad_coef, seed, tensor_id, AMSGRAD, HAS_GRAD_SCALE, True, FP64, BF16_ROUND_BY_BITS, SR, BLOCK)


# ----------------------------------------------------------------------------- host side

_tables = _pointer_table.TableCache(_TABLE_CACHE_SIZE)


def prepare_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, hparams, amsgrad,
                 grad_scale, found_inf, clip_coef, tables: _pointer_table.TableCache | None = None,
                 sr_seed=None, sr_tensor_ids=()) -> tuple[_pointer_table.PointerTable, torch.dtype]:
    """Everything a step does on the host but the launch: the checks and the pointer table, from
    `tables` (default: this module's cache). Returns (table, the states' dtype); raises ValueError
    naming the argument at fault, or RuntimeError for a table to build during CUDA graph capture.
    With sr_seed the table has one more row after the steps: each tensor's id in the random stream."""
    tables = _tables if tables is None else tables
    state_dtype = _check_constant_time(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, hparams,
                                       amsgrad, grad_scale, found_inf, clip_coef, sr_seed, sr_tensor_ids)
    lists = [params, grads, exp_avgs, exp_avg_sqs] + ([max_exp_avg_sqs] if amsgrad else []) + [steps]
    vector_rows = len(lists) - 1  # every list but steps is accessed in vectors
    base_key = _pointer_table.table_key(lists)
    rows = _pointer_table.key_addresses(base_key)
    key = base_key
    if sr_seed is not None:
        rows.append(tuple(sr_tensor_ids) if len(sr_tensor_ids) else tuple(range(len(params))))
        key = base_key + (("sr",) + rows[-1],)
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
        entry = _pointer_table.build(rows, [p.numel() for p in params], vector_rows, _CHUNK, device)
        tables.put(key, entry)
    return entry, state_dtype


@registered_as("adamw_step__triton")
def adamw_step_(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
                exp_avg_sqs: list[torch.Tensor], max_exp_avg_sqs: list[torch.Tensor], steps: list[torch.Tensor],
                hparams: torch.Tensor, amsgrad: bool, maximize: bool, grad_scale: torch.Tensor | None,
                found_inf: torch.Tensor | None, clip_coef: torch.Tensor | None,
                sr_seed: torch.Tensor | None = None, sr_tensor_ids: list[int] = ()) -> None:
    """One AdamW step (fusedreg/reference/adamw.py's math). Mutates params, exp_avgs, exp_avg_sqs
    (and max_exp_avg_sqs if amsgrad), each element rounded once to its dtype (bfloat16 ones
    stochastically with sr_seed); returns nothing. Capturable in a CUDA graph after one call with
    the same tensors."""
    entry, state_dtype = prepare_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, hparams,
                                      amsgrad, grad_scale, found_inf, clip_coef, None, sr_seed, sr_tensor_ids)
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
            hparams if sr_seed is None else sr_seed,
            entry.n_tensors, entry.programs,
            PARAM_DTYPE=_TL_DTYPES[dtype], STATE_DTYPE=_TL_DTYPES[state_dtype],
            AMSGRAD=amsgrad, MAXIMIZE=maximize, HAS_GRAD_SCALE=grad_scale is not None,
            HAS_FOUND_INF=found_inf is not None, HAS_CLIP_COEF=clip_coef is not None,
            FP64=dtype == torch.float64,
            # The interpreter's float32 -> bfloat16 cast truncates; compiled kernels round to
            # nearest even in hardware (cvt.rn), as torch does.
            BF16_ROUND_BY_BITS=interpreted() and torch.bfloat16 in (dtype, state_dtype),
            SR=sr_seed is not None,
            CHUNK=_CHUNK, BLOCK=_BLOCK, num_warps=_NUM_WARPS,
            # the reference rounds every product and sum: no multiply-add contraction
            enable_fp_fusion=False,
        )
