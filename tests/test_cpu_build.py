"""The build machinery of the C++ cpu backend: JIT build, load, and the fallback."""

import os
import shutil
import subprocess
import sys
import sysconfig
import warnings
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

import dept_kernels
from dept_kernels import _build, backends
from dept_kernels.backends import _cpu, _registry
from dept_kernels.backends._extension import CompiledBackend
from dept_kernels.testing import reference_dept_embedding


@pytest.fixture
def fresh_build_state():
    """Forget the loaded backends and the probes' answers before and after the test."""
    _registry.forget_loaded()
    _cpu._probe.cache_clear()
    yield
    _registry.forget_loaded()
    _cpu._probe.cache_clear()


def test_extension_builds_and_loads():
    kernels = backends.load("cpu")
    assert isinstance(kernels, CompiledBackend)
    sources, headers = _cpu.sources()
    assert headers, "the shared binding header is part of the build"
    assert _build.source_hash(sources + headers) == kernels.module.SOURCE_HASH
    assert "cpu" in dept_kernels.available_backends()


def test_listing_builds_nothing(fresh_build_state, monkeypatch):
    """`available_backends` decides from cheap facts: it never builds or loads a backend."""

    def no_build(*args, **kwargs):
        raise AssertionError("available_backends built an extension")

    monkeypatch.setattr(_build, "load_or_build", no_build)
    monkeypatch.setattr(_build, "import_prebuilt", no_build)
    assert "cpu" in dept_kernels.available_backends()
    assert not _registry._loaded


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_cuda_backend_refuses_clearly_without_a_gpu():
    assert "cuda" not in dept_kernels.available_backends()
    with pytest.raises(RuntimeError, match=r"backend 'cuda' is unavailable: (No CUDA|Torch is)"):
        backends.load("cuda")


def _break_with_raising_loader(monkeypatch, tmp_path):
    def fail(*args, **kwargs):
        raise OSError("no C++ compiler found")

    monkeypatch.setattr(cpp_extension, "load", fail)
    # An empty cache: a valid cached build would be loaded without building.
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "extensions"))


def _break_with_bogus_compiler(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "extensions"))


@pytest.mark.parametrize("break_build", [_break_with_raising_loader, _break_with_bogus_compiler])
def test_failed_build_warns_once_and_falls_back(
    break_build, fresh_build_state, monkeypatch, tmp_path
):
    monkeypatch.setattr(_build, "import_prebuilt", lambda name, expected_hash: None)
    break_build(monkeypatch, tmp_path)
    torch.manual_seed(0)
    ids = torch.randint(0, 50, (3, 6))
    weight = torch.randn(50, 24)
    prompt = torch.randn(2, 24)
    lora_a, lora_b = torch.randn(8, 4), torch.randn(4, 24)
    with warnings.catch_warnings(record=True) as caught, dept_kernels.use_backend("cpu"):
        warnings.simplefilter("always")
        ops = backends.load("cpu")
        out = dept_kernels.dept_embedding(ids, weight, prompt, lora_a, lora_b, scaling=0.5)
        again = dept_kernels.dept_embedding(ids, weight, prompt, lora_a, lora_b, scaling=0.5)
    assert ops is backends.load("torch")
    assert "cpu" in _registry._failed
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1, messages
    assert "could not be built" in messages[0]
    assert "Install a C++ compiler" in messages[0]
    expected = reference_dept_embedding(ids, weight, prompt, lora_a, lora_b, scaling=0.5)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(again, expected)


# --------------------------------------------------------------------------- the JIT cache
#
# Each test copies one verified build (made once, in the default cache) into a temporary
# TORCH_EXTENSIONS_DIR and runs a fresh interpreter on it under a deadline: a hang fails
# the test, and so does a crash (a signal as return code) instead of an exception.

CHILD = """
import sys, warnings
warnings.simplefilter("always")
import torch
from dept_kernels import _build
_build.import_prebuilt = lambda name, expected_hash: None  # the JIT cache, even where installed
import dept_kernels
ops = dept_kernels.backends.load("cpu")
print("OPS", "compiled" if hasattr(ops, "module") else ops.__name__)
torch.manual_seed(0)
ids, weight, prompt = torch.randint(0, 50, (3, 6)), torch.randn(50, 24), torch.randn(2, 24)
lora_a, lora_b = torch.randn(8, 4), torch.randn(4, 24)
with dept_kernels.use_backend("cpu"):
    out = dept_kernels.dept_embedding(ids, weight, prompt, lora_a, lora_b, scaling=0.5)
expected = torch.cat([prompt.expand(3, 2, 24), weight[ids] + 0.5 * (lora_a[:6] @ lora_b)], 1)
torch.testing.assert_close(out, expected)
print("OK")
"""

