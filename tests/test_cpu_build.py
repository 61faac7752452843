"""The build machinery of the C++ cpu backend: JIT build, load, and the fallback."""

import warnings

import pytest
import torch
from torch.utils import cpp_extension

import dept_kernels
from dept_kernels import _build, _cpu
from dept_kernels.ops import _torch_impl, reference_dept_embedding


@pytest.fixture
def fresh_build_state():
    """Forget the cached build outcome before and after the test."""
    _build._cpu_extension.cache_clear()
    _build.cpu_ops_or_reference.cache_clear()
    yield
    _build._cpu_extension.cache_clear()
    _build.cpu_ops_or_reference.cache_clear()


def test_extension_builds_and_loads():
    assert _build.cpu_extension_available()
    module = _build.cpu_extension()
    sources, headers = _build.cpu_sources()
    assert headers, "the shared binding header is part of the build"
    assert _build.source_hash(sources + headers) == module.SOURCE_HASH
    assert _build.cpu_ops_or_reference() is _cpu
    assert "cpu" in dept_kernels.available_backends()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_cuda_backend_refuses_clearly_without_a_gpu():
    assert not _build.cuda_extension_available()
    with pytest.raises(RuntimeError, match="CUDA extension is unavailable"):
        _build.cuda_ops()


def _break_with_raising_loader(monkeypatch, tmp_path):
    def fail(*args, **kwargs):
        raise OSError("no C++ compiler found")

    monkeypatch.setattr(cpp_extension, "load", fail)


def _break_with_bogus_compiler(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "extensions"))


@pytest.mark.parametrize("break_build", [_break_with_raising_loader, _break_with_bogus_compiler])
def test_failed_build_warns_once_and_falls_back(
    break_build, fresh_build_state, monkeypatch, tmp_path
):
    monkeypatch.setattr(_build, "_import_prebuilt", lambda expected_hash: None)
    break_build(monkeypatch, tmp_path)
    torch.manual_seed(0)
    ids = torch.randint(0, 50, (3, 6))
    weight = torch.randn(50, 24)
    prompt = torch.randn(2, 24)
    lora_a, lora_b = torch.randn(8, 4), torch.randn(4, 24)
    with warnings.catch_warnings(record=True) as caught, dept_kernels.use_backend("cpu"):
        warnings.simplefilter("always")
        ops = _build.cpu_ops_or_reference()
        out = dept_kernels.dept_embedding(ids, weight, prompt, lora_a, lora_b, scaling=0.5)
        again = dept_kernels.dept_embedding(ids, weight, prompt, lora_a, lora_b, scaling=0.5)
    assert ops is _torch_impl
    assert not _build.cpu_extension_available()
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1, messages
    assert "could not be built" in messages[0]
    expected = reference_dept_embedding(ids, weight, prompt, lora_a, lora_b, scaling=0.5)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(again, expected)
