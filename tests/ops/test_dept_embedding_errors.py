"""dept_embedding: bad input gets a clear error naming the argument, before any kernel runs."""

from __future__ import annotations

import pytest
import torch
from helpers import DEVICE

from dept_kernels import backends
from dept_kernels.ops import dept_embedding

V, D, L, R, M, T = 20, 12, 6, 3, 2, 3


def good(**over):
    kw = {
        "input_ids": torch.randint(0, V, (2, 4)),
        "weight": torch.randn(V, D),
        "prompt": torch.randn(M, D),
        "lora_a": torch.randn(L, R),
        "lora_b": torch.randn(R, D),
        "scaling": 0.5,
    }
    kw.update(over)
    # Tensors go to the test device; those placed on another device on purpose stay there.
    return {
        k: val.to(DEVICE) if isinstance(val, torch.Tensor) and val.device.type == "cpu" else val
        for k, val in kw.items()
    }


def stacked(**over):
    """Valid per-task arguments (T tasks, batch 2) with `over` replacing some."""
    kw = {
        "prompt": torch.randn(T, M, D),
        "lora_a": torch.randn(T, L, R),
        "lora_b": torch.randn(T, R, D),
        "task_ids": torch.tensor([2, 0]),
    }
    kw.update(over)
    return good(**kw)


