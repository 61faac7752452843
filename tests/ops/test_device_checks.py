"""A kernel never reads tensors of a device it cannot address: a backend handed such tensors
raises a Python exception, also where the public op's checks are skipped (the custom op
called directly, as `torch.library.opcheck` and saved graphs do) and at the compiled
extension's binding. Found on the first GPU run: the cpu backend handed CUDA tensors
through `opcheck` crashed the process."""

from __future__ import annotations

import pytest
import torch
from helpers import DEVICE

import dept_kernels
from dept_kernels import backends

OTHER = {"cpu": "cuda", "cuda": "cpu"}[DEVICE]


def _op_args(device: str, backend: str) -> tuple:
    ids = torch.tensor([[0, 1, 2]], device=device)
    weight = torch.randn(4, 8, device=device)
    prompt = torch.randn(2, 8, device=device)
    lora_a, lora_b = torch.randn(3, 2, device=device), torch.randn(2, 8, device=device)
    return (ids, weight, prompt, lora_a, lora_b, None, None, 0, 0.5, "position", backend)


def test_resolved_refuses_a_backend_of_another_device():
    with pytest.raises(ValueError, match=f"backend '{OTHER}' needs {OTHER.upper()} tensors"):
        backends.resolved(OTHER, torch.device(DEVICE))
    assert backends.resolved("torch", torch.device(DEVICE)) == "torch"


def test_custom_op_called_directly_checks_the_backend_device():
    """The backend named in the custom op's arguments must take the tensors' device: checked
    in the op's body, before the backend is loaded (the cuda one would build)."""
    with pytest.raises(ValueError, match=f"needs {OTHER.upper()} tensors"):
        torch.ops.dept_kernels.dept_embedding(*_op_args(DEVICE, OTHER))


@pytest.mark.skipif("cpu" not in dept_kernels.available_backends(), reason="no cpu backend")
def test_cpu_binding_refuses_tensors_of_another_device():
    """The C++ binding's own check (the last line of defence): meta tensors have no data,
    so a kernel reading one would crash."""
    cpu = backends.load("cpu")
    ids, weight, prompt, lora_a, lora_b = _op_args("cpu", "cpu")[:5]
    meta = {
        "weight": weight.to("meta"),
        "input_ids": ids.to("meta"),
        "prompt": prompt.to("meta"),
        "lora_b": lora_b.to("meta"),
    }
    args = {"input_ids": ids, "weight": weight, "prompt": prompt, "lora_a": lora_a}
    for name, moved in meta.items():
        call = {**args, "lora_b": lora_b, name: moved}
        with pytest.raises(RuntimeError, match=f"{name} must be on cpu"):
            cpu.forward(
                call["input_ids"], call["weight"], call["prompt"], call["lora_a"],
                call["lora_b"], None, 0.5,
            )  # fmt: skip
    grad = torch.randn(1, 5, 8)
    with pytest.raises(RuntimeError, match="grad_out must be on cpu"):
        cpu.reduce(grad.to("meta"), 2, None, None)
    order, offsets = torch.arange(3), torch.tensor([0, 3])
    with pytest.raises(RuntimeError, match="offsets must be on cpu"):
        cpu.reduce(grad, 2, order, offsets.to("meta"))
    hidden, rows = torch.randn(1, 3, 8), torch.tensor([[0, 1, 1]])
    with pytest.raises(RuntimeError, match="table must be on cpu"):
        cpu.gather_add(hidden, rows, weight.to("meta"), torch.empty_like(hidden))
