"""The benchmarks' timing helpers: fault counts per call, and host memory kept while timing.

What a large allocation costs depends on the heap's state, which the whole process shares:
free chunks that earlier tests left in the middle of the heap (an earlier
`kept_freed_memory`, the model tests' tensors) serve a later allocation without faults, where
a clean heap maps and faults it afresh. So the checks of fault counts run in a fresh process
(`in_fresh_process`), whatever ran before them in this one.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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


def in_fresh_process(name: str) -> None:
    """Run this module's function `name` in a new Python process; fail with its output."""
    here = Path(__file__).resolve()
    code = (
        f"import sys; sys.path.insert(0, {str(here.parent)!r}); import {here.stem} as t; t.{name}()"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.skipif(not _timing._glibc(), reason="mallopt is glibc's")
def test_kept_freed_memory_reuses_pages_and_gives_them_back_after():
    in_fresh_process("check_kept_freed_memory")


def test_interleaved_times_records_each_calls_faults():
    in_fresh_process("check_interleaved_faults")


def check_kept_freed_memory() -> None:
    refaults()  # the thread pool's start-up allocations out of the way
    with _timing.kept_freed_memory() as sentence:
        refaults()  # the heap grows once (a small block may have landed after the first)
        with _timing.kept_freed_memory():
            pass  # a nested use leaves the outer one's setting in place
        # The fewest of three: a freed block that is not at the heap's top can be split by
        # a small allocation before the next large one, which then grows the heap afresh
        # (seen once in six CI runs). Without the kept memory every one of them faults.
        inside = min(refaults() for _ in range(3))
    outside = refaults()
    assert "kept" in sentence
    assert inside < PAGES // 16, f"{inside} faults reallocating inside (of {PAGES} pages)"
    assert outside > PAGES // 2, f"{outside} faults reallocating after: the default is back"


def check_interleaved_faults() -> None:
    calls = {"small": lambda: torch.ones(16), "large": lambda: torch.ones(BLOCK)}
    faults: dict[str, list[int]] = {}
    times = _timing.interleaved_times(calls, 3, "cpu", faults)
    assert {k: len(v) for k, v in times.items()} == {"small": 3, "large": 3}
    assert {k: len(v) for k, v in faults.items()} == {"small": 3, "large": 3}
    # Outside `kept_freed_memory` a 64 MiB output faults its pages in on every call.
    if _timing._glibc():
        assert min(faults["large"]) > PAGES // 2
        assert max(faults["small"]) < PAGES // 16
