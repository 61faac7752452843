"""The backend registry: the kernel contract, the registrations, and loading on first use.

A backend is registered by name with the tensor device types it takes, a loader (called on
first use: it may build a compiled extension) and a cheap probe (called when listing: it must
not build anything). `load(name)` is the only place a backend's kernels are obtained.
"""

from __future__ import annotations

import dataclasses
import threading
import warnings
from collections.abc import Callable, Iterable
from typing import Protocol

import torch
from torch import Tensor

__all__ = [
    "Backend",
    "BackendUnavailable",
    "available_backends",
    "load",
    "register_backend",
    "registered_backends",
]


class Backend(Protocol):
    """The kernels every backend implements; inputs arrive validated by the ops.

    The formulas are those of `dept_kernels.backends._torch` (the eager reference).
    """

    def forward(
        self,
        input_ids: Tensor,
        weight: Tensor,
        prompt: Tensor | None,
        lora_a: Tensor | None,
        lora_b: Tensor | None,
        rows: Tensor | None,
        scaling: float,
        task_ids: Tensor | None = None,
        batch_order: Tensor | None = None,
        visual: Tensor | None = None,
    ) -> Tensor:
        """(B, m + s + n_v, d) DePT embedding output in `weight.dtype`; `rows` (B, s) or None
        (row t for token t); with `task_ids` (B,) the parameters are stacked per task and
        `batch_order` (B,) lists the samples grouped by task. `visual` (B, n_v, d), n_v > 0,
        of `weight.dtype` and any strides, or None: rows copied after the token rows by the
        same pass."""
        ...

    def reduce(
        self, grad_out: Tensor, m: int, order: Tensor | None, offsets: Tensor | None
    ) -> Tensor:
        """fp32 sums of the token rows of `grad_out` (B, m + s, d): (s, d) per position, or
        (R, d) per segment (`order` lists the B*s tokens grouped, `offsets` (R + 1,) bounds).
        `grad_out` has unit column stride and rows d apart; its batch stride, a multiple of d,
        may exceed (m + s) * d (the text columns of an output with visual rows)."""
        ...

    def gather_add(self, hidden: Tensor, rows: Tensor, table: Tensor, out: Tensor) -> Tensor:
        """`out = hidden + table[rows]` (B, s, d), added in fp32; `out` may be `hidden`."""
        ...

    # Optional: `reduce_lowrank(grad_out, m, lora_a, lora_b, scaling)`, the position-mode
    # backward of shared parameters in one call: [prompt sums (m, d) fp32, dA (L, r), dB (r,
    # d) in the factors' dtype], from factors A (L, r), B (r, d), both fp32 or both bf16; the
    # prompt sums are the first m rows of `reduce(grad_out, 0, None, None)`, and dA =
    # scaling * S @ B^T (rows s.. zero), dB = scaling * A[:s]^T @ S on the token rows' sums
    # S, rounded to bf16 for bf16 factors (docs/design.md §2, "Numerics"). A backend without
    # it (or with it None) gets `reduce` and two matmuls (`ops/_grads.py`).
    #
    # Optional: `scatter_rows(used, sums, out)`, a dense gradient from segment sums: `out`
    # (num_rows, d) of any float dtype gets row used[u] = sums[u] (fp32 (R, d), rounded
    # once) for the first u of each key of the ascending int64 `used` (R,), zeros elsewhere.
    # Without it: zeros, then `index_add_` / `index_put_` of the sums (`ops/_grads.py`).


class BackendUnavailable(RuntimeError):
    """A backend cannot run here; the message says why and what to do about it."""


@dataclasses.dataclass(frozen=True)
class _Entry:
    name: str
    devices: Callable[[], tuple[str, ...]] | None  # None: every device
    loader: Callable[[], Backend]
    probe: Callable[[], str | None]
    fallback: str | None
    automatic: bool
    hint: str


_entries: dict[str, _Entry] = {}
_loaded: dict[str, Backend] = {}
_failed: dict[str, str] = {}
# Reentrant: a fallback loads another backend while the lock is held. Held during a build,
# so two threads never build (or warn) twice.
_lock = threading.RLock()


def register_backend(
    name: str,
    devices: Iterable[str] | Callable[[], Iterable[str]] | None,
    loader: Callable[[], Backend],
    *,
    probe: Callable[[], str | None] | None = None,
    fallback: str | None = None,
    automatic: bool = False,
    hint: str = "",
) -> None:
    """Register backend `name`.

    Args:
        devices: the tensor device types it takes ("cpu", "cuda"), a callable returning them
            (when they depend on the environment), or None for every device.
        loader: returns the Backend, built or imported on first use; raises
            BackendUnavailable("why") when it cannot run here.
        probe: cheap check used by `available_backends` (it must build nothing): None when
            the backend can run here, else why not. Default: always available.
        fallback: the backend to run instead, with one warning, when the loader fails.
        automatic: picked without `use_backend` for tensors on its devices (the first such
            registration wins; else a backend taking every device).
        hint: appended to the error for tensors on a device it does not take.
    """
    if name in _entries:
        raise ValueError(f"backend {name!r} is already registered")
    if devices is None:
        device_fn = None
    elif callable(devices):
        dynamic = devices

        def device_fn() -> tuple[str, ...]:
            return tuple(dynamic())
    else:
        fixed = tuple(devices)

        def device_fn() -> tuple[str, ...]:
            return fixed

    _entries[name] = _Entry(
        name,
        device_fn,
        loader,
        probe or (lambda: None),
        fallback,
        automatic,
        hint,
    )


def registered_backends() -> tuple[str, ...]:
    """Every registered name, in registration order."""
    return tuple(_entries)


def entry(name: str) -> _Entry:
    """The registration of `name`; ValueError naming the registered ones otherwise."""
    found = _entries.get(name)
    if found is None:
        raise ValueError(f"backend must be one of {registered_backends()} or None, got {name!r}")
    return found


def _present_devices() -> list[str]:
    return ["cuda", "cpu"] if torch.cuda.is_available() else ["cpu"]


def available_backends(device: str | torch.device | None = None) -> list[str]:
    """The backends that can run on this machine, in order of preference. Builds nothing.

    "Available" means: registered, taking a device present here, and its probe passing (a
    compiler, a prebuilt or cached build for the compiled ones; triton importable, with a GPU
    or the interpreter). A compiled backend is built on first use, which may still fail: the
    cpu backend then runs the torch one (see `load`). Order: per device present (CUDA first),
    the backends tied to it in registration order, then those taking every device.
    With `device` ("cpu", "cuda" or a torch.device), only those taking tensors on its type.
    """
    wanted = None if device is None else torch.device(device).type
    names: list[str] = []
    for present in _present_devices():
        for e in _entries.values():
            tied = e.devices is not None and present in e.devices()
            if tied and e.name not in names and e.probe() is None:
                names.append(e.name)
    names += [e.name for e in _entries.values() if e.devices is None and e.probe() is None]
    if wanted is None:
        return names
    return [n for n in names if _entries[n].devices is None or wanted in _entries[n].devices()]


def automatic(device: torch.device) -> str:
    """The backend picked for tensors on `device` when none is selected: the first
    registration flagged `automatic` that takes the device and passes its probe (or has a
    fallback, which then warns), else the first taking every device."""
    for e in _entries.values():
        takes = e.automatic and e.devices is not None and device.type in e.devices()
        if takes and (e.fallback is not None or e.probe() is None):
            return e.name
    return next(e.name for e in _entries.values() if e.devices is None)


def check_device(name: str, device: torch.device) -> None:
    """ValueError when backend `name` does not take tensors on `device`."""
    e = entry(name)
    if e.devices is None or device.type in e.devices():
        return
    wanted = " or ".join(t.upper() for t in e.devices()) or "no"
    hint = f"; {e.hint}" if e.hint else ""
    raise ValueError(f"backend {name!r} needs {wanted} tensors, got tensors on {device}{hint}")


def load(name: str) -> Backend:
    """The kernels of backend `name`, loaded (or built) once per process.

    A loader failure is remembered and raised again as BackendUnavailable; a backend with a
    fallback warns once and runs its fallback instead.
    """
    backend = _loaded.get(name)
    if backend is not None:
        return backend
    with _lock:
        if name in _loaded:
            return _loaded[name]
        e = entry(name)
        if name not in _failed:
            try:
                _loaded[name] = e.loader()
                return _loaded[name]
            except BackendUnavailable as error:
                _failed[name] = str(error)
        if e.fallback is None:
            raise BackendUnavailable(f"backend {name!r} is unavailable: {_failed[name]}")
        warnings.warn(
            f"dept_kernels: the {name!r} backend could not be built or loaded, so it runs the "
            f"{e.fallback!r} backend instead (slower, same results). {_failed[name]}",
            RuntimeWarning,
            stacklevel=2,
        )
        _loaded[name] = load(e.fallback)
        return _loaded[name]


def forget_loaded() -> None:
    """Drop every loaded backend and remembered failure (tests of the build rebuild state)."""
    with _lock:
        _loaded.clear()
        _failed.clear()
