"""Argument checks shared by the ops: each error names the argument and the problem."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from . import _sync_free

ID_DTYPES = (torch.int64, torch.int32)
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_tensor(name: str, x: object) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def check_ndim(name: str, x: Tensor, ndim: int) -> None:
    if x.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(x.shape)}")


def check_ids(name: str, x: object, ndim: int) -> None:
    """Integer index tensor of the given rank."""
    x = _check_tensor(name, x)
    if x.dtype not in ID_DTYPES:
        raise TypeError(f"{name} must be int64 or int32, got {x.dtype}")
    check_ndim(name, x, ndim)


def check_float(name: str, x: object, ndim: int) -> None:
    """Floating tensor (fp32, fp16 or bf16) of the given rank."""
    x = _check_tensor(name, x)
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {x.dtype}")
    check_ndim(name, x, ndim)


def check_device(name: str, x: Tensor, device: torch.device, like: str = "weight") -> None:
    """`x` lives on `device`, the device of the argument named `like`."""
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but {like} is on {device}")


class Range(NamedTuple):
    """The ids of argument `name` must lie in [0, upper); `hint`, when given, follows the
    error message: what the bound is and how to stay within it."""

    name: str
    ids: Tensor
    upper: int
    hint: str = ""


def check_range(name: str, ids: Tensor, upper: int, hint: str = "") -> None:
    """All ids in [0, upper), else an IndexError. Reads the ids (a device sync on GPU) before
    any kernel does, whatever the mode: for callers that read the ids anyway."""
    if ids.numel() == 0:
        return
    lo, hi = torch.aminmax(ids)
    lo, hi = int(lo), int(hi)
    tail = f"; {hint}" if hint else ""
    if lo < 0:
        raise IndexError(f"{name} holds a negative id ({lo}); ids must lie in [0, {upper}){tail}")
    if hi >= upper:
        raise IndexError(f"{name} holds id {hi}, out of range [0, {upper}){tail}")


def checked(*ranges: Range) -> list[Tensor]:
    """The ids of each range, safe for a kernel to read, in order.

    Default mode: checked with one read for all of them (a device sync on GPU), which also
    raises what sync-free calls recorded on that device (`_sync_free`); an id out of range
    raises `check_range`'s IndexError, the first argument's first. The ids come back as
    given. Sync-free mode: nothing is read; the ids come back clamped into range and any
    outside is recorded, to raise at the next check.
    """
    if _sync_free.sync_free_enabled():
        return [_sync_free.clamp(r.name, r.ids, r.upper) for r in ranges]
    flags = range_flags(ranges)
    if flags and bool(torch.stack(flags).any()):
        raise_out_of_range(ranges)
    return [r.ids for r in ranges]


def range_flags(ranges: tuple[Range, ...] | list[Range]) -> list[Tensor]:
    """0-D bool tensors, none read yet: one per non-empty range, true when it holds an id
    outside [0, upper), and one per device with a sync-free error recorded. A caller that
    reads something else anyway reads these in the same transfer (`checked` reads only
    them)."""
    flags = []
    for r in ranges:
        if r.ids.numel():
            lo, hi = torch.aminmax(r.ids)
            flags.append((lo < 0) | (hi >= r.upper))
    devices = {r.ids.device for r in ranges}
    return flags + [p for p in map(_sync_free.pending, devices) if p is not None]


def raise_out_of_range(ranges: tuple[Range, ...] | list[Range]) -> None:
    """Raise what a true `range_flags` flag stands for: `check_range`'s IndexError for the
    first range out of range, else the sync-free error recorded on a device."""
    for r in ranges:
        check_range(*r)
    for device in {r.ids.device for r in ranges}:
        _sync_free.check_errors(device)


def check_scaling(scaling: object) -> None:
    """A finite Python number (a bool is refused: it is a flag, not a multiplier)."""
    if not isinstance(scaling, (int, float)) or isinstance(scaling, bool):
        raise TypeError(f"scaling must be a Python number, got {type(scaling).__name__}")
    if not math.isfinite(scaling):
        raise ValueError(f"scaling must be finite, got {scaling}")
