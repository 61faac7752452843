"""Which backend the user selected: a process default and a context-local choice.

`set_backend(name)` sets the process default, seen by every thread (and asyncio task) that
has no choice of its own. `with use_backend(name):` sets the choice for the running context
only and takes it back on exit, so overlapping blocks in other threads neither see nor undo
it; it never touches the process default. `None` picks per tensor device (see
`dept_kernels.backends.resolve`).
"""

from __future__ import annotations

import contextvars
import dis
import functools
import sys
import threading
import warnings
import weakref
from types import CodeType, FrameType

from ._registry import entry

__all__ = ["current_backend", "set_backend", "use_backend"]

# The context-local choice; _UNSET means "none here: use the process default". A context
# may choose None (automatic) over a process default, so None cannot mark "unset".
_UNSET = "<unset>"
_context_choice: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "dept_kernels_backend", default=_UNSET
)


class _Default:
    """One process default: set by `set_backend` (owner None) or by the deprecated plain call
    `use_backend(name)` (owner: that object, which withdraws it if it is entered later)."""

    __slots__ = ("name", "owner")

    def __init__(self, name: str | None, owner: use_backend | None) -> None:
        self.name = name
        self.owner = None if owner is None else weakref.ref(owner)

    def committed(self) -> bool:
        """Can no longer be withdrawn: set by `set_backend`, or its object is gone."""
        return self.owner is None or self.owner() is None


# The process defaults, newest last: the newest applies. Entries older than the newest
# committed one can never apply again and are dropped.
_defaults: list[_Default] = []
_defaults_lock = threading.Lock()


def _check_name(name: str | None) -> None:
    if name is not None:
        entry(name)


def _push_default(item: _Default) -> None:
    with _defaults_lock:
        committed = [i for i, e in enumerate(_defaults) if e.committed()]
        if committed:
            del _defaults[: committed[-1]]
        _defaults.append(item)


def set_backend(name: str | None) -> None:
    """Set the process default backend: a registered name, or None for automatic."""
    _check_name(name)
    _push_default(_Default(name, None))


# Opcodes that follow the call building a context manager of a `with` statement.
_WITH_OPCODES = frozenset(
    dis.opmap[op] for op in ("BEFORE_WITH", "SETUP_WITH", "LOAD_SPECIAL") if op in dis.opmap
)


@functools.lru_cache(maxsize=256)
def _next_opcode(code: CodeType, offset: int) -> int | None:
    after = [i for i in dis.get_instructions(code) if i.offset > offset]
    # Python 3.14 spells `with` as COPY, LOAD_SPECIAL: skip the COPY.
    if after and after[0].opname == "COPY" and len(after) > 1:
        return after[1].opcode
    return after[0].opcode if after else None


def _called_in_with_statement(frame: FrameType | None) -> bool:
    """Whether the call that built the object in `frame` is the header of a `with`."""
    return frame is not None and _next_opcode(frame.f_code, frame.f_lasti) in _WITH_OPCODES


class use_backend:
    """`with use_backend("triton"): ...` selects the backend for the running context.

    Names: those registered ("torch", "cpu", "triton", "cuda"), or None for automatic. The
    choice holds in this thread (or asyncio task) until exit; the process default is not
    touched, not even while the object is built.

    Deprecated: a plain call `use_backend(name)` outside a `with` header sets the process
    default, as `set_backend(name)` does (withdrawn if the object is entered later, as
    `ExitStack.enter_context` does).
    """

    def __init__(self, name: str | None) -> None:
        _check_name(name)
        self.name = name
        self._tokens: list[contextvars.Token] = []
        self._default: _Default | None = None
        if not _called_in_with_statement(sys._getframe(1)):
            warnings.warn(
                "use_backend(name) as a plain call (setting the process default) is "
                "deprecated; use dept_kernels.set_backend(name), or `with use_backend(name):`",
                DeprecationWarning,
                stacklevel=2,
            )
            self._default = _Default(name, self)
            _push_default(self._default)

    def __enter__(self) -> use_backend:
        if self._default is not None:
            with _defaults_lock:
                if self._default in _defaults:
                    _defaults.remove(self._default)
            self._default = None
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
