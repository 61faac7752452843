"""Dispatch: the backend that runs an op on tensors of a given device.

The ops call `resolve_later` where their arguments are checked, and `load(resolved(...))` in
their custom op's body: the one path from a user's selection to a kernel.
"""

from __future__ import annotations

import torch

from ._registry import automatic, check_device
from ._selection import current_backend

__all__ = ["resolve", "resolve_later", "resolved"]


def resolve(device: torch.device) -> str:
    """The backend to run on tensors living on `device`: the selection (context first, then
    the process default) if it takes that device (ValueError otherwise), else the automatic
    pick for the device (triton on CUDA where importable, cpu on CPU, else torch).

    Reads a context variable, which torch.compile cannot trace: traced code leaves the
    choice to the op's implementation, which runs eagerly (see `resolve_later`).
    """
    choice = current_backend()
    if choice is None:
        return automatic(device)
    check_device(choice, device)
    return choice


def resolve_later(device: torch.device) -> str | None:
    """What a public op hands its custom op as the backend: the choice, or None while
    torch.compile traces, where the context variable cannot be read; the op's body then
    resolves it at run time, in the caller's context."""
    if torch.compiler.is_compiling():
        return None
    return resolve(device)


def resolved(backend: str | None, device: torch.device) -> str:
    """In a custom op's body: the backend `resolve_later` passed, or resolved now.

    A backend given is checked against `device` again: a custom op called directly (by
    `torch.library.opcheck`, or from a saved graph) skips the public op's checks, and a
    kernel handed tensors of another device reads memory it cannot (ValueError instead).
    """
    if backend is None:
        return resolve(device)
    check_device(backend, device)
    return backend
