"""The `cpu` backend: the C++ kernels of `csrc/cpu` (every `.cpp` file, one module).

The module is taken, in order, from:
1. `dept_kernels._cpu_ext`, built ahead of time by `DEPT_KERNELS_BUILD_EXT=1 pip install .`,
   if it was built from the same sources (a stale in-tree build is skipped);
2. a just-in-time build (`_build.load_or_build`), cached under a name that carries a hash of
   the sources and of the host CPU, so edits rebuild and a shared cache never serves code
   compiled for another CPU.
Failing both, the registry runs the `torch` backend instead, with one warning (`fallback`).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import shutil
from pathlib import Path
from types import ModuleType

from .. import _build
from ._extension import compiled_loader
from ._registry import register_backend

__all__ = ["PREBUILT", "extension_name", "jit_options", "module", "sources"]

# The ahead-of-time module setup.py builds.
PREBUILT = "dept_kernels._cpu_ext"


def sources() -> tuple[list[Path], list[Path]]:
    """(compiled .cpp files, headers they include) of the cpu extension; empty without csrc."""
    csrc = _build.csrc_dir()
    if csrc is None:
        return [], []
    headers = [*(csrc / "common").glob("*.h"), *(csrc / "cpu").glob("*.h")]
    return sorted((csrc / "cpu").glob("*.cpp")), sorted(headers)


def extension_name(digest: str) -> str:
    """Name (and cache directory) of the JIT-built module of sources with `digest`."""
    return f"dept_kernels_cpu_{digest}_{_build.host_cpu_tag()}"


def jit_options(digest: str) -> dict:
    """`cpp_extension.load` options of the JIT build.

    -march=native is right here because the module is built on, and cached for, the machine
    that runs it (the cache name carries the host CPU tag); wheels from setup.py must stay
    portable and do without it.
    """
    cflags = ["-O3", "-march=native", "-fopenmp", f"-DDEPT_KERNELS_SOURCE_HASH={digest}"]
    return {"extra_cflags": cflags, "extra_ldflags": ["-fopenmp"]}


def module() -> ModuleType:
    """The prebuilt module if current, else the JIT build; `_build.Unavailable` or the build
    error otherwise."""
    compiled, headers = sources()
    digest = _build.source_hash(compiled + headers) if compiled else None
    prebuilt = _build.import_prebuilt(PREBUILT, digest)
    if prebuilt is not None:
        return prebuilt
    if digest is None:
        raise _build.Unavailable(
            "the C++ sources (csrc/cpu) are not installed and no prebuilt module exists"
        )
    return _build.load_or_build(
        extension_name(digest), compiled, "C++ cpu kernels", **jit_options(digest)
    )


@functools.cache
def _probe() -> str | None:
    """Can run here: a prebuilt module, a C++ compiler, or a verified cached build."""
    if importlib.util.find_spec(PREBUILT) is not None:
        return None
    compiled, headers = sources()
    if not compiled:
        return "the C++ sources (csrc/cpu) are not installed and no prebuilt module exists"
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is not None:
        return None
    digest = _build.source_hash(compiled + headers)
    if _build.cached_build_present(extension_name(digest), **jit_options(digest)):
        return None
    return f"no C++ compiler ({compiler}) and no prebuilt or cached build"


register_backend(
    "cpu",
    ("cpu",),
    compiled_loader(
        module,
        advice="Install a C++ compiler and ninja, or build ahead of time "
        "(DEPT_KERNELS_BUILD_EXT=1 pip install .).",
    ),
    probe=_probe,
    fallback="torch",
    automatic=True,
)
