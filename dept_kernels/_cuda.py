"""The `cuda` backend: the CUDA C++ kernels of `csrc/cuda`, built just in time on first use.

Same contract as `dept_kernels.ops._torch_impl`; inputs arrive validated by the ops. The
extension (`csrc/cuda/bindings.cpp` plus every `.cu` file) is compiled with ninja through
`torch.utils.cpp_extension.load`, only where torch is a CUDA build and a GPU is present, and
cached in torch's extension directory under a name carrying a hash of the sources (headers
included), so edits rebuild; the cache is trusted as the cpu one is (`_build.load_or_build`).
`python -m dept_kernels.check_build` compiles the `.cu` files without a GPU.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

from . import _build

__all__ = ["available", "extension", "forward", "gather_add", "ops", "reduce", "sources"]

# Added to torch's own nvcc flags (`cpp_extension.COMMON_NVCC_FLAGS`, which check_build
# passes too, so it compiles the kernels as the JIT build does).
NVCC_FLAGS = ["-O3", "-std=c++17"]


def sources() -> tuple[list[Path], list[Path]]:
    """(compiled sources: bindings.cpp then the .cu files, headers) of `csrc/cuda`.

    The headers include `csrc/common`, shared with the cpu binding.
    """
    csrc = _build.csrc_dir()
    folder = None if csrc is None else csrc / "cuda"
    if folder is None or not folder.is_dir():
        return [], []
    compiled = [folder / "bindings.cpp", *sorted(folder.glob("*.cu"))]
    headers = sorted([*folder.glob("*.h"), *folder.glob("*.cuh"), *(csrc / "common").glob("*.h")])
    return compiled, headers


@_build._once
def _extension() -> tuple[ModuleType | None, str]:
    """(module, "") or (None, why there is none). Tried once per process."""
    if torch.version.cuda is None:
        return None, "torch is not a CUDA build"
    if not torch.cuda.is_available():
        return None, "no CUDA GPU is available"
    compiled, headers = sources()
    if not compiled or not compiled[0].is_file():
        return None, "the CUDA sources (csrc/cuda) are not installed"
    digest = _build.source_hash(compiled + headers)
    try:
        module = _build.load_or_build(
            f"dept_kernels_cuda_{digest}",
            compiled,
            "CUDA kernels",
            extra_cflags=["-O3"],
            extra_cuda_cflags=NVCC_FLAGS,
        )
    except _build.Unavailable as error:
        return None, str(error)
    except Exception as error:  # no nvcc, a compiler error: the backend is unavailable
        lines = str(error).strip().splitlines()
        return None, f"{type(error).__name__}: " + "\n".join(lines[-20:])
    return module, ""


def available() -> bool:
    """Whether the CUDA backend can run here (builds or loads it on the first call)."""
    return _extension()[0] is not None


def extension() -> ModuleType:
    """The compiled module; RuntimeError with the reason if there is none."""
    module, reason = _extension()
    if module is None:
        raise RuntimeError(f"the dept_kernels CUDA extension is unavailable: {reason}")
    return module


def ops() -> ModuleType:
    """This module as the `cuda` backend's ops, after making sure the extension exists."""
    extension()
    return sys.modules[__name__]


def forward(
    input_ids: Tensor,
    weight: Tensor,
    prompt: Tensor | None,
    lora_a: Tensor | None,
    lora_b: Tensor | None,
    rows: Tensor | None,
    scaling: float,
    task_ids: Tensor | None = None,
    batch_order: Tensor | None = None,
) -> Tensor:
    """(B, m + s, d) output in `weight.dtype`; see `dept_kernels.ops.dept_embedding`.

    With `task_ids` (B,) the parameters are stacked per task and `batch_order` (B,) lists
    the samples grouped by task.
    """
    return extension().forward(
        input_ids, weight, prompt, lora_a, lora_b, rows, float(scaling), task_ids, batch_order
    )


def reduce(grad_out: Tensor, m: int, order: Tensor | None, offsets: Tensor | None) -> Tensor:
    """fp32 sums of the token rows of `grad_out` (B, m + s, d): (s, d), or (R, d) by segment.

    Deterministic: a fixed summation order and no atomics.
    """
    return extension().reduce(grad_out, int(m), order, offsets)


def gather_add(hidden: Tensor, rows: Tensor, table: Tensor, out: Tensor) -> Tensor:
    """`out = hidden + table[rows]` in fp32, cast to `out.dtype`; `out` may be `hidden`."""
    return extension().gather_add(hidden, rows, table, out)
