"""Backend selection: global setter, context manager, availability, clear refusals."""

import pytest
import torch

import dept_kernels
from dept_kernels import _backend


def test_context_manager_restores_previous_choice():
    assert dept_kernels.current_backend() is None
    with dept_kernels.use_backend("torch"):
        assert dept_kernels.current_backend() == "torch"
        with dept_kernels.use_backend("cpu"):
            assert dept_kernels.current_backend() == "cpu"
        assert dept_kernels.current_backend() == "torch"
    assert dept_kernels.current_backend() is None


def test_global_setter():
    try:
        dept_kernels.use_backend("torch")
        assert dept_kernels.current_backend() == "torch"
    finally:
        dept_kernels.use_backend(None)
    assert dept_kernels.current_backend() is None


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend must be one of"):
        dept_kernels.use_backend("tpu")


def test_available_backends_here():
    names = dept_kernels.available_backends()
    assert names[-1] == "torch"
    assert "cpu" in names, "the C++ cpu backend must build on this machine"
    if not torch.cuda.is_available():
        assert "cuda" not in names


def test_default_is_cpu_for_cpu_tensors():
    assert _backend.resolve(torch.device("cpu")) == "cpu"


def test_triton_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with dept_kernels.use_backend("triton"), pytest.raises(ValueError, match="TRITON_INTERPRET"):
        _backend.resolve(torch.device("cpu"))


def test_cuda_backend_needs_cuda_tensors():
    with dept_kernels.use_backend("cuda"), pytest.raises(ValueError, match="CUDA tensors"):
        _backend.resolve(torch.device("cpu"))