# Root ignores file permissions; without CAP_DAC_OVERRIDE it obeys them, as users do.
AS_USER = (
    ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"] if os.geteuid() == 0 else []
)


@pytest.fixture(scope="module")
def built_cache():
    """(build directory, module name) of a verified JIT build of the cpu extension."""
    sources, headers = _cpu.sources()
    digest = _build.source_hash(sources + headers)
    name = _cpu.extension_name(digest)
    # A build on first use, else the verified load.
    _build.load_or_build(name, sources, "C++ cpu kernels", **_cpu.jit_options(digest))
    return Path(cpp_extension._get_build_directory(name, verbose=False)), name


def _cache_copy(built_cache, tmp_path) -> Path:
    """A TORCH_EXTENSIONS_DIR holding a copy of the verified build; returns the build dir."""
    build_dir, name = built_cache
    copy = tmp_path / "extensions" / name
    shutil.copytree(build_dir, copy)
    (copy / _build.BUILD_LOCK).unlink(missing_ok=True)
    return copy


def _run_child(extensions: Path, read_only: bool = False, timeout: float = 240):
    command = [sys.executable, "-c", CHILD]
    if read_only:
        if AS_USER and shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv: cannot make a directory read-only")
        command = AS_USER + command
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(extensions)}
    try:
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"the first cpu op hung past {timeout} s: {error.stderr}")
    assert result.returncode == 0, (
        f"the child exited with {result.returncode} (negative: killed by a signal)\n"
        f"{result.stdout}\n{result.stderr[-3000:]}"
    )
    return result


def _make_read_only(path: Path) -> None:
    for folder, _, files in os.walk(path):
        for name in files:
            os.chmod(os.path.join(folder, name), 0o444)
        os.chmod(folder, 0o555)


def test_stale_build_lock_does_not_hang_the_first_cpu_op(built_cache, tmp_path):
    """A process killed during its build leaves torch's lock file; torch waits on it forever.
    A verified build is loaded without waiting."""
    build_dir = _cache_copy(built_cache, tmp_path)
    (build_dir / _build.TORCH_LOCK).touch()
    result = _run_child(build_dir.parent, timeout=120)
    assert "OPS compiled" in result.stdout and "OK" in result.stdout


