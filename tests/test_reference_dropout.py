"""The eager dropout reference against PyTorch's dropout behaviour (statistics, scaling, edge cases,
the checks PyTorch's own dropout tests make) and against its own layout contract (mask in memory
order of torch.empty_like(input), backward regenerates the forward mask)."""
import pytest
import torch
import torch.nn.functional as F

from fusedreg.reference import dropout as ref
from fusedreg.reference.philox import dropout_keep, dropout_scale


def seed_tensor(value=1234):
    return torch.tensor([value], dtype=torch.int64)


def memory_order(t):
    """t's elements in memory order (t non-overlapping and dense)."""
    return t.as_strided((t.numel(),), (1,))


def expected_dropout(x, mask, p):
    """x * mask * scale with fp32 math (fp64 for float64) and one rounding, dropped -> 0."""
    math_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    scaled = x.to(math_dtype) * dropout_scale(p, math_dtype)
    return torch.where(mask, scaled, torch.zeros((), dtype=math_dtype)).to(x.dtype)


def inputs(kind, fill=None):
    """A float32 input of >= 60k elements (keep rate sd <= 0.002): contiguous, permuted (dense but
    not contiguous) or sliced (not dense)."""
    base = torch.randn(96, 2 * 641, generator=torch.Generator().manual_seed(0))
    if fill is not None:
        base.fill_(fill)
    return {"contiguous": base, "permuted": base.t(), "sliced": base[:, ::2]}[kind]


# ----------------------------------------------------------------------------- statistics vs PyTorch

