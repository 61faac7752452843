"""Sync-free mode: the ops read nothing back to the host (docs/design.md §2, host syncs).

By default an op reads its ids' range once per call before any kernel runs (one device sync
on a GPU) and raises at once. In sync-free mode it reads nothing: ids are clamped into range
by device ops before any kernel reads memory, and a per-device error record (a small int64
tensor on the ids' device) notes which argument held an id out of range. The record raises
at the next check: `check_errors()`, the end of a `with sync_free():` block, or the next op
call in the default mode on that device (folded into that call's one read).

The switch follows `dept_kernels.backends` (`set_backend` / `use_backend`): `set_sync_free`
sets the process default, `with sync_free():` the running context (thread or asyncio task)
only. The mode is read when an op runs, not when it is traced.
"""

from __future__ import annotations

import contextvars
import threading

import torch
from torch import Tensor

__all__ = ["check_errors", "set_sync_free", "sync_free", "sync_free_enabled"]

# The arguments a record can name, one row each: [calls with an id out of range, the last
# offending id, its bound]. Fixed, so the record never grows (its address stays the same
# across CUDA-graph replays).
NAMES = ("input_ids", "position_ids", "task_ids", "ids")

_default = False
_context: contextvars.ContextVar[bool | None] = contextvars.ContextVar(
    "dept_kernels_sync_free", default=None
)
_records: dict[torch.device, Tensor] = {}
_records_lock = threading.Lock()


def set_sync_free(enabled: bool) -> None:
    """Set the process default of the sync-free mode (off at import)."""
    global _default
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
    _default = enabled


def sync_free_enabled() -> bool:
    """Whether the ops run sync-free here: the running context's choice, else the default."""
    choice = _context.get()
    return _default if choice is None else choice


class sync_free:
    """`with sync_free(): ...` runs the ops sync-free in the running context only.

    On a normal exit the block checks the error records (`check_errors`: one read per
    device that has one), so an id out of range inside it raises there; `check=False`
    leaves that to a later check (a block captured into a CUDA graph must not read).
    `sync_free(False)` turns the mode off inside the block.
    """

    def __init__(self, enabled: bool = True, *, check: bool = True) -> None:
        if not isinstance(enabled, bool):
            raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
        self.enabled = enabled
        self.check = check
        self._tokens: list[contextvars.Token] = []

    def __enter__(self) -> sync_free:
        self._tokens.append(_context.set(self.enabled))
        return self

    def __exit__(self, exc_type, *exc: object) -> None:
        _context.reset(self._tokens.pop())
        if exc_type is None and self.check and self.enabled:
            check_errors()


def _record(device: torch.device) -> Tensor:
    with _records_lock:
        record = _records.get(device)
        if record is None:
            # A normal tensor even when first made under inference mode, so that calls
            # outside it may update it in place.
            with torch.inference_mode(False):
                record = torch.zeros(len(NAMES), 3, dtype=torch.int64, device=device)
            _records[device] = record
        return record


def pending(device: torch.device) -> Tensor | None:
    """A 0-dim bool device tensor: whether `device`'s record holds an error (None without a
    record: nothing ran sync-free there)."""
    record = _records.get(device)
    return None if record is None else record[:, 0].any()


def clamp(name: str, ids: Tensor, upper: int) -> Tensor:
    """`ids` clamped into [0, upper), noting in the device's record, without reading it,
    whether any was outside."""
    if ids.numel() == 0:
        return ids
    if upper < 1:
        # No id can be in range, whatever the values: no read needed to know it.
        raise IndexError(f"{name} holds ids but their range [0, {upper}) is empty")
    row = _record(ids.device)[NAMES.index(name)]
    lo, hi = torch.aminmax(ids)
    below = lo < 0
    bad = below | (hi >= upper)
    row[0].add_(bad)
    row[1].copy_(torch.where(bad, torch.where(below, lo, hi), row[1]))
    row[2].masked_fill_(bad, upper)
    return ids.clamp(0, upper - 1)


def check_errors(device: torch.device | str | None = None) -> None:
    """Raise, and clear, what sync-free calls recorded: a ValueError naming the argument
    that held an id out of range since the last check. Reads each record once (a device
    sync): call it where a sync is acceptable, e.g. before the optimizer step.

    Args:
        device: check only this device's record; None checks every device.
    """
    with _records_lock:
        if device is None:
            records = list(_records.items())
        else:
            device = torch.device(device)
            if device.type == "cuda" and device.index is None:
                device = torch.device("cuda", torch.cuda.current_device())
            records = [(device, _records[device])] if device in _records else []
    for where, record in records:
        # A copy: on the CPU `.cpu()` is the record itself, which is cleared next.
        counts, values, uppers = record.to("cpu", copy=True).unbind(1)
        if not bool(counts.any()):
            continue
        record.zero_()
        found = [
            f"{name} held id {int(values[i])}, out of range [0, {int(uppers[i])}) "
            f"(last seen; {int(counts[i])} call(s))"
            for i, name in enumerate(NAMES)
            if counts[i]
        ]
        raise ValueError(
            f"sync-free mode on {where}: " + "; ".join(found) + ". Those ids were clamped "
            "into range, so the outputs (and gradients) of the calls that read them are wrong"
        )
