"""Build and load the C++ extensions, on first use (never at import of `dept_kernels`).

The cpu extension is every `.cpp` file in `csrc/cpu`, compiled into one module. It is
taken, in order, from:
1. `dept_kernels._cpu_ext`, built ahead of time by `DEPT_KERNELS_BUILD_EXT=1 pip install .`,
   if it was built from the same sources (a stale in-tree build is skipped);
2. a just-in-time ninja build through `torch.utils.cpp_extension.load`, cached on disk in
   torch's extension directory (`TORCH_EXTENSIONS_DIR`) under a name that carries a hash of
   the sources and of the host CPU, so edits rebuild and a shared cache never serves code
   compiled for another CPU;
3. failing both, `cpu_ops_or_reference` warns once and returns the eager torch backend.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import platform
import warnings
from pathlib import Path
from types import ModuleType

_PACKAGE = Path(__file__).resolve().parent


def csrc_dir() -> Path | None:
    """`csrc` of a source checkout (editable install), or the copy shipped in a wheel."""
    for candidate in (_PACKAGE.parent / "csrc", _PACKAGE / "_csrc"):
        if (candidate / "cpu").is_dir():
            return candidate
    return None


def source_hash(sources: list[Path]) -> str:
    """Hash of the sources' contents; setup.py computes the same for the prebuilt module."""
    digest = hashlib.sha256()
    for path in sources:
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _host_cpu_tag() -> str:
    """Short hash of the host CPU's model and ISA flags: the JIT build uses -march=native."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        ident = sorted({ln for ln in lines if ln.startswith(("model name", "flags", "Features"))})
    except OSError:
        ident = []
    text = "\n".join([platform.machine(), platform.processor(), *ident])
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def _import_prebuilt(expected_hash: str | None) -> ModuleType | None:
    """The ahead-of-time module, if installed and built from the sources at hand."""
    try:
        module = importlib.import_module("dept_kernels._cpu_ext")
    except ImportError:
        return None
    if expected_hash is not None and expected_hash != module.SOURCE_HASH:
        return None
    return module


def _jit_build(sources: list[Path], digest: str) -> ModuleType:
    from torch.utils import cpp_extension

    # -march=native is right here because the module is built on, and cached for, the
    # machine that runs it (the cache name carries the host CPU tag); wheels from setup.py
    # must stay portable and do without it.
    cflags = ["-O3", "-march=native", "-fopenmp", f"-DDEPT_KERNELS_SOURCE_HASH={digest}"]
    with warnings.catch_warnings():
        # torch warns about compiler checks on its way; the caller reports failures once.
        warnings.simplefilter("ignore")
        return cpp_extension.load(
            name=f"dept_kernels_cpu_{digest}_{_host_cpu_tag()}",
            sources=[str(path) for path in sources],
            extra_cflags=cflags,
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )


def cpu_sources() -> tuple[list[Path], list[Path]]:
    """(compiled .cpp files, headers they include) of the cpu extension; empty without csrc."""
    csrc = csrc_dir()
    if csrc is None:
        return [], []
    return sorted((csrc / "cpu").glob("*.cpp")), sorted((csrc / "common").glob("*.h"))


@functools.cache
def _cpu_extension() -> tuple[ModuleType | None, str]:
    """(module, "") or (None, why it could not be built). Tried once per process."""
    sources, headers = cpu_sources()
    digest = source_hash(sources + headers) if sources else None
    module = _import_prebuilt(digest)
    if module is not None:
        return module, ""
    if digest is None:
        return None, "the C++ sources (csrc/cpu) are not installed and no prebuilt module exists"
    try:
        return _jit_build(sources, digest), ""
    except Exception as error:  # any build failure (no compiler, bad flags) means: fall back
        lines = str(error).strip().splitlines()
        detail = "\n".join(lines[-20:])  # the compiler's own error is at the end
        return None, f"{type(error).__name__}: {detail}"


def cpu_extension_available() -> bool:
    """Whether the C++ cpu backend can run here (builds or loads it on the first call)."""
    return _cpu_extension()[0] is not None


def cpu_extension() -> ModuleType:
    """The compiled cpu module; RuntimeError with the build failure if there is none."""
    module, reason = _cpu_extension()
    if module is None:
        raise RuntimeError(f"the dept_kernels C++ cpu extension is unavailable: {reason}")
    return module


@functools.cache
def cpu_ops_or_reference() -> ModuleType:
    """The `cpu` backend's ops module, or the eager torch backend (warning once) without it."""
    if cpu_extension_available():
        from . import _cpu

        return _cpu
    from .ops import _torch_impl

    warnings.warn(
        "dept_kernels: the C++ cpu backend could not be built, so the 'cpu' backend runs the "
        "slower eager torch implementation instead (same results). Install a C++ compiler "
        "and ninja, or build ahead of time (DEPT_KERNELS_BUILD_EXT=1 pip install .). "
        f"Reason: {_cpu_extension()[1]}",
        RuntimeWarning,
        stacklevel=2,
    )
    return _torch_impl


def cuda_extension_available() -> bool:
    """Whether the CUDA C++ backend can run here (builds or loads it on the first call)."""
    from . import _cuda

    return _cuda.available()


def cuda_ops() -> ModuleType:
    """The `cuda` backend's ops module; RuntimeError with the reason when it cannot run."""
    from . import _cuda

    return _cuda.ops()
