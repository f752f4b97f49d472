"""Philox4x32-10 and the dropout mask layout: the eager reference against published test vectors and
an independent pure-Python Philox, then every kernel (C++ CPU, Triton, CUDA) against the reference
word for word. Masks can only be bit-identical across backends if these agree."""
import random

import pytest
import torch

from fusedreg import _backend, _build
from fusedreg.reference import philox as ref

MASK32 = 0xFFFFFFFF

# Philox4x32-10 known-answer vectors (Random123 kat_vectors): counter, key, expected output
KAT = [
    ((0x00000000, 0x00000000, 0x00000000, 0x00000000), (0x00000000, 0x00000000),
     (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF),
     (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


def philox_python(counter, key):
    """Philox4x32-10 on Python ints, written from the Random123 definition independently of the
    tensor reference (different code path: arbitrary-precision products, no limbs)."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(10):
        p0 = 0xD2511F53 * c0
        p1 = 0xCD9E8D57 * c2
        c0, c1, c2, c3 = (p1 >> 32) ^ c1 ^ k0, p1 & MASK32, (p0 >> 32) ^ c3 ^ k1, p0 & MASK32
        k0 = (k0 + 0x9E3779B9) & MASK32
        k1 = (k1 + 0xBB67AE85) & MASK32
    return c0, c1, c2, c3


def random_rows(n, seed=0):
    """Counters and keys that exercise every bit, including the top bit and the all-ones word."""
    rng = random.Random(seed)
    special = [0, 1, 0x7FFFFFFF, 0x80000000, MASK32]
    word = lambda: rng.choice(special) if rng.random() < 0.2 else rng.getrandbits(32)  # noqa: E731
    counter = torch.tensor([[word() for _ in range(4)] for _ in range(n)], dtype=torch.int64)
    key = torch.tensor([[word() for _ in range(2)] for _ in range(n)], dtype=torch.int64)
    return counter, key


def kat_tensors():
    counter = torch.tensor([c for c, _, _ in KAT], dtype=torch.int64)
    key = torch.tensor([k for _, k, _ in KAT], dtype=torch.int64)
    expected = torch.tensor([e for _, _, e in KAT], dtype=torch.int64)
    return counter, key, expected


# ----------------------------------------------------------------------------- reference

@pytest.mark.parametrize("counter,key,expected", KAT)
def test_python_philox_matches_known_answers(counter, key, expected):
    assert philox_python(counter, key) == expected


def test_reference_matches_known_answers():
    counter, key, expected = kat_tensors()
    assert torch.equal(ref.philox4x32(counter, key), expected)


def test_reference_matches_python_philox_on_random_rows():
    counter, key = random_rows(200)
    expected = [philox_python(c, k) for c, k in zip(counter.tolist(), key.tolist())]
    assert ref.philox4x32(counter, key).tolist() == [list(e) for e in expected]


def test_reference_takes_low_32_bits_and_broadcasts_the_key():
    counter, key = random_rows(16)
    high_bits = torch.tensor(0x5A5A << 32, dtype=torch.int64)
    out = ref.philox4x32(counter | high_bits, key[:1] - (1 << 40))  # [1, 2] key broadcasts
    assert torch.equal(out, ref.philox4x32(counter, (key[:1] - (1 << 40)) & MASK32).expand(16, 4))
    assert int(out.min()) >= 0 and int(out.max()) <= MASK32


def test_reference_rejects_bad_shapes():
    with pytest.raises(ValueError, match="counter"):
        ref.philox4x32(torch.zeros(3, 3, dtype=torch.int64), torch.zeros(3, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="key"):
        ref.philox4x32(torch.zeros(3, 4, dtype=torch.int64), torch.zeros(3, 2, dtype=torch.int32))


# ----------------------------------------------------------------------------- dropout layout

def layout_definition(seed, numel, p):
    """Element i keeps iff word i % 4 of philox((j mod 2**32, j >> 32, 0, 0), seed words) >= t."""
    groups = torch.arange(-(-numel // 4), dtype=torch.int64)
    counter = torch.stack([groups & MASK32, groups >> 32, 0 * groups, 0 * groups], dim=-1)
    key = torch.tensor([seed & MASK32, (seed >> 32) & MASK32], dtype=torch.int64)
    words = ref.philox4x32(counter, key).reshape(-1)[:numel]
    return words >= int(p * 2**32)


@pytest.mark.parametrize("seed", [0, 1234, 2**32 + 7, -1, -(2**63), 2**63 - 1])
@pytest.mark.parametrize("numel,p", [(1, 0.5), (37, 0.3), (1031, 0.9), (4096, 0.125)])
def test_dropout_keep_is_the_layout_definition(seed, numel, p):
    assert torch.equal(ref.dropout_keep(seed, numel, p), layout_definition(seed, numel, p))


def test_dropout_keep_does_not_depend_on_numel():
    # element i's bit is a function of (seed, i) only: a prefix of a longer mask is the shorter mask
    assert torch.equal(ref.dropout_keep(99, 4099, 0.5)[:37], ref.dropout_keep(99, 37, 0.5))


def test_dropout_keep_extremes_and_rate():
    assert bool(ref.dropout_keep(5, 1001, 0.0).all())
    assert not bool(ref.dropout_keep(5, 1001, 1.0).any())
    assert ref.dropout_keep(5, 0, 0.5).shape == (0,)
    rate = ref.dropout_keep(5, 200_000, 0.3).double().mean().item()
    assert abs(rate - 0.7) < 0.01


def test_threshold_and_scale():
    assert ref.dropout_threshold(0.0) == 0
    assert ref.dropout_threshold(0.5) == 2**31
    assert ref.dropout_threshold(0.1) == 429496729  # floor(0.1 * 2**32), 0.1 not exact in binary
    assert ref.dropout_threshold(1 - 2**-32) == 2**32 - 1
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError):
            ref.dropout_threshold(bad)
    assert ref.dropout_scale(0.1) == torch.tensor(1 / 0.9, dtype=torch.float32).item()
    assert ref.dropout_scale(0.1) != 1 / 0.9  # rounded to float32 once
    assert ref.dropout_scale(0.1, torch.float64) == 1 / 0.9
    assert ref.dropout_scale(0.0) == 1.0


# ----------------------------------------------------------------------------- kernels vs reference

@pytest.fixture(scope="module")
def cpu_library():
    try:
        _build.load_library("cpu")
    except _build.BuildError as exc:
        pytest.skip(f"fusedreg_cpu cannot be built here: {exc}")


@pytest.fixture(scope="module")
def cuda_library():
    try:
        _build.load_library("cuda")
    except _build.BuildError as exc:
        pytest.skip(f"fusedreg_cuda cannot be built here: {exc}")


def triton_device():
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    reason = _backend._triton_reason(device)
    if reason is not None:
        pytest.skip(f"Triton unusable: {reason}")
    return device


@pytest.fixture(scope="module")
def triton_selftest():
    device = triton_device()
    from fusedreg.triton import selftest  # registers fusedreg::_philox4x32_triton

    return selftest, device


def check_kernel_against_reference(op, device):
    counter, key, expected = kat_tensors()
    assert torch.equal(op(counter.to(device), key.to(device)).cpu(), expected)
    counter, key = random_rows(333, seed=1)
    assert torch.equal(op(counter.to(device), key.to(device)).cpu(), ref.philox4x32(counter, key))
    # strided inputs (column-major counter, every other row of key) and garbage in the high bits
    counter_t = (counter | (7 << 40)).t().contiguous().t().to(device)
    key_s = torch.stack([key, key], dim=1).reshape(-1, 2)[::2].to(device)
    assert not counter_t.is_contiguous() and not key_s.is_contiguous()
    assert torch.equal(op(counter_t, key_s).cpu(), ref.philox4x32(counter, key))
    empty = op(torch.zeros(0, 4, dtype=torch.int64, device=device),
               torch.zeros(0, 2, dtype=torch.int64, device=device))
    assert empty.shape == (0, 4)


def test_cpu_kernel_matches_reference(cpu_library):
    check_kernel_against_reference(torch.ops.fusedreg._philox4x32, "cpu")


def test_cpu_kernel_names_the_bad_argument(cpu_library):
    op = torch.ops.fusedreg._philox4x32
    with pytest.raises(RuntimeError, match="counter must have shape"):
        op(torch.zeros(3, 5, dtype=torch.int64), torch.zeros(3, 2, dtype=torch.int64))
    with pytest.raises(RuntimeError, match="key must be int64"):
        op(torch.zeros(3, 4, dtype=torch.int64), torch.zeros(3, 2, dtype=torch.int32))
    with pytest.raises(RuntimeError, match="key must have as many rows"):
        op(torch.zeros(3, 4, dtype=torch.int64), torch.zeros(2, 2, dtype=torch.int64))


def test_triton_kernel_matches_reference(triton_selftest):
    _, device = triton_selftest
    check_kernel_against_reference(torch.ops.fusedreg._philox4x32_triton, device)


def test_dropout_layout_is_triton_randint4x(triton_selftest):
    """The layout is tl.randint4x(seed, j) for int64 group indices j, beyond 2**32 too."""
    import triton
    import triton.language as tl

    @triton.jit
    def randint4x_kernel(offsets_ptr, out_ptr, seed, n, BLOCK: tl.constexpr):
        idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # offsets [n] int64, out [n, 4] int64
        valid = idx < n
        j = tl.load(offsets_ptr + idx, mask=valid, other=0)
        w0, w1, w2, w3 = tl.randint4x(seed, j)
        tl.store(out_ptr + 4 * idx, w0.to(tl.uint32).to(tl.int64), mask=valid)
        tl.store(out_ptr + 4 * idx + 1, w1.to(tl.uint32).to(tl.int64), mask=valid)
        tl.store(out_ptr + 4 * idx + 2, w2.to(tl.uint32).to(tl.int64), mask=valid)
        tl.store(out_ptr + 4 * idx + 3, w3.to(tl.uint32).to(tl.int64), mask=valid)

    _, device = triton_selftest
    seed = 0x1234_5678_9ABC_DEF0
    groups = torch.tensor([0, 1, 2, 1000, 2**31, 2**32 - 1, 2**32, 2**32 + 5, 2**40 + 3], dtype=torch.int64)
    out = torch.empty(len(groups), 4, dtype=torch.int64, device=device)
    randint4x_kernel[(1,)](groups.to(device), out, seed, len(groups), BLOCK=16)
    counter = torch.stack([groups & MASK32, groups >> 32, 0 * groups, 0 * groups], dim=-1)
    key = torch.tensor([seed & MASK32, seed >> 32], dtype=torch.int64)
    assert torch.equal(out.cpu(), ref.philox4x32(counter, key))
    # and dropout_keep draws element 4j + k from word k of group j
    t = ref.dropout_threshold(0.5)
    assert torch.equal(ref.dropout_keep(seed, 4 * 1001, 0.5)[4000:], out[3].cpu() >= t)


@pytest.mark.gpu
def test_cuda_kernel_matches_reference(cuda_library):
    check_kernel_against_reference(torch.ops.fusedreg._philox4x32, "cuda")


@pytest.mark.gpu
def test_cuda_kernel_matches_cpu_kernel_on_many_rows(cuda_library, cpu_library):
    counter = torch.randint(0, 2**32, (100_000, 4), dtype=torch.int64)
    key = torch.randint(0, 2**32, (100_000, 2), dtype=torch.int64)
    on_cuda = torch.ops.fusedreg._philox4x32(counter.cuda(), key.cuda()).cpu()
    assert torch.equal(on_cuda, torch.ops.fusedreg._philox4x32(counter, key))
