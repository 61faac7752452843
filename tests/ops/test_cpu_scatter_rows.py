"""The cpu backend's `scatter_rows`: a dense (num_rows, d) gradient from segment sums, every
row written once (its sum rounded once, or zeros), against a zero-filled table with the
sums added in, bit for bit; streamed and ordinary stores, column tails, the trailing empty
segments `segments` gives, and keys it could not give (out of order, out of range)."""

from __future__ import annotations

import pytest
import torch
from helpers import BACKENDS

from dept_kernels import backends
from dept_kernels.ops._grads import segments

pytestmark = pytest.mark.skipif("cpu" not in BACKENDS, reason="the cpu backend is not available")

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def _kernel():
    return backends.load("cpu").scatter_rows


def _sums_of(keys: torch.Tensor, num_rows: int, d: int, seed: int):
    """(used, sums) as the AoT backward forms them: `segments` of the keys, then fp32 sums
    (random here) with the empty segments' sums zero."""
    used, _, offsets = segments(keys, num_rows)
    assert used is not None, "more rows than keys: the segments carry their keys"
    sums = torch.randn(used.numel(), d, generator=torch.Generator().manual_seed(seed))
    sums[offsets[1:] == offsets[:-1]] = 0.0  # empty segments
    return used, sums


def _reference(num_rows: int, used: torch.Tensor, sums: torch.Tensor, dtype: torch.dtype):
    return torch.zeros(num_rows, sums.shape[1], dtype=dtype).index_add_(0, used, sums.to(dtype))


@pytest.mark.parametrize("d", [5, 37, 64])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_zeros_plus_sums(dtype, d):
    gen = torch.Generator().manual_seed(d)
    # Repeated keys, so some segments are empty; they repeat the largest row, 96, which a
    # token reads too: its row is its real sum, not the empty segments' zeros.
    keys = torch.randint(0, 40, (3, 20), generator=gen)
    keys[1, 3] = 96
    used, sums = _sums_of(keys, 97, d, seed=d)
    assert (used == 96).sum() > 1 and sums[used == 96][0].abs().sum() > 0
    out = torch.full((97, d), float("nan"), dtype=dtype)  # every row must be written
    got = _kernel()(used, sums, out)
    assert got.data_ptr() == out.data_ptr()
    assert torch.equal(got, _reference(97, used, sums, dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_streamed_output_matches(dtype):
    """An output larger than the stream threshold takes streaming stores, its rows' ends
    (d = 1027 is not a whole number of vectors) ordinary ones."""
    threshold = backends.load("cpu").module.stream_threshold()
    if threshold < 0:
        pytest.skip("no streaming stores on this target")
    d = 1027
    num_rows = threshold // (d * dtype.itemsize) + 7
    keys = torch.randint(0, num_rows, (4, 300), generator=torch.Generator().manual_seed(1))
    used, sums = _sums_of(keys, num_rows, d, seed=2)
    out = torch.empty(num_rows, d, dtype=dtype)
    assert out.nbytes > threshold
    assert torch.equal(_kernel()(used, sums, out), _reference(num_rows, used, sums, dtype))


def test_edges_and_bad_input():
    kernel = _kernel()
    # No segment: all zeros. No row: nothing written.
    out = kernel(torch.empty(0, dtype=torch.long), torch.empty(0, 9), torch.ones(5, 9))
    assert not out.any()
    no_rows = kernel(torch.zeros(2, dtype=torch.long), torch.ones(2, 9), torch.empty(0, 9))
    assert no_rows.numel() == 0
    # Keys `segments` never gives (out of order, out of range, negative): rows are written
    # only in [0, num_rows), so no write lands outside `out`.
    buffer = torch.full((12, 4), 7.0)
    out = buffer[1:11]
    keys = torch.tensor([9, 3, 10**9, -5, 2])
    kernel(keys, torch.ones(5, 4), out)
    assert torch.equal(buffer[0], torch.full((4,), 7.0))
    assert torch.equal(buffer[11], torch.full((4,), 7.0))
    assert out.isfinite().all()
    with pytest.raises(RuntimeError, match="sums must be fp32"):
        kernel(torch.zeros(2, dtype=torch.long), torch.ones(2, 4).double(), torch.empty(3, 4))
    with pytest.raises(RuntimeError, match="used must be int64"):
        kernel(torch.zeros(2, dtype=torch.int32), torch.ones(2, 4), torch.empty(3, 4))
    with pytest.raises(RuntimeError, match="out must be a contiguous"):
        kernel(torch.zeros(2, dtype=torch.long), torch.ones(2, 4), torch.empty(4, 3).t())
