"""Backend selection: which implementation of each op runs.

`use_backend(name)` called as a function sets the process default; used as a context manager
it sets the choice for the running context only (a thread, an asyncio task) and takes it back
on exit, so overlapping contexts in other threads neither see nor undo it. `None` (the
default) picks per tensor device: CUDA tensors run on triton, CPU tensors on the C++ cpu
kernels.
"""

from __future__ import annotations

import contextvars
import functools
import os
import threading
import weakref

import torch

BACKENDS = ("torch", "cpu", "triton", "cuda")

# The context-local choice; _UNSET means "none here: use the process default". A context
# may choose None (automatic) over a process default, so None cannot mark "unset".
_UNSET = "<unset>"
_context_choice: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "dept_kernels_backend", default=_UNSET
)


class _Default:
    """A process default set by constructing `use_backend`; withdrawn if it is entered."""

    __slots__ = ("name", "owner")

    def __init__(self, name: str | None, owner: use_backend) -> None:
        self.name = name
        self.owner = weakref.ref(owner)


# The process defaults, newest last: the newest one applies. An entry is withdrawn when its
# `use_backend` is entered (it was a context manager, not a plain call), so the entries
# before it still count; entries older than one whose object is gone can never apply again
# and are dropped.
_defaults: list[_Default] = []
_defaults_lock = threading.Lock()


class use_backend:
    """Select the backend: `use_backend("cpu")` or `with use_backend("triton"): ...`.

    Names: "torch" (eager reference), "cpu" (C++), "triton", "cuda", or None for automatic.
    A plain call sets the process default, seen by every thread that has no choice of its
    own. As a context manager the choice holds in the running context (this thread, or
    this asyncio task) until exit and does not touch the process default: threads
    overlapping in `with use_backend(...)` blocks each keep their own.

    Python builds the object before entering it, so for that moment a `with` form is the
    process default too; threads inside their own `with` block are not affected.
    """

    def __init__(self, name: str | None) -> None:
        if name is not None and name not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS} or None, got {name!r}")
        self.name = name
        self._tokens: list[contextvars.Token] = []
        self._entry = _Default(name, self)
        with _defaults_lock:
            committed = [i for i, e in enumerate(_defaults) if e.owner() is None]
            if committed:
                del _defaults[: committed[-1]]
            _defaults.append(self._entry)

    def __enter__(self) -> use_backend:
        with _defaults_lock:
            if self._entry in _defaults:
                _defaults.remove(self._entry)
        self._tokens.append(_context_choice.set(self.name))
        return self

    def __exit__(self, *exc: object) -> None:
        _context_choice.reset(self._tokens.pop())


def _process_default() -> str | None:
    with _defaults_lock:
        return _defaults[-1].name if _defaults else None


def current_backend() -> str | None:
    """The backend selected here (context first, then the process default), or None when it
    is picked per device."""
    choice = _context_choice.get()
    return _process_default() if choice is _UNSET else choice


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
    """The backend to run on tensors living on `device`.

    Reads a context variable, which torch.compile cannot trace: traced code leaves the
    choice to the op's implementation, which runs eagerly (see `resolve_later`).
    """
    choice = current_backend()
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


def resolve_later(device: torch.device) -> str | None:
    """What a public op hands its custom op as the backend: the choice, or None while
    torch.compile traces, where the context variable cannot be read; the op's body then
    resolves it at run time, in the caller's context."""
    if torch.compiler.is_compiling():
        return None
    return resolve(device)


def resolved(backend: str | None, device: torch.device) -> str:
    """In a custom op's body: the backend `resolve_later` passed, or resolved now."""
    return resolve(device) if backend is None else backend
