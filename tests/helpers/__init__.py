"""What the tests share: the test device, tensors drawn reproducibly, and the comparison.

Submodules hold the rest: `models` (tiny prompt-method models, batches and the formula
reference), `aot` (AoT models and the table reference), `encoders` (BERT, RoBERTa and
DeBERTa-v2 with the prompt methods and their reference), `peft_models` (PEFT and official
DePT stand-ins), `hooks` (patch-hook state and checkpoint wrapping), `distributed` (the
engine tests' launch and comparison), `syncs` (host syncs counted per step). Tolerances
live in `dept_kernels.testing.compare`.
"""

import pytest
import torch

import dept_kernels
from dept_kernels import backends
from dept_kernels.testing.compare import TOLERANCES, assert_close

__all__ = [
    "BACKENDS",
    "DEVICE",
    "TOLERANCES",
    "assert_close",
    "cut_off_kernels",
    "randint",
    "randn",
    "tensor",
]

# Tests run on the GPU where there is one (the triton and cuda backends compiled), else on
# the CPU (the cpu backend, and triton under its interpreter).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# The backends that take tensors on the test device: the C++ cpu backend takes CPU tensors
# only, the cuda backend CUDA tensors only.
BACKENDS = [
    b for b in dept_kernels.available_backends() if b != ("cuda" if DEVICE == "cpu" else "cpu")
]


def randn(*shape: int, gen: torch.Generator | None = None, dtype=torch.float32) -> torch.Tensor:
    """Normal values drawn on the CPU (reproducible everywhere), placed on DEVICE."""
    return torch.randn(shape, generator=gen).to(DEVICE, dtype)


def randint(high: int, *shape: int, gen: torch.Generator | None = None) -> torch.Tensor:
    return torch.randint(0, high, shape, generator=gen).to(DEVICE)


def tensor(data, **kw) -> torch.Tensor:
    return torch.tensor(data, device=DEVICE, **kw)


def _no_kernel(backend: str):
    raise AssertionError(f"a {backend} kernel was reached with bad input")


def cut_off_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """Replace every backend's kernels by a failure (for the test's duration), at the one
    point the ops dispatch through: a check that runs after a kernel fails the test."""
    monkeypatch.setattr(backends, "load", _no_kernel)
