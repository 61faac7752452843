"""The one-command GPU run: byte counts, device lookup, and a clean exit without a GPU."""

import pytest
import torch

from dept_kernels import gpu_run
from dept_kernels.bench import SHAPES


def test_exits_cleanly_without_a_gpu(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert gpu_run.main([]) == 0
    assert "no CUDA GPU" in capsys.readouterr().out


def test_forward_min_bytes_at_llama_dims():
    shape = SHAPES["llama-2-7b"]  # B=8, s=512, d=4096, m=60
    tokens = 8 * 512
    expected = tokens * 8 + tokens * 4096 * 2 + 8 * (60 + 512) * 4096 * 2
    assert gpu_run.forward_min_bytes(shape, torch.bfloat16) == expected


def test_peak_bandwidth_lookup():
    assert gpu_run.peak_bandwidth("NVIDIA H100 80GB HBM3") == 3.35e12
    assert gpu_run.peak_bandwidth("NVIDIA H100 PCIe") == 2.0e12
    assert gpu_run.peak_bandwidth("NVIDIA H200") == 4.8e12
    assert gpu_run.peak_bandwidth("Some Other GPU") is None
