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


def _range_error(name: str, lo: int, hi: int, upper: int, hint: str) -> IndexError | None:
    """The error for ids of `name` whose least is `lo` and greatest `hi`, if any lies
    outside [0, upper)."""
    tail = f"; {hint}" if hint else ""
    if lo < 0:
        return IndexError(f"{name} holds a negative id ({lo}); ids must lie in [0, {upper}){tail}")
    if hi >= upper:
        return IndexError(f"{name} holds id {hi}, out of range [0, {upper}){tail}")
    return None


def checked(*ranges: Range) -> list[Tensor]:
    """The ids of each range, safe for a kernel to read, in order.

    Default mode: checked with one read for all of them (a device sync on GPU), which also
    raises what sync-free calls recorded on that device (`_sync_free`); an id out of range
    raises an IndexError naming the first argument out of range and its id. The ids come
    back as given. Sync-free mode: nothing is read; the ids come back clamped into range
    and any outside is recorded, to raise at the next check.
    """
    if _sync_free.sync_free_enabled():
        return [_sync_free.clamp(r.name, r.ids, r.upper) for r in ranges]
    reads = range_reads(ranges)
    if reads:
        raise_out_of_range(ranges, torch.stack(reads).tolist())
    return [r.ids for r in ranges]


def range_reads(ranges: tuple[Range, ...] | list[Range]) -> list[Tensor]:
    """0-D tensors, none read yet, that settle the ranges: each non-empty range's least
    and greatest id, then one bool per device with a sync-free error record: whether it holds
    an error. A caller that reads something else anyway reads these in the same transfer
    (`torch.stack(...).tolist()`) and passes what it read to `raise_out_of_range`. (The
    bounds are compared on the host: comparing them on the device took four more ops, each a
    kernel launch on a GPU.)"""
    reads = []
    for r in ranges:
        if r.ids.numel():
            reads.extend(torch.aminmax(r.ids))
    devices = {r.ids.device for r in ranges}
    return reads + [p for p in map(_sync_free.pending, devices) if p is not None]


def raise_out_of_range(ranges: tuple[Range, ...] | list[Range], values: list[int]) -> None:
    """From `values`, what `range_reads(ranges)` read: an IndexError naming the first range
    out of range and its id, else the sync-free error recorded on a device, else nothing."""
    read = iter(values)
    for r in ranges:
        if r.ids.numel():
            error = _range_error(r.name, next(read), next(read), r.upper, r.hint)
            if error is not None:
                raise error
    if any(read):
        for device in {r.ids.device for r in ranges}:
            _sync_free.check_errors(device)


def check_scaling(scaling: object) -> None:
    """A finite Python number (a bool is refused: it is a flag, not a multiplier)."""
    if not isinstance(scaling, (int, float)) or isinstance(scaling, bool):
        raise TypeError(f"scaling must be a Python number, got {type(scaling).__name__}")
    if not math.isfinite(scaling):
        raise ValueError(f"scaling must be finite, got {scaling}")
