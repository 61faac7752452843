"""The benchmarks' timing helpers: fault counts per call, and host memory kept while timing."""

from __future__ import annotations

import pytest
import torch

from dept_kernels.bench import _timing

# 64 MiB: above glibc's largest dynamic mmap threshold (32 MiB on 64-bit), so by default each
# such tensor is mapped afresh and faulted in, one fault a 4 KiB page.
BLOCK = 16 << 20  # fp32 elements
PAGES = BLOCK * 4 // 4096


def refaults() -> int:
    """Minor faults of filling a block allocated right after a block of its size was freed."""
    torch.ones(BLOCK)
    before = _timing.minor_faults()
    torch.ones(BLOCK)
    return _timing.minor_faults() - before


@pytest.mark.skipif(not _timing._glibc(), reason="mallopt is glibc's")
def test_kept_freed_memory_reuses_pages_and_gives_them_back_after():
    refaults()  # the thread pool's start-up allocations out of the way
    with _timing.kept_freed_memory() as sentence:
        refaults()  # the heap grows once (a small block may have landed after the first)
        with _timing.kept_freed_memory():
            pass  # a nested use leaves the outer one's setting in place
        inside = refaults()
    outside = refaults()
    assert "kept" in sentence
    assert inside < PAGES // 16, f"{inside} faults reallocating inside (of {PAGES} pages)"
    assert outside > PAGES // 2, f"{outside} faults reallocating after: the default is back"


def test_interleaved_times_records_each_calls_faults():
    calls = {"small": lambda: torch.ones(16), "large": lambda: torch.ones(BLOCK)}
    faults: dict[str, list[int]] = {}
    times = _timing.interleaved_times(calls, 3, "cpu", faults)
    assert {k: len(v) for k, v in times.items()} == {"small": 3, "large": 3}
    assert {k: len(v) for k, v in faults.items()} == {"small": 3, "large": 3}
    # Outside `kept_freed_memory` a 64 MiB output faults its pages in on every call.
    if _timing._glibc():
        assert min(faults["large"]) > PAGES // 2
        assert max(faults["small"]) < PAGES // 16
