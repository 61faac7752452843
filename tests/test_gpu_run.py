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


def test_forward_min_bytes_is_what_the_op_must_touch():
    """The floor, counted from the tensors the op reads and writes (on the meta device, so
    nothing is allocated): the int64 ids, one embedding row per token, the output."""
    shape = SHAPES["llama-2-7b"]
    b, s, d, m = shape.batch, shape.seq, shape.d, shape.m
    ids = torch.empty(b, s, dtype=torch.int64, device="meta")
    rows = torch.empty(b, s, d, dtype=torch.bfloat16, device="meta")  # E[ids], read once
    out = torch.empty(b, m + s, d, dtype=torch.bfloat16, device="meta")
    expected = ids.nbytes + rows.nbytes + out.nbytes
    assert gpu_run.forward_min_bytes(shape, torch.bfloat16) == expected


def test_peak_bandwidth_lookup():
    """NVIDIA's data-sheet HBM bandwidths: H100 SXM5 3.35 TB/s, H100 PCIe 2.0 TB/s, H200
    4.8 TB/s; the device name picks the most specific entry."""
    assert gpu_run.peak_bandwidth("NVIDIA H100 80GB HBM3") == 3.35e12
    assert gpu_run.peak_bandwidth("NVIDIA H100 PCIe") == 2.0e12
    assert gpu_run.peak_bandwidth("NVIDIA H200") == 4.8e12
    assert gpu_run.peak_bandwidth("Some Other GPU") is None
