"""Backend selection: which implementation of each op runs.

`use_backend(name)` sets the backend globally when called as a function and restores the
previous choice when used as a context manager. `None` (the default) picks per tensor
device: CUDA tensors run on triton, CPU tensors on the C++ cpu kernels.
"""

from __future__ import annotations

import functools
import os

import torch

BACKENDS = ("torch", "cpu", "triton", "cuda")

_choice: str | None = None


class use_backend:
    """Select the backend: `use_backend("cpu")` or `with use_backend("triton"): ...`.

    Names: "torch" (eager reference), "cpu" (C++), "triton", "cuda", or None for automatic.
    A plain call sets the choice for the process; as a context manager the previous choice
    comes back on exit.
    """

    def __init__(self, name: str | None) -> None:
        if name is not None and name not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS} or None, got {name!r}")
        global _choice
        self._previous = _choice
        _choice = name

    def __enter__(self) -> use_backend:
        return self

    def __exit__(self, *exc: object) -> None:
        global _choice
        _choice = self._previous


def current_backend() -> str | None:
    """The explicitly selected backend, or None when it is picked per device."""
    return _choice


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def available_backends() -> list[str]:
    """The backends that can run on this machine, in order of preference."""
    names = []
    if torch.cuda.is_available():
        if _triton_importable():
            names.append("triton")
        from . import _build

        if _build.cuda_extension_available():
            names.append("cuda")
    from . import _build

    if _build.cpu_extension_available():
        names.append("cpu")
    if "triton" not in names and _triton_importable() and triton_interpreting():
        names.append("triton")
    names.append("torch")
    return names


def resolve(device: torch.device) -> str:
    """The backend to run on tensors living on `device`."""
    choice = _choice
    if choice is None:
        return (
            "triton"
            if device.type == "cuda" and _triton_importable()
            else ("cpu" if device.type == "cpu" else "torch")
        )
    if choice == "cpu" and device.type != "cpu":
        raise ValueError(f"backend 'cpu' needs CPU tensors, got tensors on {device}")
    if choice == "cuda" and device.type != "cuda":
        raise ValueError(f"backend 'cuda' needs CUDA tensors, got tensors on {device}")
    if choice == "triton":
        if not _triton_importable():
            raise RuntimeError("backend 'triton' selected but the triton package is not installed")
        if device.type == "cpu" and not triton_interpreting():
            raise ValueError(
                "backend 'triton' runs on CPU tensors only under TRITON_INTERPRET=1; "
                "use CUDA tensors or the 'cpu' backend"
            )
    return choice
