"""The cpu kernels' half-precision loads and stores (`csrc/cpu/lanes.h`, AVX-512 vectors where
the build has them) give the bits of PyTorch's own conversions: fp32 sums rounded once to
nearest even, NaN, infinities, signed zeros, subnormals, overflow to infinity in fp16 and
ties, at widths with and without a tail of elements after the last whole vector."""

from __future__ import annotations

import pytest
import torch
from helpers import BACKENDS

import dept_kernels
from dept_kernels import backends
from dept_kernels.ops import dept_embedding

pytestmark = pytest.mark.skipif("cpu" not in BACKENDS, reason="the cpu backend is not available")

HALF = [torch.bfloat16, torch.float16]
# One vector, whole vectors and a tail, a tail only.
WIDTHS = [16, 37, 5]


def _specials(dtype: torch.dtype) -> torch.Tensor:
    """fp32 values that probe a conversion: exact in `dtype` or halfway between two of its
    values (ties round to even), beyond its range, subnormal in it, non-finite."""
    info = torch.finfo(dtype)
    tie = 1.0 + info.eps / 2  # halfway between 1 and the next value: rounds to 1
    tie_up = 1.0 + 1.5 * info.eps  # halfway between 1 + eps and 1 + 2 eps: rounds up
    values = [0.0, -0.0, 1.0, -1.0, tie, -tie, tie_up, info.max, -info.max, info.tiny,
              info.tiny / 4, -info.tiny / 8, info.smallest_normal * 0.75, 65520.0, 1e6,
              float("inf"), float("-inf"), float("nan"), 3.14159, -2.71828]  # fmt: skip
    # A NaN whose payload fills the low bits: rounding its bits as a number would carry
    # into the sign and store -0.0 in bf16.
    payload_nan = torch.tensor([0x7FFFFFFF], dtype=torch.int32).view(torch.float32)
    return torch.cat([torch.tensor(values, dtype=torch.float32), payload_nan])


def _operands(dtype: torch.dtype, d: int, rows: int, seed: int) -> torch.Tensor:
    """(rows, d) fp32: random values at several scales with the special values spread in."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, d, generator=g) * 10.0 ** torch.randint(-3, 4, (rows, d), generator=g)
    flat = x.view(-1)
    specials = _specials(dtype)
    at = torch.randperm(flat.numel(), generator=g)[: min(flat.numel(), specials.numel())]
    flat[at] = specials[: at.numel()]
    return x


def _same_bits(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    nan = want.isnan()
    assert torch.equal(got.isnan(), nan)
    # Every non-NaN element bit for bit (so -0.0 against 0.0 counts).
    bits = torch.int16 if want.element_size() == 2 else torch.int32
    assert torch.equal(got[~nan].view(bits), want[~nan].view(bits))


@pytest.mark.parametrize("d", WIDTHS)
@pytest.mark.parametrize("table_dtype", [None, torch.float32], ids=["same", "fp32_table"])
@pytest.mark.parametrize("dtype", [*HALF, torch.float32], ids=str)
def test_gather_add_rounds_like_torch(dtype, table_dtype, d):
    """out = dtype(float(hidden) + float(table[row])): one rounding, PyTorch's bits."""
    hidden = _operands(dtype, d, 24, seed=d).to(dtype).view(4, 6, d)
    table = _operands(dtype, d, 9, seed=d + 1).to(table_dtype or dtype)
    rows = torch.randint(0, 9, (4, 6), generator=torch.Generator().manual_seed(d))
    want = (hidden.float() + table[rows].float()).to(dtype)
    kernel = backends.load("cpu").gather_add
    _same_bits(kernel(hidden, rows, table, torch.empty_like(hidden)), want)
    # In place, as inference runs it: each element is read before it is written.
    _same_bits(kernel(hidden, rows, table, hidden), want)


@pytest.mark.parametrize("d", [*WIDTHS, 64, 130])
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_reduce_sums_in_order_like_torch(dtype, d):
    """fp32 sums over the batch, sample after sample, of the exact fp32 values of the rows."""
    grad = _operands(dtype, d, 5 * 7, seed=d).to(dtype).view(5, 7, d)
    want = grad[0].float()
    for b in range(1, grad.shape[0]):
        want = want + grad[b].float()
    _same_bits(backends.load("cpu").reduce(grad, 0, None, None), want)


@pytest.mark.parametrize("d", WIDTHS)
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_forward_rounds_the_sum_once(dtype, d):
    """Token rows = dtype(float(embedding) + delta) with an exactly representable delta: A
    one-hot per position, so every delta element is one product of B (scaling 1)."""
    batch, seq, r = 3, 6, 4
    g = torch.Generator().manual_seed(d)
    weight = _operands(dtype, d, 11, seed=d).to(dtype)
    ids = torch.randint(0, 11, (batch, seq), generator=g)
    lora_a = torch.nn.functional.one_hot(torch.arange(seq) % r, r).to(dtype)
    lora_b = _operands(dtype, d, r, seed=d + 2).to(dtype)
    # fp32 products of dtype values; inf times the one-hot's zeros would make NaN in any
    # order of the sum, so B stays finite.
    lora_b = torch.nan_to_num(lora_b.float(), posinf=2.0, neginf=-2.0).to(dtype)
    delta = lora_b.float()[torch.arange(seq) % r]
    want = (weight[ids].float() + delta).to(dtype)
    with torch.no_grad(), dept_kernels.use_backend("cpu"):
        out = dept_embedding(ids, weight, None, lora_a, lora_b, scaling=1.0)
    _same_bits(out, want)
