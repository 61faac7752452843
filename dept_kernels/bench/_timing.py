"""Timing: medians with their interquartile range, and round-robin orders so that load from
other processes on a busy machine falls on every compared function alike."""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import statistics
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

import torch

try:
    import resource
except ImportError:  # not on Windows
    resource = None

T = TypeVar("T")


def at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an int no smaller than `minimum` (a count of rounds or steps)."""

    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


# glibc's mallopt parameters (malloc.h) and the defaults restored on exit (M_TRIM_THRESHOLD
# starts at 128 KiB; glibc's dynamic threshold does not come back once either is set).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_DEFAULTS = {_M_MMAP_MAX: 65536, _M_TRIM_THRESHOLD: 128 * 1024}
_kept = 0  # open `kept_freed_memory` contexts
_kept_lock = threading.Lock()


@contextlib.contextmanager
def kept_freed_memory() -> Iterator[str]:
    """Inside, host memory freed by tensors stays in the process, so that a benchmark's next
    output of the same size reuses pages already mapped. Yields a sentence for the report.

    Why: glibc hands a large block (above its mmap threshold, or freed at the top of the heap
    past its trim threshold) back to the OS, and the next allocation of that size takes a page
    fault per 4 KiB. Which candidate of a round-robin pays it depends on the order of frees,
    not on its kernel: on the 2-core VM, GPT-2's 14 MB output took ~3,400 faults (~5 ms, twice
    the forward) on some calls and none on others, and the spread of the rows reached 80-350%
    of their medians; with the memory kept, mostly under 10%. Every candidate allocates
    through the same heap, so what the kernels cost is compared, not the faults. A no-op off
    glibc; on exit the defaults are restored and what was kept is released (`malloc_trim`).
    """
    global _kept
    if not _glibc():
        yield "host memory: the allocator's default (not glibc: freed memory may fault again)"
        return
    libc = ctypes.CDLL(None)
    with _kept_lock:
        # Nested uses (a benchmark inside a timed session) set and restore only once.
        outermost = _kept == 0
        # No mmap for large blocks (they would be unmapped on free) and no trimming.
        if outermost and (
            libc.mallopt(_M_MMAP_MAX, 0) != 1 or libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) != 1
        ):
            _restore(libc)
            refused = True
        else:
            refused = False
            _kept += 1
    if refused:
        yield "host memory: the allocator's default (glibc refused mallopt)"
        return
    try:
        yield "host memory: freed memory kept in the process (no page faults from reallocation)"
    finally:
        with _kept_lock:
            _kept -= 1
            if _kept == 0:
                _restore(libc)


def _restore(libc: ctypes.CDLL) -> None:
    for param, value in _DEFAULTS.items():
        libc.mallopt(param, value)
    # What was kept goes back now: a kept block that a small one landed after is not at the
    # heap's top, so no later free would trim it, and the next allocation of its size would
    # reuse it without faulting where the default would fault (seen after the model tests).
    libc.malloc_trim(0)


def _glibc() -> bool:
    # os.confstr_names is absent on Windows, and lacks this name off glibc.
    if "CS_GNU_LIBC_VERSION" not in getattr(os, "confstr_names", {}):
        return False
    try:
        return (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")
    except (OSError, ValueError):
        return False


def sync(device: str | torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def rotation(items: Sequence[T], i: int) -> list[T]:
    """Round `i`'s order: `items` rotated by i, so each goes first as often as the others."""
    k = i % len(items)
    return [*items[k:], *items[:k]]


def median_iqr(times: Sequence[float]) -> tuple[float, float]:
    """The median and the interquartile range (0 for a single time)."""
    median = statistics.median(times)
    if len(times) < 2:
        return median, 0.0
    q1, _, q3 = statistics.quantiles(times, n=4)
    return median, q3 - q1


def median_time(fn: Callable[[], object], repeats: int, device: str) -> float:
    """Median wall time of `fn` in seconds, after two warm-up calls."""
    for _ in range(2):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_times(
    fns: dict[str, Callable[[], object]],
    repeats: int,
    device: str,
    faults: dict[str, list[int]] | None = None,
) -> dict[str, list[float]]:
    """Seconds of each call of each function, timed round-robin: each round runs every
    function once, in a rotated order, so that load from other processes on a busy machine
    falls on all of them alike; two untimed calls of each first. `faults`, when given, gets
    each call's minor page faults by name (the process's count, so other threads' too)."""
    for fn in fns.values():
        fn()
        fn()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(repeats):
        for name in rotation(list(fns), i):
            before = minor_faults() if faults is not None else 0
            start = time.perf_counter()
            fns[name]()
            sync(device)
            times[name].append(time.perf_counter() - start)
            if faults is not None:
                faults.setdefault(name, []).append(minor_faults() - before)
    return times


def minor_faults() -> int:
    """The process's minor page faults so far (0 where `resource` is missing)."""
    if resource is None:
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def interleaved_medians(
    fns: dict[str, Callable[[], object]], repeats: int, device: str
) -> dict[str, float]:
    """Median seconds of each function, timed round-robin (`interleaved_times`)."""
    return {
        name: statistics.median(t) for name, t in interleaved_times(fns, repeats, device).items()
    }
