"""Per-forward state that each thread keeps to itself.

A patched model's hooks carry what one forward learns to that forward's later hooks: the
checked ids, the cuts to undo, the call a pre-hook started, the running `generate`. Threads
may run one model at once (a server's workers sharing it; each forward releases the GIL in
its kernels): each forward's state must then be its own thread's, or one forward would read
another's ids. A `PerThread` attribute lives in a `threading.local` of its object, so each
thread sees only what it set. A copy or pickle of the object starts without any: the state
belongs to forwards running in this process (`HookState.__getstate__`).

Autograd may run a backward in another thread (a device's thread on CUDA). The state read
there is the backward thread's, which is what the hooks expect: a checkpointed layer
recomputed in backward finds its ids by its input (`_aot._Records`, shared across threads),
and a forward run inside the backward sets its own state in that thread.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

_SLOT = "_dept_kernels_per_thread"


def _none() -> None:
    return None


class PerThread:
    """A class attribute declaring a per-thread instance attribute: `default()` in each
    thread until that thread assigns it."""

    def __init__(self, default: Callable[[], Any] = _none) -> None:
        self.default = default
        self.name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: object, owner: type | None = None) -> Any:
        if obj is None:
            return self
        local = _local(obj)
        try:
            return local.__dict__[self.name]
        except KeyError:
            value = local.__dict__[self.name] = self.default()
            return value

    def __set__(self, obj: object, value: Any) -> None:
        _local(obj).__dict__[self.name] = value


def _local(obj: object) -> threading.local:
    return obj.__dict__[_SLOT]


class HookState:
    """Base of the hook objects with `PerThread` attributes: pickles and copies without the
    running forwards' state."""

    def __new__(cls, *args: object, **kwargs: object) -> HookState:
        # Made with the object (also when a copy or an unpickling makes it), not on first
        # use: torch.compile traces the hooks and cannot trace making a threading.local.
        obj = super().__new__(cls)
        obj.__dict__[_SLOT] = threading.local()
        return obj

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.pop(_SLOT, None)
        return state

    def __setstate__(self, state: dict) -> None:
        # Objects pickled before an attribute became per-thread hold it in their dict: the
        # class's descriptor takes precedence, so the stale copy is dropped.
        cls = type(self)
        self.__dict__.update(
            {k: v for k, v in state.items() if not isinstance(getattr(cls, k, None), PerThread)}
        )