def test_stale_build_lock_of_an_interrupted_build_is_removed_and_the_build_completed(
    built_cache, tmp_path
):
    """The lock file of a build killed while linking, with its half-written module: the next
    process relinks. Where torch waits on that file's existence (torch < 2.14) it finds the
    lock's owner gone, warns once and removes it; where torch flocks the file (the kernel
    released the dead build's lock), the file is no sign of anything and stays quietly."""
    build_dir = _cache_copy(built_cache, tmp_path)
    module = build_dir / f"{built_cache[1]}.so"
    module.write_bytes(module.read_bytes()[: module.stat().st_size // 3])
    (build_dir / _build.TORCH_LOCK).touch()
    result = _run_child(build_dir.parent)
    assert "OPS compiled" in result.stdout and "OK" in result.stdout
    assert "building the C++ cpu kernels" in result.stderr
    waits = _build.torch_waits_on_lock_file()
    assert result.stderr.count("removed a stale build lock") == int(waits), result.stderr
    if waits:  # torch removes its file when a build ends; flock-style torch leaves it
        assert not (build_dir / _build.TORCH_LOCK).exists()


def test_torch_lock_style_is_read_from_the_installed_torch(monkeypatch):
    monkeypatch.setattr(cpp_extension, "FileBaton", object(), raising=False)
    assert _build.torch_waits_on_lock_file()
    monkeypatch.delattr(cpp_extension, "FileBaton")
    assert not _build.torch_waits_on_lock_file()


def test_truncated_cached_module_is_rebuilt_not_loaded(built_cache, tmp_path):
    """A truncated .so (disk full, a killed copy) crashed the process with SIGBUS on import;
    it fails its checksum instead, with one warning, and is rebuilt."""
    build_dir = _cache_copy(built_cache, tmp_path)
    module = build_dir / f"{built_cache[1]}.so"
    size = module.stat().st_size
    module.write_bytes(module.read_bytes()[: size // 2])
    result = _run_child(build_dir.parent)
    assert "OPS compiled" in result.stdout and "OK" in result.stdout
    assert result.stderr.count("fails its checksum") == 1, result.stderr
    assert "building the C++ cpu kernels" in result.stderr
    # The rebuilt module is whole and is the one its new manifest records. (Its size need not
    # equal the copy's: the build directory's path is linked into it.)
    assert module.stat().st_size > size // 2
    assert _build._file_ok(build_dir, _build._read_manifest(build_dir), module.name)
    # A second process finds the repaired build verified: nothing is built again.
    again = _run_child(build_dir.parent)
    assert "OK" in again.stdout and "building" not in again.stderr, again.stderr


def test_read_only_cache_with_a_valid_build_is_loaded(built_cache, tmp_path):
    """A read-only cache (a shared, prebuilt one) serves its verified build: no rebuild, no
    lock, no fallback to the torch backend."""
    build_dir = _cache_copy(built_cache, tmp_path)
    _make_read_only(tmp_path / "extensions")
    before = sorted((p.name, p.stat().st_mtime_ns) for p in build_dir.iterdir())
    result = _run_child(build_dir.parent, read_only=True, timeout=120)
    assert "OPS compiled" in result.stdout and "OK" in result.stdout
    assert "Warning" not in result.stderr and "building" not in result.stderr, result.stderr
    assert sorted((p.name, p.stat().st_mtime_ns) for p in build_dir.iterdir()) == before


def test_read_only_cache_without_a_valid_build_warns_with_the_real_cause(built_cache, tmp_path):
    """Nothing valid to load and nowhere to build: the fallback warning names the read-only
    cache and TORCH_EXTENSIONS_DIR, not a missing compiler."""
    build_dir = _cache_copy(built_cache, tmp_path)
    module = build_dir / f"{built_cache[1]}.so"
    module.write_bytes(module.read_bytes()[:4096])
    _make_read_only(tmp_path / "extensions")
    result = _run_child(build_dir.parent, read_only=True, timeout=120)
    assert "OPS dept_kernels.backends._torch" in result.stdout and "OK" in result.stdout
    assert result.stderr.count("could not be built or loaded") == 1, result.stderr
    assert "is not writable" in result.stderr and "TORCH_EXTENSIONS_DIR" in result.stderr
    assert "compiler" not in result.stderr


def test_build_lock_held_by_a_live_process_is_waited_for_with_a_deadline(
    fresh_build_state, monkeypatch, tmp_path
):
    """Another live process building: wait for it, but not forever."""
    fcntl = pytest.importorskip("fcntl")
    monkeypatch.setattr(_build, "import_prebuilt", lambda name, expected_hash: None)
    monkeypatch.setattr(_build, "LOCK_WAIT_S", 0.5)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    sources, headers = _cpu.sources()
    build_dir = tmp_path / _cpu.extension_name(_build.source_hash(sources + headers))
    build_dir.mkdir()
    with open(build_dir / _build.BUILD_LOCK, "w") as holder:
        holder.write("4242")
        holder.flush()
        fcntl.flock(holder, fcntl.LOCK_EX)
        with pytest.raises(backends.BackendUnavailable) as refused:
            _registry.entry("cpu").loader()
    assert "Another process (pid 4242) has been building the kernels" in str(refused.value)


# The JIT build compiles for this machine (-march=native: AVX-512 here); a prebuilt module
# (setup.py) compiles for any CPU of its platform. So the code paths the host never builds
# are checked here: baseline x86-64 (SSE2 streaming of fp32 only) compiled, templates
# instantiated; AVX2 without AVX-512 built and run (the next test).
@pytest.mark.skipif(
    shutil.which("g++") is None or os.uname().machine != "x86_64",
    reason="needs g++ on x86-64",
)
def test_cpu_sources_compile_for_baseline_x86_64():
    sources, _ = _cpu.sources()
    includes = [*cpp_extension.include_paths(), sysconfig.get_paths()["include"]]
    for source in sources:
        cmd = ["g++", "-std=c++20", "-fsyntax-only", "-march=x86-64", "-fopenmp"]
        cmd += ["-DTORCH_EXTENSION_NAME=check", *(f"-I{path}" for path in includes), str(source)]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.skipif(
    shutil.which("g++") is None or os.uname().machine != "x86_64",
    reason="needs g++ on x86-64",
)
def test_avx2_build_gives_the_same_bits(tmp_path):
    """The AVX2 build (`helpers.avx2_build`) passes the conversion tests (PyTorch's bits), the
    fused backward's formula tests and the dense scatter's, in a child process with its own
    extension cache."""
    root = Path(__file__).resolve().parents[1]
    path = os.pathsep.join([str(root), str(root / "tests")])
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path), "PYTHONPATH": path}
    tests = [
        "tests/ops/test_cpu_conversions.py",
        "tests/ops/test_backward_blocking.py",
        "tests/ops/test_cpu_scatter_rows.py",
    ]
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "helpers.avx2_build", *tests]
    cmd += ["-k", "conversions or scatter or rounds or sums or reduce_lowrank"]
    cmd += ["-p", "no:cacheprovider"]
    result = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and " deselected" in result.stdout, result.stdout[-500:]
    built = [p.name for p in tmp_path.iterdir()]
    assert any(name.endswith("_avx2") for name in built), built
