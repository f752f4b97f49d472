"""The eval-mode statistics of fusedreg.batch_norm (fusedreg/ops/batch_norm.py, eval_stats): invstd
computed in place on one temporary must be bitwise the reference's 1 / torch.sqrt(running_var +
eps) (zero, subnormal, inf and NaN variances, every buffer / statistics dtype pair), must leave the
running buffers untouched, and an eval call must give the bits of its kernel fed the reference's
statistics."""
import pytest
import torch

import fusedreg
from conftest import device_backend_pairs
from fusedreg.ops._dispatch import kernel
from fusedreg.ops.batch_norm import eval_stats
from fusedreg.reference import batch_norm as reference

PAIRS = device_backend_pairs(with_reference=False)
DTYPE_PAIRS = [(torch.float32, torch.float32), (torch.float32, torch.float64), (torch.float64, torch.float32),
               (torch.bfloat16, torch.float32), (torch.float16, torch.float32), (torch.float64, torch.float64)]


def _bits(t):
    nan = torch.isnan(t)
    return torch.where(nan, torch.zeros((), dtype=t.dtype), t), nan


def _same_bits(a, b):
    (va, na), (vb, nb) = _bits(a), _bits(b)
    return a.dtype == b.dtype and torch.equal(na, nb) and torch.equal(va.view(torch.uint8), vb.view(torch.uint8))


def _buffers(dtype, device="cpu"):
    gen = torch.Generator().manual_seed(0)
    mean = torch.randn(67, generator=gen, dtype=torch.float64)
    var = torch.rand(67, generator=gen, dtype=torch.float64) * 10
    var[:6] = torch.tensor([0.0, float("nan"), float("inf"), 1e-39, 1e-5, 3e38])
    return mean.to(device, dtype), var.to(device, dtype)


@pytest.mark.parametrize("buffer_dtype,dtype", DTYPE_PAIRS, ids=str)
@pytest.mark.parametrize("eps", [1e-5, 0.0, 1e-3])
def test_invstd_is_the_reference_expression_bitwise(buffer_dtype, dtype, eps):
    running_mean, running_var = _buffers(buffer_dtype)
    saved_mean, saved_var = running_mean.clone(), running_var.clone()
    mean, invstd = eval_stats(running_mean, running_var, eps, dtype)
    assert _same_bits(invstd, 1 / torch.sqrt(running_var.to(dtype) + eps))
    assert _same_bits(mean, running_mean.to(dtype))
    assert _same_bits(running_var, saved_var) and _same_bits(running_mean, saved_mean)
    assert invstd.data_ptr() != running_var.data_ptr()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("device,backend", PAIRS)
def test_eval_output_is_the_kernel_on_the_reference_statistics(device, backend, dtype):
    running_mean, running_var = _buffers(torch.float32, device)
    running_var = running_var.abs().nan_to_num(1.0, 1.0)  # a finite variance per channel
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 67, 5, 3, generator=gen).to(device, dtype)
    weight, bias = torch.randn(67, generator=gen).to(device), torch.randn(67, generator=gen).to(device)
    ours = fusedreg.batch_norm(x, running_mean, running_var, weight, bias, False, backend=backend)
    fusedreg.batch_norm(x[:1], running_mean, running_var, weight, bias, False, backend=backend)  # loads it
    eps = 1e-5  # F.batch_norm's default, as fusedreg.batch_norm's
    invstd = 1 / torch.sqrt(running_var + eps)
    expected = kernel("batch_norm_elemt", backend, reference)(x, weight, bias, running_mean, invstd)
    assert _same_bits(ours, expected)


# (running buffers, input): the buffers in the input's dtype or in its statistics dtype
OP_DTYPE_PAIRS = [(torch.float32, torch.float32), (torch.float64, torch.float64), (torch.bfloat16, torch.bfloat16),
                  (torch.float16, torch.float16), (torch.float32, torch.bfloat16), (torch.float32, torch.float16)]


@pytest.mark.parametrize("buffer_dtype,input_dtype", OP_DTYPE_PAIRS, ids=str)
def test_cpu_eval_forward_computes_eval_stats_bits_itself(cpu_library, buffer_dtype, input_dtype):
    """A CPU eval call is one op: batch_norm_fwd's eval branch must return eval_stats' mean and
    invstd bit for bit (zero, subnormal, inf and NaN variances) and never write the running buffers,
    not even with their own values (their version counters stay)."""
    running_mean, running_var = _buffers(buffer_dtype)
    x = torch.randn(2, 67, 3).to(input_dtype)
    dtype = torch.float64 if input_dtype == torch.float64 else torch.float32
    versions = running_mean._version, running_var._version
    saved_mean, saved_var = running_mean.clone(), running_var.clone()
    _, mean, invstd = torch.ops.fusedreg.batch_norm_fwd(x, None, None, running_mean, running_var,
                                                        False, 0.1, 1e-5)
    expected_mean, expected_invstd = eval_stats(running_mean, running_var, 1e-5, dtype)
    assert _same_bits(mean, expected_mean) and _same_bits(invstd, expected_invstd)
    assert (running_mean._version, running_var._version) == versions
    assert _same_bits(running_var, saved_var) and _same_bits(running_mean, saved_mean)
