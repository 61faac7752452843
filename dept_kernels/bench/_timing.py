"""Timing helpers: medians, and round-robin medians for ratios on a busy machine."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def median_time(fn: Callable[[], object], repeats: int, device: str) -> float:
    """Median wall time of `fn` in seconds, after two warm-up calls."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(2):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_medians(
    fns: dict[str, Callable[[], object]], repeats: int, device: str
) -> dict[str, float]:
    """Median seconds of each function, timed round-robin.

    Each round runs every function once, in a rotated order, so that load from other
    processes falls on all of them alike and the ratios stay meaningful on a busy machine.
    """
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    names = list(fns)
    for fn in fns.values():
        fn()
        fn()
    sync()
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(repeats):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            start = time.perf_counter()
            fns[name]()
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}