@pytest.mark.parametrize("kind", ["contiguous", "permuted", "sliced"])
@pytest.mark.parametrize("p", [0.2, 0.5, 0.8])
def test_keep_rate_scale_and_mean_like_pytorch(kind, p):
    # PyTorch's test_Dropout: input filled with 1 - p keeps its mean within 0.05
    x = inputs(kind, fill=1 - p)
    y = ref.dropout_fwd(x, seed_tensor(), p)
    kept = y != 0
    assert abs(kept.double().mean().item() - (1 - p)) < 0.01
    assert abs(y.double().mean().item() - (1 - p)) < 0.05
    assert torch.equal(y[kept], x[kept] * dropout_scale(p))
    # PyTorch's dropout on the same input: same keep rate, same scaled value (to float rounding)
    torch.manual_seed(0)
    y_torch = F.dropout(x, p, training=True)
    kept_torch = y_torch != 0
    assert abs(kept_torch.double().mean().item() - (1 - p)) < 0.01
    torch.testing.assert_close(y[kept].max(), y_torch[kept_torch].max(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("p", [0.2, 0.5, 0.8])
def test_kept_values_scaled_by_one_over_one_minus_p(p):
    x = inputs("contiguous")
    y = ref.dropout_fwd(x, seed_tensor(), p)
    mask = ref.dropout_mask(x, seed_tensor(), p)
    assert torch.equal(y, expected_dropout(x, mask, p))
    assert torch.equal(y[~mask], torch.zeros_like(y[~mask]))
    torch.testing.assert_close(y[mask].double(), x[mask].double() / (1 - p), rtol=1e-6, atol=0)


def test_p_zero_is_identity():
    x = inputs("sliced")
    y = ref.dropout_fwd(x, seed_tensor(), 0.0)
    assert torch.equal(y, x)


def test_p_one_gives_zeros_without_nan():
    x = inputs("contiguous").clone()
    x[0, :3] = torch.tensor([float("inf"), -float("inf"), float("nan")])
    y = ref.dropout_fwd(x, seed_tensor(), 1.0)
    assert not torch.isnan(y).any()
    assert torch.equal(y, torch.zeros_like(x))
    assert torch.equal(ref.dropout_bwd(x, seed_tensor(), 1.0), torch.zeros_like(x))


def test_invalid_arguments():
    x = torch.randn(10)
    for p in (-0.1, 1.1):
        with pytest.raises(ValueError, match="between 0 and 1"):
            ref.dropout_fwd(x, seed_tensor(), p)
    with pytest.raises(TypeError, match="input"):
        ref.dropout_fwd(torch.arange(10), seed_tensor(), 0.5)
    with pytest.raises(ValueError, match="seed"):
        ref.dropout_fwd(x, torch.tensor([1, 2]), 0.5)
    with pytest.raises(ValueError, match="seed"):
        ref.dropout_fwd(x, torch.tensor([1.0]), 0.5)


# ----------------------------------------------------------------------------- mask contract

def test_same_seed_same_mask_different_seed_different_mask():
    x = inputs("contiguous")
    y1 = ref.dropout_fwd(x, seed_tensor(7), 0.5)
    assert torch.equal(y1, ref.dropout_fwd(x, seed_tensor(7), 0.5))
    assert not torch.equal(y1 != 0, ref.dropout_fwd(x, seed_tensor(8), 0.5) != 0)
    assert not torch.equal(y1 != 0, ref.dropout_fwd(x, seed_tensor(-7), 0.5) != 0)
    # the mask depends on the seed's high word too
    assert not torch.equal(y1 != 0, ref.dropout_fwd(x, seed_tensor(7 + 2**32), 0.5) != 0)


@pytest.mark.parametrize("make", [
    lambda: torch.randn(37),
    lambda: torch.randn(6, 7).t(),
    lambda: torch.randn(5, 8)[:, 1::3],
    lambda: torch.randn(3, 1).expand(3, 5),
    lambda: torch.randn(2, 6, 5, 3).to(memory_format=torch.channels_last),
    lambda: torch.randn(2, 6, 5, 4).to(memory_format=torch.channels_last)[..., :3],
], ids=["odd", "transposed", "sliced", "expanded", "channels_last", "channels_last_sliced"])
def test_output_layout_and_mask_follow_empty_like(make):
    x = make()
    p = 0.4
    y = ref.dropout_fwd(x, seed_tensor(), p)
    layout = torch.empty_like(x)
    assert y.shape == x.shape and y.stride() == layout.stride()
    mask = ref.dropout_mask(x, seed_tensor(), p)
    assert mask.stride() == layout.stride()
    assert torch.equal(memory_order(mask), dropout_keep(1234, x.numel(), p))
    assert torch.equal(y, expected_dropout(x, mask, p))


def test_channels_last_mask_is_in_memory_order_not_logical_order():
    x = torch.randn(2, 8, 5, 7)
    x_cl = x.to(memory_format=torch.channels_last)
    y_cl = ref.dropout_fwd(x_cl, seed_tensor(), 0.5)
    assert y_cl.is_contiguous(memory_format=torch.channels_last)
    # memory order of NCHW-channels_last is N, H, W, C
    assert torch.equal((y_cl != 0).permute(0, 2, 3, 1).reshape(-1), dropout_keep(1234, x.numel(), 0.5))
    # same logical values in another layout draw another mask
    assert not torch.equal(y_cl != 0, ref.dropout_fwd(x, seed_tensor(), 0.5) != 0)


def test_backward_is_grad_times_mask_over_keep_probability():
    p = 0.3
    x = torch.randn(33, 17, requires_grad=True)
    dy = torch.randn(33, 17)
    mask = ref.dropout_mask(x, seed_tensor(), p)
    dx = ref.dropout_bwd(dy, seed_tensor(), p)
    # autograd of the forward's own formula (x * mask * scale) gives the same gradient, bit for bit
    (dx_autograd,) = torch.autograd.grad(x * mask * dropout_scale(p), x, dy)
    assert torch.equal(dx, dx_autograd)
    torch.testing.assert_close(dx.double(), dy.double() * mask / (1 - p), rtol=1e-6, atol=0)
    assert torch.equal(dx != 0, ref.dropout_fwd(x.detach(), seed_tensor(), p) != 0)


@pytest.mark.parametrize("make", [
    lambda: torch.randn(31, 9),
    lambda: torch.randn(2, 6, 5, 3).to(memory_format=torch.channels_last),
    lambda: torch.randn(9, 31).t(),
], ids=["contiguous", "channels_last", "transposed"])
def test_in_place_equals_out_of_place(make):
    x = make()
    expected = ref.dropout_fwd(x, seed_tensor(), 0.6)
    x_inplace = x.clone()  # clone keeps the layout
    assert ref.dropout_fwd_(x_inplace, seed_tensor(), 0.6) is None
    assert torch.equal(x_inplace, expected)


def test_in_place_on_a_strided_view_leaves_the_rest_alone():
    base = torch.randn(8, 10)
    view = base[:, ::2]
    expected = ref.dropout_fwd(view, seed_tensor(), 0.5)
    untouched = base[:, 1::2].clone()
    ref.dropout_fwd_(view, seed_tensor(), 0.5)
    assert torch.equal(base[:, ::2], expected)
    assert torch.equal(base[:, 1::2], untouched)


# ----------------------------------------------------------------------------- dtypes

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_low_and_double_precision_share_the_fp32_mask(dtype):
    p = 0.25
    x32 = torch.randn(129, 7)
    x = x32.to(dtype)
    y = ref.dropout_fwd(x, seed_tensor(), p)
    assert y.dtype == dtype
    mask = ref.dropout_mask(x32, seed_tensor(), p)
    assert torch.equal(y != 0, (ref.dropout_fwd(x32, seed_tensor(), p) != 0))
    assert torch.equal(y, expected_dropout(x, mask, p))
    if dtype == torch.float64:  # fp64 data keeps the unrounded scale
        assert torch.equal(y[mask], x[mask] * (1 / (1 - p)))


# ----------------------------------------------------------------------------- dropout_add

@pytest.mark.parametrize("with_bias", [True, False])
def test_dropout_add_is_residual_plus_dropout_of_biased_input(with_bias):
    p = 0.35
    x, residual = torch.randn(2, 11, 13), torch.randn(2, 11, 13)
    bias = torch.randn(13) if with_bias else None
    y = ref.dropout_add_fwd(x, residual, bias, seed_tensor(), p)
    biased = x + bias if with_bias else x
    assert torch.equal(y, residual + ref.dropout_fwd(biased, seed_tensor(), p))


def test_dropout_add_rounds_once_in_low_precision():
    p = 0.5
    x, residual = torch.randn(64, 24).to(torch.bfloat16), torch.randn(64, 24).to(torch.bfloat16)
    bias = torch.randn(24).to(torch.bfloat16)
    y = ref.dropout_add_fwd(x, residual, bias, seed_tensor(), p)
    mask = ref.dropout_mask(x, seed_tensor(), p)
    dropped = torch.where(mask, (x.float() + bias.float()) * dropout_scale(p), torch.zeros(()))
    assert torch.equal(y, (residual.float() + dropped).to(torch.bfloat16))


def test_dropout_add_channels_last_uses_the_input_layout_mask():
    x = torch.randn(2, 6, 5, 3).to(memory_format=torch.channels_last)
    residual = torch.randn(2, 6, 5, 3)  # another layout: values, not memory, are added
    y = ref.dropout_add_fwd(x, residual, None, seed_tensor(), 0.5)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(y, residual + ref.dropout_fwd(x, seed_tensor(), 0.5))


def test_dropout_add_rejects_mismatched_arguments():
    x = torch.randn(4, 6)
    with pytest.raises(ValueError, match="bias"):
        ref.dropout_add_fwd(x, x, torch.randn(4), seed_tensor(), 0.5)
    with pytest.raises(ValueError, match="residual"):
        ref.dropout_add_fwd(x, torch.randn(4, 5), None, seed_tensor(), 0.5)
    with pytest.raises(ValueError, match="residual"):
        ref.dropout_add_fwd(x, x.double(), None, seed_tensor(), 0.5)


# ----------------------------------------------------------------------------- empty

def test_empty_tensors():
    x = torch.empty(0, 3)
    y = ref.dropout_fwd(x, seed_tensor(), 0.5)
    assert y.shape == (0, 3) and y.dtype == x.dtype
    assert ref.dropout_bwd(x, seed_tensor(), 0.5).shape == (0, 3)
    assert ref.dropout_fwd_(x, seed_tensor(), 0.5) is None
    assert ref.dropout_add_fwd(x, x, torch.zeros(3), seed_tensor(), 0.5).shape == (0, 3)
    assert ref.dropout_mask(x, seed_tensor(), 0.5).shape == (0, 3)
