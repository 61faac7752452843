"""Build and load C++ extensions: the machinery only, with no knowledge of backends.

`load_or_build` builds an extension just in time with ninja (`torch.utils.cpp_extension.load`)
and caches it on disk in torch's extension directory (`TORCH_EXTENSIONS_DIR`), trusted only
through a manifest of checksums; `import_prebuilt` imports a module built ahead of time by
setup.py. Nothing here runs at import of `dept_kernels`: the backends that use it
(`dept_kernels.backends`) call it on first use.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import json
import os
import platform
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

_PACKAGE = Path(__file__).resolve().parent

# How long a process waits for another live process's build of the same extension.
LOCK_WAIT_S = 600.0
# Next to the built module: the checksums of a completed build (see `load_or_build`).
MANIFEST = "dept_kernels_build.json"
# Held (flock) by the process building; the kernel releases it when that process dies.
BUILD_LOCK = "dept_kernels_build.lock"
# torch's own lock file around each `cpp_extension.load` build (`torch_waits_on_lock_file`).
TORCH_LOCK = "lock"
# Build outputs, removed before a rebuild that cannot trust them.
_OUTPUT_SUFFIXES = (".so", ".pyd", ".o", ".obj", ".ninja_log", ".ninja_deps")


class Unavailable(Exception):
    """The extension cannot be loaded or built here; the message names the cause and what
    to do about it."""


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


def host_cpu_tag() -> str:
    """Short hash of the host CPU's model and ISA flags: the JIT build uses -march=native."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        ident = sorted({ln for ln in lines if ln.startswith(("model name", "flags", "Features"))})
    except OSError:
        ident = []
    text = "\n".join([platform.machine(), platform.processor(), *ident])
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def import_prebuilt(name: str, expected_hash: str | None) -> ModuleType | None:
    """The module `name` built ahead of time, if installed and built from the sources at hand
    (its SOURCE_HASH is `expected_hash`; None accepts any)."""
    try:
        module = importlib.import_module(name)
    except ImportError:
        return None
    if expected_hash is not None and expected_hash != module.SOURCE_HASH:
        return None
    return module