BAD = {
    "id_too_large": (good(input_ids=torch.tensor([[0, V]])), IndexError, r"input_ids.*\[0, 20\)"),
    "negative_id": (good(input_ids=torch.tensor([[0, -1]])), IndexError, "input_ids.*negative"),
    "float_ids": (good(input_ids=torch.zeros(2, 4)), TypeError, "input_ids must be int64 or int32"),
    "int16_ids": (
        good(input_ids=torch.zeros(2, 4, dtype=torch.int16)),
        TypeError,
        "input_ids must be int64",
    ),
    "ids_1d": (
        good(input_ids=torch.zeros(4, dtype=torch.long)),
        ValueError,
        "input_ids must be 2-D",
    ),
    "s_over_L": (good(input_ids=torch.zeros(1, L + 1, dtype=torch.long)), ValueError, "max_length"),
    "rank_mismatch": (good(lora_b=torch.randn(R + 1, D)), ValueError, "rank mismatch"),
    "lora_b_width": (good(lora_b=torch.randn(R, D + 1)), ValueError, "lora_b has width"),
    "prompt_width": (good(prompt=torch.randn(M, D - 1)), ValueError, "prompt has width"),
    "prompt_1d": (good(prompt=torch.randn(D)), ValueError, "prompt must be 2-D"),
    "only_lora_a": (good(lora_b=None), ValueError, "lora_a and lora_b must be given together"),
    "int_weight": (good(weight=torch.zeros(V, D, dtype=torch.long)), TypeError, "weight must be"),
    "weight_3d": (good(weight=torch.randn(1, V, D)), ValueError, "weight must be 2-D"),
    "bad_index": (good(index="row"), ValueError, "index must be one of"),
    "token_rows": (good(index="token"), ValueError, "one row per vocabulary entry"),
    "position_out_of_range": (
        good(position_ids=torch.full((2, 4), L)),
        IndexError,
        "position_ids holds id 6",
    ),
    "position_shape": (
        good(position_ids=torch.zeros(2, 3, dtype=torch.long)),
        ValueError,
        "position_ids shape",
    ),
    "position_float": (good(position_ids=torch.zeros(2, 4)), TypeError, "position_ids must be"),
    "position_with_token": (
        good(lora_a=torch.randn(V, R), index="token", position_ids=torch.zeros(2, 4).long()),
        ValueError,
        "cannot be combined",
    ),
    "prompt_other_device": (
        good(prompt=torch.randn(M, D, device="meta")),
        ValueError,
        "prompt is on meta",
    ),
    "ids_other_device": (
        good(input_ids=torch.zeros(2, 4, dtype=torch.long, device="meta")),
        ValueError,
        "input_ids is on meta",
    ),
    "tensor_scaling": (good(scaling=torch.tensor(0.5)), TypeError, "scaling must be"),
    "ids_not_tensor": (good(input_ids=[[0, 1]]), TypeError, "input_ids must be a torch.Tensor"),
    "task_ids_with_2d_params": (
        good(task_ids=torch.tensor([0, 1])),
        ValueError,
        r"with task_ids, prompt must be stacked per task .*\(2, 12\)",
    ),
    "task_ids_without_params": (
        good(prompt=None, lora_a=None, lora_b=None, task_ids=torch.tensor([0, 1])),
        ValueError,
        "task_ids needs parameters stacked per task",
    ),
    "stacked_prompt_without_task_ids": (
        stacked(task_ids=None),
        ValueError,
        r"prompt has shape \(3, 2, 12\): parameters stacked per task need task_ids",
    ),
    "stacked_lora_without_task_ids": (
        good(lora_a=torch.randn(T, L, R), lora_b=torch.randn(T, R, D)),
        ValueError,
        "lora_a has shape .* need task_ids",
    ),
    "one_factor_not_stacked": (
        stacked(lora_b=torch.randn(R, D)),
        ValueError,
        "with task_ids, lora_b must be stacked",
    ),
    "task_count_mismatch": (
        stacked(prompt=torch.randn(T + 1, M, D)),
        ValueError,
        "task count mismatch.*prompt has T=4, lora_a has T=3, lora_b has T=3",
    ),
    "task_id_too_large": (
        stacked(task_ids=torch.tensor([0, T])),
        IndexError,
        r"task_ids holds id 3, out of range \[0, 3\)",
    ),
    "negative_task_id": (
        stacked(task_ids=torch.tensor([-1, 0])),
        IndexError,
        "task_ids holds a negative id",
    ),
    "float_task_ids": (
        stacked(task_ids=torch.zeros(2)),
        TypeError,
        "task_ids must be int64 or int32",
    ),
    "task_ids_2d": (
        stacked(task_ids=torch.zeros(2, 1, dtype=torch.long)),
        ValueError,
        "task_ids must be 1-D",
    ),
    "task_ids_other_device": (
        stacked(task_ids=torch.zeros(2, dtype=torch.long, device="meta")),
        ValueError,
        "task_ids is on meta",
    ),
    "task_ids_batch_mismatch": (
        stacked(task_ids=torch.zeros(3, dtype=torch.long)),
        ValueError,
        "task_ids has 3 entries but input_ids has batch size 2",
    ),
    "stacked_rank_mismatch": (
        stacked(lora_b=torch.randn(T, R + 1, D)),
        ValueError,
        "rank mismatch",
    ),
    "stacked_token_rows": (
        stacked(index="token"),
        ValueError,
        "one row per vocabulary entry",
    ),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input(backend, name):
    kw, exc, match = BAD[name]
    with pytest.raises(exc, match=match):
        dept_embedding(**kw)


def test_checks_run_before_any_kernel(backend, monkeypatch):
    def fail(_backend):
        raise AssertionError("a kernel was reached with bad input")

    monkeypatch.setattr(backends, "load", fail)
    with pytest.raises(IndexError):
        dept_embedding(**good(input_ids=torch.tensor([[V]])))
    with pytest.raises(IndexError, match="task_ids"):
        dept_embedding(**stacked(task_ids=torch.tensor([0, T])))


@pytest.mark.parametrize("tasks", [False, True], ids=["single", "tasks"])
def test_position_ids_same_tensor_as_input_ids_is_range_checked(backend, tasks):
    """Passing one tensor as both input_ids and position_ids is position mode: its values
    are rows of lora_a and must lie below L, though they are valid token ids (< V)."""
    ids = torch.tensor([[1, L + 3], [0, 2]], device=DEVICE)  # L + 3 < V
    kw = stacked(input_ids=ids) if tasks else good(input_ids=ids)
    message = rf"position_ids holds id {L + 3}, out of range \[0, {L}\)"
    with pytest.raises(IndexError, match=message):
        dept_embedding(**{**kw, "position_ids": ids})


def test_position_ids_are_checked_before_any_kernel(backend, monkeypatch):
    def fail(_backend):
        raise AssertionError("a kernel was reached with bad input")

    monkeypatch.setattr(backends, "load", fail)
    ids = torch.tensor([[0, L]], device=DEVICE)
    for positions in (ids, ids.clone()):
        with pytest.raises(IndexError, match="position_ids holds id"):
            dept_embedding(**good(input_ids=ids, position_ids=positions))
    with pytest.raises(IndexError, match="position_ids holds a negative id"):
        dept_embedding(**good(input_ids=ids, position_ids=ids - 1))
