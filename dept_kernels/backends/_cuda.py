"""The `cuda` backend: the CUDA C++ kernels of `csrc/cuda`, built just in time on first use.

The extension (`csrc/cuda/bindings.cpp` plus every `.cu` file) is compiled with ninja through
`_build.load_or_build`, only where torch is a CUDA build and a GPU is present, and cached
under a name carrying a hash of the sources (headers included), so edits rebuild.
`python -m dept_kernels.check_build` compiles the `.cu` files without a GPU.
"""

from __future__ import annotations

import functools
import os
import shutil
from pathlib import Path
from types import ModuleType

import torch

from .. import _build
from ._extension import compiled_loader
from ._registry import register_backend

__all__ = ["NVCC_FLAGS", "OPTIONS", "module", "sources"]

# Added to torch's own nvcc flags (`cpp_extension.COMMON_NVCC_FLAGS`, which check_build
# passes too, so it compiles the kernels as the JIT build does).
NVCC_FLAGS = ["-O3", "-std=c++17"]
# `cpp_extension.load` options of the JIT build.
OPTIONS = {"extra_cflags": ["-O3"], "extra_cuda_cflags": NVCC_FLAGS}


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


def _missing() -> str | None:
    """What rules the extension out before any compiler is looked for, or None."""
    if torch.version.cuda is None:
        return "torch is not a CUDA build"
    if not torch.cuda.is_available():
        return "no CUDA GPU is available"
    compiled, _ = sources()
    if not compiled or not compiled[0].is_file():
        return "the CUDA sources (csrc/cuda) are not installed"
    return None


def module() -> ModuleType:
    """The JIT-built (or cached) extension; `_build.Unavailable` or the build error otherwise."""
    missing = _missing()
    if missing is not None:
        raise _build.Unavailable(missing)
    compiled, _ = sources()
    return _build.load_or_build(_name(), compiled, "CUDA kernels", **OPTIONS)


def _name() -> str:
    """Name (and cache directory) of the module: it carries the hash of the sources."""
    compiled, headers = sources()
    return f"dept_kernels_cuda_{_build.source_hash(compiled + headers)}"


@functools.cache
def _probe() -> str | None:
    """Can run here: a CUDA torch, a GPU, the sources, and nvcc (or a cached build)."""
    missing = _missing()
    if missing is not None:
        return missing
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or ""
    if shutil.which("nvcc") or Path(cuda_home, "bin", "nvcc").is_file():
        return None
    if _build.cached_build_present(_name(), **OPTIONS):
        return None
    return "nvcc is not found (set CUDA_HOME) and no cached build exists"


register_backend(
    "cuda",
    ("cuda",),
    compiled_loader(module, advice="Install the CUDA toolkit (nvcc) matching torch's CUDA."),
    probe=_probe,
)
