"""Launcher paths of the Triton backend that the shared op tests' small shapes do not reach."""

import pytest
import torch
from helpers import DEVICE, assert_close

import dept_kernels
from dept_kernels.ops import dept_embedding
from dept_kernels.testing import reference_dept_embedding

pytest.importorskip("triton")
if "triton" not in dept_kernels.available_backends():
    pytest.skip("triton does not run here", allow_module_level=True)

from dept_kernels.triton import dept_embedding as kernels


def _resident(monkeypatch, programs: int) -> None:
    """Pretend `programs` programs fit on the device at once (the grid aims at WAVES of them)."""
    monkeypatch.setattr(kernels, "resident_programs", lambda device, kernel: programs)


@pytest.mark.parametrize("resident", [10**6, 2], ids=["one-per-chunk", "uneven-chunks"])
def test_position_forward_split_over_batch_chunks(monkeypatch, resident):
    # Few tiles per batch: the launcher splits the batch into chunks to fill WAVES waves.
    # Here 2 tiles (positions + prompt) per element: 2 resident programs, 2 waves give chunks
    # of 3 and 2 for B=5.
    assert kernels.WAVES == 2
    _resident(monkeypatch, resident)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 30, (5, 7), generator=g).to(DEVICE)
    weight = torch.randn(30, 40, generator=g).to(DEVICE)
    prompt = torch.randn(3, 40, generator=g).to(DEVICE)
    lora_a = torch.randn(9, 4, generator=g).to(DEVICE)
    lora_b = torch.randn(4, 40, generator=g).to(DEVICE)
    with dept_kernels.use_backend("triton"):
        out = dept_embedding(ids, weight, prompt, lora_a, lora_b, scaling=0.3)
    ref = reference_dept_embedding(ids, weight, prompt, lora_a, lora_b, scaling=0.3)
    assert_close(out, ref, torch.float32)


@pytest.mark.parametrize("resident", [10**6, 2], ids=["one-per-chunk", "uneven-chunks"])
def test_position_forward_with_tasks_split_over_batch_chunks(monkeypatch, resident):
    # Chunks of the task-sorted batch (3 and 2 samples for 2 resident programs) start and end
    # inside a task's run, so each chunk forms its first delta and re-forms it at every task
    # change.
    _resident(monkeypatch, resident)
    g = torch.Generator().manual_seed(0)
    task_ids = torch.tensor([1, 0, 1, 2, 0]).to(DEVICE)
    ids = torch.randint(0, 30, (5, 7), generator=g).to(DEVICE)
    weight = torch.randn(30, 40, generator=g).to(DEVICE)
    prompt = torch.randn(3, 3, 40, generator=g).to(DEVICE)
    lora_a = torch.randn(3, 9, 4, generator=g).to(DEVICE)
    lora_b = torch.randn(3, 4, 40, generator=g).to(DEVICE)
    args = (ids, weight, prompt, lora_a, lora_b)
    with dept_kernels.use_backend("triton"):
        out = dept_embedding(*args, scaling=0.3, task_ids=task_ids)
    ref = reference_dept_embedding(*args, scaling=0.3, task_ids=task_ids)
    assert_close(out, ref, torch.float32)
