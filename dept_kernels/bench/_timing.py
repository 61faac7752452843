"""Timing: medians with their interquartile range, and round-robin orders so that load from
other processes on a busy machine falls on every compared function alike."""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

T = TypeVar("T")


def at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an int no smaller than `minimum` (a count of rounds or steps)."""

    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


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
    fns: dict[str, Callable[[], object]], repeats: int, device: str
) -> dict[str, list[float]]:
    """Seconds of each call of each function, timed round-robin: each round runs every
    function once, in a rotated order, so that load from other processes on a busy machine
    falls on all of them alike; two untimed calls of each first."""
    for fn in fns.values():
        fn()
        fn()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(repeats):
        for name in rotation(list(fns), i):
            start = time.perf_counter()
            fns[name]()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def interleaved_medians(
    fns: dict[str, Callable[[], object]], repeats: int, device: str
) -> dict[str, float]:
    """Median seconds of each function, timed round-robin (`interleaved_times`)."""
    return {
        name: statistics.median(t) for name, t in interleaved_times(fns, repeats, device).items()
    }
