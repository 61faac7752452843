"""Memory measures: the bytes autograd saves for backward, and the peak extra allocation."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
from torch import Tensor

T = TypeVar("T")


def saved_bytes(fn: Callable[[], T]) -> tuple[T, int]:
    """`fn()`'s result and the bytes of the tensors autograd saved for backward during it."""
    total = 0

    def pack(t: Tensor) -> Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, total


def peak_extra_bytes(fn: Callable[[], object], device: str) -> int:
    """Peak bytes allocated on `device` during `fn()` above what was allocated at its start.

    The outputs and gradients `fn` makes count, as do its temporaries. On CUDA this is the
    caching allocator's peak; on the CPU, which keeps no such statistic, the running sum of
    the profiler's allocation events (in the order they happened).
    """
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [
        e
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    ]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak
