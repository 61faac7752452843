"""What the pytest-benchmark front-ends in `bench/` share: the device, the backends timed on
it, and the switch to the full set of shapes.

    DEPT_BENCH_FULL=1 pytest bench --benchmark-only
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import torch
from torch import Tensor

import dept_kernels

from ._timing import sync as _sync

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# DEPT_BENCH_FULL=1 runs every shape on the CPU too; by default the CPU runs leave out the
# shapes that would make a 2-core run take far longer for little extra information.
FULL = os.environ.get("DEPT_BENCH_FULL", "0") == "1"

sync: Callable[[], None] = functools.partial(_sync, DEVICE)


def library_backends(device: str = DEVICE) -> list[str]:
    """The library's backends worth timing on tensors on `device`: those that take them
    (on a GPU triton, cuda and torch; on the CPU cpu and torch), less triton on the CPU,
    where it runs under its interpreter, which is no benchmark."""
    names = dept_kernels.available_backends(device)
    return [b for b in names if torch.device(device).type == "cuda" or b != "triton"]


def with_backend(fn: Callable[..., Tensor], backend: str) -> Callable[..., Tensor]:
    """`fn` run with the library's `backend` selected."""

    def run(*args, **kwargs) -> Tensor:
        with dept_kernels.use_backend(backend):
            return fn(*args, **kwargs)

    return run
