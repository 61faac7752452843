"""Backends: the implementations of the ops' kernels, and which one runs (docs/backends.md).

A backend implements the `Backend` protocol (`forward`, `reduce`, `gather_add`) and registers
itself in its own module with `register_backend(name, devices, loader)`. The ops ask
`resolve_later` / `resolved` for a name and `load` for its kernels: the one dispatch path.
Listing (`available_backends`) and importing build nothing; a compiled backend is built on
first use.
"""

from ..triton import interpreting as triton_interpreting
from ._dispatch import resolve, resolve_later, resolved
from ._registry import (
    Backend,
    BackendUnavailable,
    available_backends,
    load,
    register_backend,
    registered_backends,
)
from ._selection import current_backend, set_backend, use_backend

# The built-in backends, each registering itself on import; the order is the registration
# order (error messages, and the preference among backends of one device).
from . import _torch, _cpu, _triton, _cuda  # noqa: F401  isort: skip

__all__ = [
    "Backend",
    "BackendUnavailable",
    "available_backends",
    "current_backend",
    "load",
    "register_backend",
    "registered_backends",
    "resolve",
    "resolve_later",
    "resolved",
    "set_backend",
    "triton_interpreting",
    "use_backend",
]
