"""Argument checks shared by the ops: each error names the argument and the problem."""

from __future__ import annotations

import math

import torch
from torch import Tensor

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


def check_range(name: str, ids: Tensor, upper: int, hint: str = "") -> None:
    """All ids in [0, upper). Reads the ids (a device sync on GPU) before any kernel does.

    `hint`, when given, follows the message: what the bound is and how to stay within it.
    """
    if ids.numel() == 0:
        return
    lo, hi = torch.aminmax(ids)
    lo, hi = int(lo), int(hi)
    tail = f"; {hint}" if hint else ""
    if lo < 0:
        raise IndexError(f"{name} holds a negative id ({lo}); ids must lie in [0, {upper}){tail}")
    if hi >= upper:
        raise IndexError(f"{name} holds id {hi}, out of range [0, {upper}){tail}")


def check_scaling(scaling: object) -> None:
    """A finite Python number (a bool is refused: it is a flag, not a multiplier)."""
    if not isinstance(scaling, (int, float)) or isinstance(scaling, bool):
        raise TypeError(f"scaling must be a Python number, got {type(scaling).__name__}")
    if not math.isfinite(scaling):
        raise ValueError(f"scaling must be finite, got {scaling}")