# --------------------------------------------------------------------------- cached builds


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _build_key(name: str, options: dict) -> str:
    """What a cached build must have been built from: the module name (it carries the hash
    of the sources' contents; their paths may differ, a wheel's from a checkout's), the
    build options, and the torch and Python it was built against (a module built against
    another torch may load and then corrupt memory)."""
    import torch

    text = json.dumps([name, options, torch.__version__, sys.version], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _read_manifest(build_dir: Path) -> dict | None:
    try:
        manifest = json.loads((build_dir / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def _file_ok(build_dir: Path, manifest: dict, filename: str) -> bool:
    """Whether `filename` in `build_dir` has the size and checksum the manifest records."""
    expected = manifest.get("files", {}).get(filename)
    path = build_dir / filename
    try:
        return (
            isinstance(expected, dict)
            and path.stat().st_size == expected.get("size")
            and _file_sha256(path) == expected.get("sha256")
        )
    except OSError:
        return False


def cached_build_present(name: str, **options) -> bool:
    """Whether a verified build of `name` with `options` is in the cache (builds nothing;
    torch creates the empty cache directory if it is missing)."""
    from torch.utils import cpp_extension

    try:
        build_dir = Path(cpp_extension._get_build_directory(name, verbose=False))
    except OSError:
        return False
    return _verified_module_path(build_dir, name, _build_key(name, options)) is not None


def _verified_module_path(build_dir: Path, name: str, key: str) -> Path | None:
    """The cached module, if a completed build of `key` left it intact; else None."""
    manifest = _read_manifest(build_dir)
    if manifest is None or manifest.get("key") != key:
        return None
    module = manifest.get("module")
    if module != f"{name}{_module_suffix()}" or not _file_ok(build_dir, manifest, module):
        return None
    return build_dir / module


def _module_suffix() -> str:
    return ".pyd" if sys.platform == "win32" else ".so"


def _import_module(name: str, path: Path) -> ModuleType:
    """Import the extension module at `path` (as `cpp_extension.load` does) without building."""
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write_manifest(build_dir: Path, name: str, key: str) -> None:
    """Record the checksums of a completed build, atomically (rename), last of all: a build
    interrupted at any point before leaves no manifest, or an old one that mismatches."""
    outputs = [
        p for p in build_dir.iterdir() if p.is_file() and p.suffix in (".so", ".pyd", ".o", ".obj")
    ]
    manifest = {
        "key": key,
        "module": f"{name}{_module_suffix()}",
        "files": {p.name: {"size": p.stat().st_size, "sha256": _file_sha256(p)} for p in outputs},
    }
    tmp = build_dir / f"{MANIFEST}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, build_dir / MANIFEST)


def _discard_untrusted(build_dir: Path, name: str, key: str) -> None:
    """Remove the outputs a rebuild cannot trust, so that ninja (which trusts timestamps, not
    contents) rebuilds them: the module always; the object files and ninja's records of
    them unless a manifest of this key vouches for them (a relink then suffices)."""
    manifest = _read_manifest(build_dir)
    if manifest is not None and manifest.get("key") != key:
        manifest = None
    (build_dir / MANIFEST).unlink(missing_ok=True)
    for path in build_dir.iterdir():
        if not path.is_file() or not path.name.endswith(_OUTPUT_SUFFIXES):
            continue
        if path.suffix in (".o", ".obj"):
            keep = manifest is not None and _file_ok(build_dir, manifest, path.name)
        else:  # a module (ours or a renamed one), or ninja's log and dependency records
            keep = manifest is not None and path.name in (".ninja_log", ".ninja_deps")
        if not keep:
            path.unlink()


@contextlib.contextmanager
def _build_lock(build_dir: Path) -> Iterator[bool]:
    """Hold the build lock of `build_dir`, waiting up to LOCK_WAIT_S for a live holder;
    yields whether the lock is exclusive (False where there is no flock).

    An flock: the kernel drops it when its holder exits or is killed, so a dead build never
    blocks later ones (torch's own lock file, which it leaves behind then, does).
    """
    try:
        import fcntl
    except ImportError:  # no flock (Windows): torch's lock file is the only one
        yield False
        return
    path = build_dir / BUILD_LOCK
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as error:
        raise _read_only(build_dir, error) from error
    try:
        deadline = time.monotonic() + LOCK_WAIT_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
                    raise Unavailable(
                        f"another process (pid {holder}) has been building the kernels in "
                        f"{build_dir} for over {LOCK_WAIT_S:g} s; if it hangs, stop it"
                    ) from None
                time.sleep(0.2)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _read_only(build_dir: Path, error: OSError) -> Unavailable:
    return Unavailable(
        f"the extension cache {build_dir} is not writable ({error.strerror or error}) and "
        "holds no valid build of these sources to load. Point TORCH_EXTENSIONS_DIR at a "
        "writable directory, or let a process that can write there build it once"
    )


def load_or_build(name: str, sources: list[Path], what: str, **options) -> ModuleType:
    """The extension `name` built from `sources` with `cpp_extension.load(**options)`.

    A cached build is trusted only through the manifest a completed build writes next to it
    (checksums of the module and object files, and the build key: name, which carries the
    sources' hash, options, torch and Python versions), and is then imported without
    touching the directory, so a read-only cache serves it. Anything else rebuilds, under an
    flock, after removing outputs that fail their checksums (a truncated module would crash
    the process on import) and torch's lock file if a killed build left it and this torch
    waits on it (forever; `torch_waits_on_lock_file`). The first build says so on stderr: it
    takes about a minute. Raises `Unavailable` when the cache is not writable or another
    build holds the lock too long; build errors propagate.
    """
    from torch.utils import cpp_extension

    key = _build_key(name, options)
    try:
        build_dir = Path(cpp_extension._get_build_directory(name, verbose=False))
    except OSError as error:
        raise Unavailable(
            f"the extension cache for {name} cannot be created ({error}); point "
            "TORCH_EXTENSIONS_DIR at a writable directory"
        ) from error
    module_path = _verified_module_path(build_dir, name, key)
    broken = None
    if module_path is not None:
        try:
            return _import_module(name, module_path)
        except ImportError as error:  # intact but unusable here (a changed libtorch, say)
            broken = error
    with _build_lock(build_dir) as exclusive:
        # Another process may have finished the build while this one waited.
        module_path = None if broken else _verified_module_path(build_dir, name, key)
        if module_path is not None:
            return _import_module(name, module_path)
        try:
            _prepare_rebuild(build_dir, name, key, exclusive, broken)
        except OSError as error:
            raise _read_only(build_dir, error) from error
        # torch skips the build of a name it loaded before in this process (and renames it
        # when the arguments differ); this build is needed, under this very name.
        versions = getattr(cpp_extension, "JIT_EXTENSION_VERSIONER", None)
        if versions is not None:
            versions.entries.pop(name, None)
        print(
            f"dept_kernels: building the {what} (about a minute, once; cached in {build_dir})",
            file=sys.stderr,
            flush=True,
        )
        with warnings.catch_warnings():
            # torch warns about compiler checks on its way; the caller reports failures once.
            warnings.simplefilter("ignore")
            module = cpp_extension.load(
                name=name,
                sources=[str(path) for path in sources],
                build_directory=str(build_dir),
                verbose=False,
                **options,
            )
        _write_manifest(build_dir, name, key)
        return module


def torch_waits_on_lock_file() -> bool:
    """Whether the installed torch's extension build locks with a file whose existence makes
    every later build wait (`FileBaton`, torch < 2.14): a build killed while holding it
    leaves the file, and the next build waits forever. Later releases hold an flock on that
    file instead, which the kernel releases when the holder dies, and leave the file in
    place after every build."""
    from torch.utils import cpp_extension

    return hasattr(cpp_extension, "FileBaton")


def _prepare_rebuild(
    build_dir: Path, name: str, key: str, exclusive: bool, broken: ImportError | None
) -> None:
    """Under the build lock: clear what a dead or corrupted build left behind."""
    torch_lock = build_dir / TORCH_LOCK
    if exclusive and torch_lock.exists() and torch_waits_on_lock_file():
        # Every build of this directory holds the build lock while torch's lock file exists,
        # so with the build lock held here, the file's owner is gone.
        warnings.warn(
            f"dept_kernels: removed a stale build lock {torch_lock} left by a build that was "
            "interrupted (its process is gone); rebuilding",
            RuntimeWarning,
            stacklevel=4,
        )
        torch_lock.unlink()
    manifest = _read_manifest(build_dir)
    # Built for this key yet not loadable: worth a warning (another key, a torch upgrade
    # say, rebuilds as a first build does).
    if manifest is not None and manifest.get("key") == key:
        reason = (
            f"does not import ({broken})"
            if broken is not None
            else "fails its checksum (truncated or modified)"
        )
        warnings.warn(
            f"dept_kernels: the cached build in {build_dir} {reason}; rebuilding it",
            RuntimeWarning,
            stacklevel=4,
        )
    _discard_untrusted(build_dir, name, key)
