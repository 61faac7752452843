"""The one catalogue of bad inputs, for every public function.

Each row of `CATALOGUE` is a bad input, the call that receives it, the exception it must
raise and a pattern its message must match: the argument and the problem. The calls run
with every kernel replaced by a failure, so a check that comes after a kernel has touched
memory fails the row; the `dept_embedding` rows run again under every backend here. Valid
inputs that are easy to get wrong (non-contiguous, empty, mixed dtypes) have their own
tables: they must work and agree with the plain case.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import transformers
from helpers import DEVICE, aot, assert_close, cut_off_kernels
from helpers.models import VOCAB, make_config, randomize, tiny_config, tiny_model
from safetensors.torch import load_file, save_file

import dept_kernels as dk
from dept_kernels.methods import AoTAdapter, DePTAdapter, PromptTuningAdapter
from dept_kernels.ops import (
    aot_bias_add,
    aot_fc_bias,
    aot_kron_bias,
    dept_embedding,
    fc_rows,
    kron_rows,
)
from dept_kernels.patch import attach_adapter, new_adapter, replace_adapter
from dept_kernels.testing import (
    official_dept_embedding,
    reference_aot_bias_add,
    reference_dept_embedding,
)

OFFICIAL = Path(__file__).parent / "fixtures" / "dept_official" / "cola"
V, D, L, R, M, T = 20, 12, 6, 3, 2, 3
CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def bad(
    name: str,
    call: Callable[[Path], object],
    exc,
    match: str,
    kernels: bool = False,
):
    """A catalogue row; `call` gets a fresh temporary directory. `kernels`: the bad input is
    one no kernel reads (a mask), so valid work may run before it is refused."""
    return pytest.param(call, exc, match, kernels, id=name)


# --------------------------------------------------------------------------- op inputs


def ids(data, dtype=torch.long) -> torch.Tensor:
    return torch.tensor(data, dtype=dtype, device=DEVICE)


def randn(*shape: int, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape))).to(DEVICE, dtype)


def meta(*shape: int, dtype=torch.float32) -> torch.Tensor:
    """A tensor on a second device, which the CPU test machine also has."""
    return torch.zeros(shape, dtype=dtype, device="meta")


def op_args(**over) -> dict:
    """Valid `dept_embedding` arguments (B=2, s=4 <= L) with `over` replacing some."""
    kw = {
        "input_ids": ids([[0, 5, 19, 3], [7, 7, 1, 0]]),
        "weight": randn(V, D),
        "prompt": randn(M, D),
        "lora_a": randn(L, R),
        "lora_b": randn(R, D),
        "scaling": 0.5,
    }
    return {**kw, **over}


def stacked_args(**over) -> dict:
    """Valid per-task arguments (T tasks, batch 2) with `over` replacing some."""
    kw = {
        "prompt": randn(T, M, D),
        "lora_a": randn(T, L, R),
        "lora_b": randn(T, R, D),
        "task_ids": ids([2, 0]),
    }
    return op_args(**{**kw, **over})


def official_args(**over) -> dict:
    """Valid `official_dept_embedding` arguments: s == L."""
    return op_args(**{"input_ids": ids([[1] * L, [2] * L]), **over})


def hidden_and_ids() -> dict:
    """A layer input (2, 4, D) and the ids of its tokens."""
    return {"hidden": randn(2, 4, D), "input_ids": op_args()["input_ids"]}


def aot_args(**over) -> dict:
    """Valid `aot_bias_add` arguments: a (V, D) table."""
    return {**hidden_and_ids(), "table": randn(V, D), **over}


def task_table_args(**over) -> dict:
    """Valid `aot_bias_add` arguments with T stacked tables."""
    return aot_args(**{"table": randn(T, V, D), "task_ids": ids([2, 0]), **over})


def kron_args(**over) -> dict:
    """Valid `aot_kron_bias` arguments: a*b = 5*4 = V rows, r = 3."""
    kw = {"w_l": randn(5, 3), "w_m": randn(4, 3), "w_r": randn(9, D)}
    return {**hidden_and_ids(), **kw, **over}


def fc_args(**over) -> dict:
    """Valid `aot_fc_bias` arguments: E (V, 8), r = 5."""
    kw = {"embedding": randn(V, 8), "w1": randn(8, 5), "b1": randn(5), "w2": randn(5, D)}
    return {**hidden_and_ids(), **kw, "b2": randn(D), **over}


def with_backend(name: str) -> None:
    with dk.use_backend(name):
        dept_embedding(**op_args())


OP_CASES = [
    # dept_embedding: ids.
    bad(
        "dept/id_out_of_range",
        lambda _: dept_embedding(**op_args(input_ids=ids([[0, V]]))),
        IndexError,
        r"input_ids holds id 20, out of range \[0, 20\)",
    ),
    bad(
        "dept/negative_id",
        lambda _: dept_embedding(**op_args(input_ids=ids([[0, -3]]))),
        IndexError,
        r"input_ids holds a negative id \(-3\)",
    ),
    bad(
        "dept/id_past_int32",
        lambda _: dept_embedding(**op_args(input_ids=ids([[0, 2**40]]))),
        IndexError,
        r"input_ids holds id 1099511627776",
    ),
    bad(
        "dept/float_ids",
        lambda _: dept_embedding(**op_args(input_ids=ids([[0.0, 1.0]], torch.float32))),
        TypeError,
        r"input_ids must be int64 or int32, got torch\.float32",
    ),
    bad(
        "dept/int8_ids",
        lambda _: dept_embedding(**op_args(input_ids=ids([[0, 1]], torch.int8))),
        TypeError,
        r"input_ids must be int64 or int32, got torch\.int8",
    ),
    bad(
        "dept/bool_ids",
        lambda _: dept_embedding(**op_args(input_ids=ids([[0, 1]], torch.bool))),
        TypeError,
        r"input_ids must be int64 or int32, got torch\.bool",
    ),
    bad(
        "dept/ids_1d",
        lambda _: dept_embedding(**op_args(input_ids=ids([0, 1]))),
        ValueError,
        r"input_ids must be 2-D, got shape \(2,\)",
    ),
    bad(
        "dept/ids_a_list",
        lambda _: dept_embedding(**op_args(input_ids=[[0, 1]])),
        TypeError,
        r"input_ids must be a torch\.Tensor, got list",
    ),
    bad(
        "dept/s_over_max_length",
        lambda _: dept_embedding(**op_args(input_ids=ids([[0] * (L + 1)]))),
        ValueError,
        r"sequence length s=7 > max_length L=6",
    ),
    bad(
        "dept/int16_ids",
        lambda _: dept_embedding(**op_args(input_ids=ids([[0, 1]], torch.int16))),
        TypeError,
        r"input_ids must be int64 or int32, got torch\.int16",
    ),
    # dept_embedding: shapes.
    bad(
        "dept/prompt_width",
        lambda _: dept_embedding(**op_args(prompt=randn(M, D - 1))),
        ValueError,
        r"prompt has width 11 but weight has embedding dim d=12",
    ),
    bad(
        "dept/prompt_1d",
        lambda _: dept_embedding(**op_args(prompt=randn(D))),
        ValueError,
        r"prompt must be 2-D",
    ),
    bad(
        "dept/lora_b_width",
        lambda _: dept_embedding(**op_args(lora_b=randn(R, D + 1))),
        ValueError,
        r"lora_b has width 13 but weight has d=12",
    ),
    bad(
        "dept/rank_mismatch",
        lambda _: dept_embedding(**op_args(lora_b=randn(R + 1, D))),
        ValueError,
        r"rank mismatch: lora_a is \(6, 3\) \(r=3\) but lora_b is \(4, 12\) \(r=4\)",
    ),
    bad(
        "dept/lora_a_alone",
        lambda _: dept_embedding(**op_args(lora_b=None)),
        ValueError,
        r"lora_a and lora_b must be given together",
    ),
    bad(
        "dept/weight_3d",
        lambda _: dept_embedding(**op_args(weight=randn(1, V, D))),
        ValueError,
        r"weight must be 2-D",
    ),
    bad(
        "dept/position_ids_shape",
        lambda _: dept_embedding(**op_args(position_ids=ids([[0, 1, 2]] * 2))),
        ValueError,
        r"position_ids shape \(2, 3\) must equal input_ids shape \(2, 4\)",
    ),
    bad(
        "dept/position_ids_past_max_length",
        lambda _: dept_embedding(**op_args(position_ids=ids([[0, 1, 2, L]] * 2))),
        IndexError,
        r"position_ids holds id 6, out of range \[0, 6\); lora_a has max_length L=6",
    ),
    bad(
        "dept/negative_position_id",
        lambda _: dept_embedding(**op_args(position_ids=ids([[0, 1, 2, -1]] * 2))),
        IndexError,
        r"position_ids holds a negative id \(-1\)",
    ),
    bad(
        "dept/float_position_ids",
        lambda _: dept_embedding(**op_args(position_ids=randn(2, 4))),
        TypeError,
        r"position_ids must be int64 or int32",
    ),
    bad(
        "dept/position_ids_in_token_mode",
        lambda _: dept_embedding(
            **op_args(lora_a=randn(V, R), index="token", position_ids=ids([[0] * 4] * 2))
        ),
        ValueError,
        r"position_ids cannot be combined with index='token'",
    ),
    bad(
        "dept/token_mode_rows",
        lambda _: dept_embedding(**op_args(index="token")),
        ValueError,
        r"one row per vocabulary entry: lora_a has 6 rows, weight has V=20",
    ),
    bad(
        "dept/unknown_index",
        lambda _: dept_embedding(**op_args(index="row")),
        ValueError,
        r"index must be one of \('position', 'token'\), got 'row'",
    ),
    # dept_embedding: dtypes and scalars.
    bad(
        "dept/fp64_weight",
        lambda _: dept_embedding(**op_args(weight=randn(V, D, dtype=torch.float64))),
        TypeError,
        r"weight must be float32, float16 or bfloat16, got torch\.float64",
    ),
    bad(
        "dept/int_weight",
        lambda _: dept_embedding(
            **op_args(weight=torch.zeros(V, D, dtype=torch.long, device=DEVICE))
        ),
        TypeError,
        r"weight must be float32, float16 or bfloat16, got torch\.int64",
    ),
    bad(
        "dept/int_lora_a",
        lambda _: dept_embedding(**op_args(lora_a=torch.ones(L, R, dtype=torch.long))),
        TypeError,
        r"lora_a must be float32, float16 or bfloat16, got torch\.int64",
    ),
    bad(
        "dept/nan_scaling",
        lambda _: dept_embedding(**op_args(scaling=float("nan"))),
        ValueError,
        r"scaling must be finite, got nan",
    ),
    bad(
        "dept/inf_scaling",
        lambda _: dept_embedding(**op_args(scaling=float("inf"))),
        ValueError,
        r"scaling must be finite, got inf",
    ),
    bad(
        "dept/bool_scaling",
        lambda _: dept_embedding(**op_args(scaling=True)),
        TypeError,
        r"scaling must be a Python number, got bool",
    ),
    bad(
        "dept/tensor_scaling",
        lambda _: dept_embedding(**op_args(scaling=torch.tensor(0.5))),
        TypeError,
        r"scaling must be a Python number, got Tensor",
    ),
    # dept_embedding: devices (meta stands in for a second device).
    bad(
        "dept/ids_on_other_device",
        lambda _: dept_embedding(**op_args(input_ids=meta(2, 4, dtype=torch.long))),
        ValueError,
        r"input_ids is on meta but weight is on",
    ),
    bad(
        "dept/prompt_on_other_device",
        lambda _: dept_embedding(**op_args(prompt=meta(M, D))),
        ValueError,
        r"prompt is on meta but weight is on",
    ),
    bad(
        "dept/lora_a_on_other_device",
        lambda _: dept_embedding(**op_args(lora_a=meta(L, R))),
        ValueError,
        r"lora_a is on meta but weight is on",
    ),
    bad(
        "dept/lora_b_on_other_device",
        lambda _: dept_embedding(**op_args(lora_b=meta(R, D))),
        ValueError,
        r"lora_b is on meta but weight is on",
    ),
    bad(
        "dept/position_ids_on_other_device",
        lambda _: dept_embedding(**op_args(position_ids=meta(2, 4, dtype=torch.long))),
        ValueError,
        r"position_ids is on meta but weight is on",
    ),
    # dept_embedding: visual rows (CLIP-T5), (B, n_v, d) like the table.
    bad(
        "dept/visual_2d",
        lambda _: dept_embedding(**op_args(visual=randn(5, D))),
        ValueError,
        r"visual must be 3-D, got shape \(5, 12\)",
    ),
    bad(
        "dept/visual_not_a_tensor",
        lambda _: dept_embedding(**op_args(visual=[[[0.0] * D]] * 2)),
        TypeError,
        r"visual must be a torch\.Tensor, got list",
    ),
    bad(
        "dept/visual_int",
        lambda _: dept_embedding(**op_args(visual=torch.ones(2, 5, D, dtype=torch.long))),
        TypeError,
        r"visual must be float32, float16 or bfloat16, got torch\.int64",
    ),
    bad(
        "dept/visual_dtype_differs_from_weight",
        lambda _: dept_embedding(**op_args(visual=randn(2, 5, D, dtype=torch.float16))),
        TypeError,
        r"visual has dtype torch\.float16 but weight has torch\.float32",
    ),
    bad(
        "dept/visual_batch",
        lambda _: dept_embedding(**op_args(visual=randn(3, 5, D))),
        ValueError,
        r"visual has batch size 3 but input_ids has batch size 2",
    ),
    bad(
        "dept/visual_width",
        lambda _: dept_embedding(**op_args(visual=randn(2, 5, D + 1))),
        ValueError,
        r"visual has width 13 but weight has embedding dim d=12",
    ),
    bad(
        "dept/visual_on_other_device",
        lambda _: dept_embedding(**op_args(visual=meta(2, 5, D))),
        ValueError,
        r"visual is on meta but weight is on",
    ),
    bad(
        "dept/visual_batch_with_tasks",
        lambda _: dept_embedding(**stacked_args(visual=randn(1, 5, D))),
        ValueError,
        r"visual has batch size 1 but input_ids has batch size 2",
    ),
    # dept_embedding: task ids with stacked parameters.
    bad(
        "dept/task_id_out_of_range",
        lambda _: dept_embedding(**stacked_args(task_ids=ids([0, T]))),
        IndexError,
        r"task_ids holds id 3, out of range \[0, 3\)",
    ),
    bad(
        "dept/negative_task_id",
        lambda _: dept_embedding(**stacked_args(task_ids=ids([-1, 0]))),
        IndexError,
        r"task_ids holds a negative id \(-1\)",
    ),
    bad(
        "dept/float_task_ids",
        lambda _: dept_embedding(**stacked_args(task_ids=randn(2))),
        TypeError,
        r"task_ids must be int64 or int32, got torch\.float32",
    ),
    bad(
        "dept/task_ids_length",
        lambda _: dept_embedding(**stacked_args(task_ids=ids([0, 1, 2]))),
        ValueError,
        r"task_ids has 3 entries but input_ids has batch size 2",
    ),
    bad(
        "dept/task_ids_2d",
        lambda _: dept_embedding(**stacked_args(task_ids=ids([[0], [1]]))),
        ValueError,
        r"task_ids must be 1-D",
    ),
    bad(
        "dept/task_ids_on_other_device",
        lambda _: dept_embedding(**stacked_args(task_ids=meta(2, dtype=torch.long))),
        ValueError,
        r"task_ids is on meta but weight is on",
    ),
    bad(
        "dept/task_ids_with_unstacked_params",
        lambda _: dept_embedding(**op_args(task_ids=ids([0, 1]))),
        ValueError,
        r"with task_ids, prompt must be stacked per task .*\(2, 12\)",
    ),
    bad(
        "dept/stacked_params_without_task_ids",
        lambda _: dept_embedding(**stacked_args(task_ids=None)),
        ValueError,
        r"prompt has shape \(3, 2, 12\): parameters stacked per task need task_ids",
    ),
    bad(
        "dept/task_count_mismatch",
        lambda _: dept_embedding(**stacked_args(prompt=randn(T + 1, M, D))),
        ValueError,
        r"task count mismatch .*prompt has T=4, lora_a has T=3, lora_b has T=3",
    ),
    bad(
        "dept/task_ids_without_params",
        lambda _: dept_embedding(
            **op_args(prompt=None, lora_a=None, lora_b=None, task_ids=ids([0, 1]))
        ),
        ValueError,
        r"task_ids needs parameters stacked per task",
    ),
    bad(
        "dept/stacked_lora_without_task_ids",
        lambda _: dept_embedding(**op_args(lora_a=randn(T, L, R), lora_b=randn(T, R, D))),
        ValueError,
        r"lora_a has shape .* need task_ids",
    ),
    bad(
        "dept/one_factor_not_stacked",
        lambda _: dept_embedding(**stacked_args(lora_b=randn(R, D))),
        ValueError,
        r"with task_ids, lora_b must be stacked",
    ),
    bad(
        "dept/stacked_rank_mismatch",
        lambda _: dept_embedding(**stacked_args(lora_b=randn(T, R + 1, D))),
        ValueError,
        r"rank mismatch",
    ),
    bad(
        "dept/stacked_token_mode_rows",
        lambda _: dept_embedding(**stacked_args(index="token")),
        ValueError,
        r"one row per vocabulary entry",
    ),
    # One tensor passed as both input_ids and position_ids is position mode: its values are
    # rows of lora_a and must lie below L, though they are valid token ids (< V).
    bad(
        "dept/position_ids_same_tensor_as_input_ids",
        lambda _: dept_embedding(
            **op_args(input_ids=(x := ids([[1, L + 3], [0, 2]])), position_ids=x)
        ),
        IndexError,
        rf"position_ids holds id {L + 3}, out of range \[0, {L}\)",
    ),
    bad(
        "dept/position_ids_same_tensor_as_input_ids_with_tasks",
        lambda _: dept_embedding(
            **stacked_args(input_ids=(x := ids([[1, L + 3], [0, 2]])), position_ids=x)
        ),
        IndexError,
        rf"position_ids holds id {L + 3}, out of range \[0, {L}\)",
    ),
    bad(
        "dept/position_ids_clone_of_input_ids",
        lambda _: dept_embedding(**op_args(input_ids=(x := ids([[0, L]])), position_ids=x.clone())),
        IndexError,
        r"position_ids holds id",
    ),
    bad(
        "dept/negative_position_ids_from_input_ids",
        lambda _: dept_embedding(**op_args(input_ids=(x := ids([[0, L]])), position_ids=x - 1)),
        IndexError,
        r"position_ids holds a negative id",
    ),
    # official_dept_embedding (the benchmarks' baseline) and the reference formula.
    bad(
        "official/short_input",
        lambda _: official_dept_embedding(**op_args()),
        ValueError,
        r"the official formula needs s == max_length: s=4, L=6",
    ),
    bad(
        "official/id_out_of_range",
        lambda _: official_dept_embedding(**official_args(input_ids=ids([[V] * L]))),
        IndexError,
        r"input_ids holds id 20, out of range \[0, 20\)",
    ),
    bad(
        "official/float_ids",
        lambda _: official_dept_embedding(**official_args(input_ids=randn(2, L))),
        TypeError,
        r"input_ids must be int64 or int32",
    ),
    bad(
        "official/prompt_width",
        lambda _: official_dept_embedding(**official_args(prompt=randn(M, D - 1))),
        ValueError,
        r"prompt has width 11",
    ),
    bad(
        "official/no_prompt",
        lambda _: official_dept_embedding(**official_args(prompt=None)),
        ValueError,
        r"the official formula needs prompt",
    ),
    bad(
        "reference/id_out_of_range",
        lambda _: reference_dept_embedding(**op_args(input_ids=ids([[0, V]]))),
        IndexError,
        r"input_ids holds id 20, out of range \[0, 20\)",
    ),
    bad(
        "reference/float_ids",
        lambda _: reference_dept_embedding(**op_args(input_ids=randn(2, 4))),
        TypeError,
        r"input_ids must be int64 or int32",
    ),
    bad(
        "reference/s_over_max_length",
        lambda _: reference_dept_embedding(**op_args(input_ids=ids([[0] * (L + 1)]))),
        ValueError,
        r"s=7 > max_length L=6",
    ),
    bad(
        "reference/task_id_out_of_range",
        lambda _: reference_dept_embedding(**stacked_args(task_ids=ids([0, T]))),
        IndexError,
        r"task_ids holds id 3",
    ),
    # aot_bias_add.
    bad(
        "aot_add/id_out_of_range",
        lambda _: aot_bias_add(**aot_args(input_ids=ids([[0, 1, 2, V]] * 2))),
        IndexError,
        r"input_ids holds id 20, out of range \[0, 20\)",
    ),
    bad(
        "aot_add/negative_id",
        lambda _: aot_bias_add(**aot_args(input_ids=ids([[0, 1, 2, -1]] * 2))),
        IndexError,
        r"input_ids holds a negative id",
    ),
    bad(
        "aot_add/float_ids",
        lambda _: aot_bias_add(**aot_args(input_ids=randn(2, 4))),
        TypeError,
        r"input_ids must be int64 or int32",
    ),
    bad(
        "aot_add/int8_ids",
        lambda _: aot_bias_add(**aot_args(input_ids=ids([[0] * 4] * 2, torch.int8))),
        TypeError,
        r"input_ids must be int64 or int32, got torch\.int8",
    ),
    bad(
        "aot_add/ids_vs_hidden",
        lambda _: aot_bias_add(**aot_args(input_ids=ids([[0, 1, 2]] * 2))),
        ValueError,
        r"input_ids shape \(2, 3\) must equal hidden's \(B, s\) = \(2, 4\)",
    ),
    bad(
        "aot_add/table_width",
        lambda _: aot_bias_add(**aot_args(table=randn(V, D - 2))),
        ValueError,
        r"table has width 10 but hidden has d=12",
    ),
    bad(
        "aot_add/table_4d",
        lambda _: aot_bias_add(**aot_args(table=randn(1, 1, V, D))),
        ValueError,
        r"table must be 2-D",
    ),
    bad(
        "aot_add/int_table",
        lambda _: aot_bias_add(**aot_args(table=torch.ones(V, D, dtype=torch.long))),
        TypeError,
        r"table must be float32, float16 or bfloat16",
    ),
    bad(
        "aot_add/fp64_hidden",
        lambda _: aot_bias_add(**aot_args(hidden=randn(2, 4, D, dtype=torch.float64))),
        TypeError,
        r"hidden must be float32, float16 or bfloat16, got torch\.float64",
    ),
    bad(
        "aot_add/hidden_2d",
        lambda _: aot_bias_add(**aot_args(hidden=randn(4, D))),
        ValueError,
        r"hidden must be 3-D",
    ),
    bad(
        "aot_add/table_on_other_device",
        lambda _: aot_bias_add(**aot_args(table=meta(V, D))),
        ValueError,
        r"table is on meta but hidden is on",
    ),
    bad(
        "aot_add/ids_on_other_device",
        lambda _: aot_bias_add(**aot_args(input_ids=meta(2, 4, dtype=torch.long))),
        ValueError,
        r"input_ids is on meta but hidden is on",
    ),
    bad(
        "aot_add/stacked_without_task_ids",
        lambda _: aot_bias_add(**task_table_args(task_ids=None)),
        ValueError,
        r"stacked tables \(T, V, d\) need task_ids",
    ),
    bad(
        "aot_add/task_id_out_of_range",
        lambda _: aot_bias_add(**task_table_args(task_ids=ids([0, T]))),
        IndexError,
        r"task_ids holds id 3, out of range \[0, 3\)",
    ),
    bad(
        "aot_add/negative_task_id",
        lambda _: aot_bias_add(**task_table_args(task_ids=ids([0, -1]))),
        IndexError,
        r"task_ids holds a negative id",
    ),
    bad(
        "aot_add/float_task_ids",
        lambda _: aot_bias_add(**task_table_args(task_ids=randn(2))),
        TypeError,
        r"task_ids must be int64 or int32",
    ),
    bad(
        "aot_add/task_ids_length",
        lambda _: aot_bias_add(**task_table_args(task_ids=ids([0, 1, 1]))),
        ValueError,
        r"task_ids has 3 entries but the batch has 2",
    ),
    bad(
        "aot_add/task_ids_on_other_device",
        lambda _: aot_bias_add(**task_table_args(task_ids=meta(2, dtype=torch.long))),
        ValueError,
        r"task_ids is on meta but hidden is on",
    ),
    bad(
        "aot_add/task_ids_with_one_table",
        lambda _: aot_bias_add(**aot_args(task_ids=ids([0, 1]))),
        ValueError,
        r"task_ids needs stacked tables",
    ),
    bad(
        "aot_add/inplace_with_grad",
        lambda _: aot_bias_add(**aot_args(hidden=randn(2, 4, D).requires_grad_()), inplace=True),
        RuntimeError,
        r"inplace=True\) is for inference; hidden or table requires grad",
    ),
    bad(
        "aot_add/inplace_non_contiguous",
        lambda _: aot_bias_add(**aot_args(hidden=randn(4, 2, D).transpose(0, 1)), inplace=True),
        ValueError,
        r"inplace=True\) needs a contiguous hidden",
    ),
    # aot_kron_bias / aot_fc_bias.
    bad(
        "aot_kron/id_past_a_times_b",
        lambda _: aot_kron_bias(**kron_args(w_l=randn(2, 3))),
        IndexError,
        r"input_ids holds id 19, out of range \[0, 8\)",
    ),
    bad(
        "aot_kron/rank_mismatch",
        lambda _: aot_kron_bias(**kron_args(w_m=randn(4, 2))),
        ValueError,
        r"Kronecker factors disagree on r",
    ),
    bad(
        "aot_kron/w_r_rows",
        lambda _: aot_kron_bias(**kron_args(w_r=randn(8, D))),
        ValueError,
        r"w_r needs r\*r rows",
    ),
    bad(
        "aot_kron/w_r_width",
        lambda _: aot_kron_bias(**kron_args(w_r=randn(9, D - 1))),
        ValueError,
        r"w_r has width 11 but hidden has d=12",
    ),
    bad(
        "aot_kron/dropout_one",
        lambda _: aot_kron_bias(**kron_args(), dropout_p=1.0),
        ValueError,
        r"dropout_p must lie in \[0, 1\), got 1\.0",
    ),
    bad(
        "aot_kron/negative_dropout",
        lambda _: aot_kron_bias(**kron_args(), dropout_p=-0.1),
        ValueError,
        r"dropout_p must lie in \[0, 1\)",
    ),
    bad(
        "aot_kron/float_ids",
        lambda _: aot_kron_bias(**kron_args(input_ids=randn(2, 4))),
        TypeError,
        r"input_ids must be int64 or int32",
    ),
    bad(
        "aot_kron/w_l_on_other_device",
        lambda _: aot_kron_bias(**kron_args(w_l=meta(5, 3))),
        ValueError,
        r"w_l is on meta but hidden is on",
    ),
    bad(
        "aot_fc/id_out_of_range",
        lambda _: aot_fc_bias(**fc_args(input_ids=ids([[0, 1, 2, V]] * 2))),
        IndexError,
        r"input_ids holds id 20, out of range \[0, 20\)",
    ),
    bad(
        "aot_fc/embedding_width",
        lambda _: aot_fc_bias(**fc_args(embedding=randn(V, 7))),
        ValueError,
        r"FC shapes disagree: embedding \(20, 7\), w1 \(8, 5\)",
    ),
    bad(
        "aot_fc/b1_length",
        lambda _: aot_fc_bias(**fc_args(b1=randn(4))),
        ValueError,
        r"FC shapes disagree.* b1 \(4,\)",
    ),
    bad(
        "aot_fc/w2_width",
        lambda _: aot_fc_bias(**fc_args(w2=randn(5, D - 1))),
        ValueError,
        r"FC shapes disagree.* w2 \(5, 11\)",
    ),
    bad(
        "aot_fc/unknown_activation",
        lambda _: aot_fc_bias(**fc_args(), activation="softmax"),
        ValueError,
        r"activation must be one of .*got 'softmax'",
    ),
    bad(
        "aot_fc/embedding_on_other_device",
        lambda _: aot_fc_bias(**fc_args(embedding=meta(V, 8))),
        ValueError,
        r"embedding is on meta but hidden is on",
    ),
    # The row builders and the AoT reference formula check nothing yet.
    bad(
        "kron_rows/id_past_a_times_b",
        lambda _: kron_rows(ids([V + 5]), randn(5, 3), randn(4, 3), randn(9, D)),
        IndexError,
        r"ids holds id 25, out of range \[0, 20\)",
    ),
    bad(
        "kron_rows/negative_id",
        lambda _: kron_rows(ids([-1]), randn(5, 3), randn(4, 3), randn(9, D)),
        IndexError,
        r"ids holds a negative id",
    ),
    bad(
        "kron_rows/float_ids",
        lambda _: kron_rows(randn(1), randn(5, 3), randn(4, 3), randn(9, D)),
        TypeError,
        r"ids must be int64 or int32",
    ),
    bad(
        "kron_rows/rank_mismatch",
        lambda _: kron_rows(ids([1]), randn(5, 3), randn(4, 2), randn(9, D)),
        ValueError,
        r"Kronecker factors disagree on r",
    ),
    bad(
        "fc_rows/id_out_of_range",
        lambda _: fc_rows(ids([V]), randn(V, 8), randn(8, 5), randn(5), randn(5, D), randn(D)),
        IndexError,
        r"ids holds id 20, out of range \[0, 20\)",
    ),
    bad(
        "fc_rows/float_ids",
        lambda _: fc_rows(randn(1), randn(V, 8), randn(8, 5), randn(5), randn(5, D), randn(D)),
        TypeError,
        r"ids must be int64 or int32",
    ),
    bad(
        "fc_rows/unknown_activation",
        lambda _: fc_rows(
            ids([1]), randn(V, 8), randn(8, 5), randn(5), randn(5, D), randn(D), activation="x"
        ),
        ValueError,
        r"activation must be one of",
    ),
    bad(
        "reference_aot/id_out_of_range",
        lambda _: reference_aot_bias_add(**aot_args(input_ids=ids([[0, 1, 2, V]] * 2))),
        IndexError,
        r"input_ids holds id 20, out of range \[0, 20\)",
    ),
    bad(
        "reference_aot/float_ids",
        lambda _: reference_aot_bias_add(**aot_args(input_ids=randn(2, 4))),
        TypeError,
        r"input_ids must be int64 or int32",
    ),
    # use_backend.
    bad(
        "use_backend/unknown_name",
        lambda _: dk.use_backend("gpu"),
        ValueError,
        r"backend must be one of \('torch', 'cpu', 'triton', 'cuda'\) or None, got 'gpu'",
    ),
    bad(
        "use_backend/tensors_of_another_device",
        lambda _: with_backend("cpu" if DEVICE == "cuda" else "cuda"),
        ValueError,
        r"backend '(cpu|cuda)' needs (CPU|CUDA) tensors",
    ),
]


# --------------------------------------------------------------------------- models


def gpt2(**change) -> transformers.GPT2LMHeadModel:
    """The tiny GPT-2 of test_patch (seeded, so two calls share base weights), or one with
    some config fields changed."""
    if not change:
        return tiny_model("gpt2")
    torch.manual_seed(0)
    config = transformers.GPT2Config(**{**tiny_config("gpt2").to_dict(), **change})
    return transformers.GPT2LMHeadModel(config).eval()


def prompt_model(arch: str = "gpt2", method: str = "dept", max_length: int = 8):
    return dk.patch(tiny_model(arch), make_config(method, max_length))


def aot_model(reparam: str = "kron", fused: bool = False, model=None):
    model = dk.patch(gpt2() if model is None else model, dk.AoTConfig(reparam, r=2))
    return dk.merge(model) if fused else model


def served_prompts(method: str = "pt", tasks: int = 3):
    """One GPT-2 serving `tasks` stacked prompt adapters."""
    base = tiny_model("gpt2")
    return dk.stack_adapters(
        [dk.patch(copy.deepcopy(base), make_config(method)) for _ in range(tasks)]
    )


def served_aot(tasks: int = 2):
    return dk.stack_adapters([aot_model(fused=True) for _ in range(tasks)])


def tokens(b: int = 2, s: int = 5, dtype=torch.long) -> torch.Tensor:
    return torch.randint(2, VOCAB, (b, s), generator=torch.Generator().manual_seed(s)).to(dtype)


def forward(model, input_ids, **kw):
    """A forward of a tiny LM; T5 gets decoder labels."""
    if model.config.model_type == "t5":
        kw.setdefault("labels", tokens(input_ids.shape[0], 3))
    return model(input_ids=input_ids, **kw)


def generate(model, input_ids, **kw):
    return model.generate(input_ids=input_ids, max_new_tokens=2, do_sample=False, **kw)


MODEL_CASES = [
    *(
        bad(
            f"model/{arch}/id_out_of_range",
            lambda _, arch=arch: forward(prompt_model(arch), tokens().fill_(VOCAB)),
            IndexError,
            r"input_ids holds id 128, out of range \[0, 128\)",
        )
        for arch in ("t5", "gpt2", "llama")
    ),
    *(
        bad(
            f"model/{arch}/s_over_max_length",
            lambda _, arch=arch: forward(prompt_model(arch, max_length=4), tokens(s=5)),
            ValueError,
            r"sequence length s=5 > max_length L=4",
        )
        for arch in ("t5", "gpt2", "llama")
    ),
    bad(
        "model/negative_id",
        lambda _: forward(prompt_model("llama"), -tokens()),
        IndexError,
        r"input_ids holds a negative id",
    ),
    bad(
        "model/float_ids",
        lambda _: forward(prompt_model("t5"), tokens(dtype=torch.float32)),
        TypeError,
        r"input_ids must be int64 or int32, got torch\.float32",
    ),
    bad(
        "model/int8_ids",
        lambda _: forward(prompt_model("gpt2", "pt"), tokens(dtype=torch.int8)),
        TypeError,
        r"input_ids must be int64 or int32, got torch\.int8",
    ),
    bad(
        "model/ids_1d",
        lambda _: forward(prompt_model("gpt2", "ept"), tokens()[0]),
        ValueError,
        r"input_ids must be 2-D",
    ),
    bad(
        "model/ids_on_other_device",
        lambda _: forward(prompt_model("gpt2"), tokens().to("meta")),
        ValueError,
        r"input_ids is on meta but weight is on cpu",
    ),
    bad(
        "model/inputs_embeds_only",
        lambda _: prompt_model("gpt2")(inputs_embeds=torch.zeros(1, 3, 32)),
        ValueError,
        r"needs input_ids",
    ),
    bad(
        "model/token_type_ids",
        lambda _: forward(prompt_model("gpt2"), tokens(), token_type_ids=tokens()),
        ValueError,
        r"token_type_ids are not supported with a soft prompt",
    ),
    bad(
        "model/mask_3d",
        lambda _: forward(prompt_model("t5"), tokens(), attention_mask=torch.ones(2, 5, 5)),
        ValueError,
        r"attention_mask must be a 2D \(batch, seq\) padding mask, got \(2, 5, 5\)",
        kernels=True,
    ),
    *(
        bad(
            f"model/{arch}/mask_length",
            lambda _, arch=arch: forward(
                prompt_model(arch), tokens(), attention_mask=torch.ones(2, 4, dtype=torch.long)
            ),
            ValueError,
            r"attention_mask .*\(2, 4\).*input_ids .*\(2, 5\)",
            kernels=True,
        )
        for arch in ("t5", "llama")
    ),
    bad(
        "model/mask_batch",
        lambda _: forward(
            prompt_model("gpt2"), tokens(), attention_mask=torch.ones(3, 5, dtype=torch.long)
        ),
        ValueError,
        r"attention_mask .*\(3, 5\).*input_ids .*\(2, 5\)",
        kernels=True,
    ),
    bad(
        "model/position_ids_length",
        lambda _: forward(prompt_model("gpt2"), tokens(), position_ids=torch.arange(4)[None]),
        ValueError,
        r"position_ids must have shape \(2, 5\) or \(1, 5\) like input_ids, got \(1, 4\)",
    ),
    bad(
        "model/position_ids_batch",
        lambda _: forward(
            prompt_model("llama"), tokens(), position_ids=torch.arange(5).expand(3, 5)
        ),
        ValueError,
        r"position_ids .*\(3, 5\)",
    ),
    bad(
        "model/position_ids_past_max_length",
        lambda _: forward(prompt_model("gpt2"), tokens(), position_ids=torch.arange(5)[None] + 4),
        IndexError,
        r"position_ids holds id 8, out of range \[0, 8\); lora_a has max_length L=8",
    ),
    bad(
        "model/float_position_ids",
        lambda _: forward(prompt_model("t5"), tokens(), position_ids=torch.zeros(2, 5)),
        TypeError,
        r"position_ids must be int64 or int32",
    ),
    bad(
        "model/empty_batch",
        lambda _: forward(prompt_model("gpt2"), tokens(b=0)),
        ValueError,
        r"input_ids .*(empty|B=0)",
    ),
    bad(
        "model/task_ids_for_one_task",
        lambda _: forward(prompt_model("t5"), tokens(), task_ids=torch.tensor([0, 0])),
        ValueError,
        r"task_ids were given but the adapter serves one task; .*stack_adapters",
    ),
    bad(
        "model/fp64_model",
        lambda _: dk.patch(tiny_model("gpt2", dtype=torch.float64), make_config("pt")),
        TypeError,
        r"the model's input embedding is torch\.float64; prompt adapters run on float32",
    ),
    bad(
        "generate/t5_s_over_max_length",
        lambda _: generate(prompt_model("t5", max_length=4), tokens(s=5)),
        ValueError,
        r"s=5 > max_length L=4",
    ),
    bad(
        "generate/gpt2_s_over_max_length",
        # generate hands the op its own position_ids 0..s-1: the error names max_length.
        lambda _: generate(prompt_model("gpt2", max_length=4), tokens(s=5)),
        (ValueError, IndexError),
        r"max_length L=4",
    ),
    bad(
        "generate/id_out_of_range",
        lambda _: generate(prompt_model("llama"), tokens().fill_(VOCAB)),
        IndexError,
        r"input_ids holds id 128",
    ),
    # AoT P-tuning through patch().
    bad(
        "aot_model/id_out_of_range",
        lambda _: forward(aot_model(), tokens().fill_(VOCAB)),
        IndexError,
        r"input_ids holds id 128, out of range \[0, 128\)",
    ),
    bad(
        "aot_model/negative_id",
        lambda _: forward(aot_model("fc"), -tokens()),
        IndexError,
        r"input_ids holds a negative id",
    ),
    bad(
        "aot_model/float_ids",
        lambda _: forward(aot_model(), tokens(dtype=torch.float32)),
        TypeError,
        r"input_ids must be int64 or int32",
    ),
    bad(
        "aot_model/ids_on_other_device",
        lambda _: forward(aot_model(), tokens().to("meta")),
        ValueError,
        r"input_ids is on meta",
    ),
    bad(
        "aot_model/inputs_embeds_only",
        lambda _: aot_model()(inputs_embeds=torch.zeros(1, 3, 32)),
        ValueError,
        r"needs input_ids",
    ),
    bad(
        "aot_model/task_ids_for_one_task",
        lambda _: forward(aot_model(), tokens(), task_ids=torch.tensor([0, 0])),
        ValueError,
        r"stack_adapters",
    ),
    bad(
        "aot_model/fused_in_training",
        lambda _: forward(aot_model(fused=True).train(), tokens()),
        RuntimeError,
        r"a fused AoT adapter is for inference",
    ),
    bad(
        "aot_model/fp64_model",
        lambda _: forward(aot_model(model=gpt2().double()), tokens()),
        TypeError,
        r"float32, float16 or bfloat16, got torch\.float64",
    ),
    bad(
        "aot_model/empty_batch",
        lambda _: forward(aot_model(), tokens(b=0)),
        ValueError,
        r"input_ids .*(empty|B=0)",
    ),
    bad(
        "aot_model/deberta_v2_inputs_embeds_only",
        lambda _: aot_model(model=deberta_v2())(inputs_embeds=torch.zeros(1, 3, 32)),
        ValueError,
        r"the AoT-patched DebertaV2Model needs input_ids",
    ),
    bad(
        "aot_model/deberta_v2_id_out_of_range",
        lambda _: forward(aot_model("fc", model=deberta_v2()), tokens().fill_(VOCAB)),
        IndexError,
        r"input_ids holds id 128, out of range \[0, 128\)",
    ),
]

# A model serving stacked adapters: task_ids (B,) in [0, T), required.
SERVED = {"prompt": served_prompts, "aot": served_aot}
TASK_CASES = [
    case
    for kind, make in SERVED.items()
    for case in (
        bad(
            f"served/{kind}/task_id_out_of_range",
            lambda _, make=make: forward(make(), tokens(), task_ids=torch.tensor([0, 3])),
            IndexError,
            r"task_ids holds id 3, out of range \[0, [23]\)",
        ),
        bad(
            f"served/{kind}/negative_task_id",
            lambda _, make=make: forward(make(), tokens(), task_ids=torch.tensor([0, -1])),
            IndexError,
            r"task_ids holds a negative id",
        ),
        bad(
            f"served/{kind}/float_task_ids",
            lambda _, make=make: forward(make(), tokens(), task_ids=torch.tensor([0.0, 1.0])),
            TypeError,
            r"task_ids must be int64 or int32, got torch\.float32",
        ),
        bad(
            f"served/{kind}/int8_task_ids",
            lambda _, make=make: forward(
                make(), tokens(), task_ids=torch.tensor([0, 1], dtype=torch.int8)
            ),
            TypeError,
            r"task_ids must be int64 or int32, got torch\.int8",
        ),
        bad(
            f"served/{kind}/task_ids_2d",
            lambda _, make=make: forward(make(), tokens(), task_ids=torch.tensor([[0, 1]])),
            ValueError,
            r"task_ids must be 1-D, got shape \(1, 2\)",
        ),
        bad(
            f"served/{kind}/task_ids_length",
            lambda _, make=make: forward(make(), tokens(), task_ids=torch.tensor([0, 1, 1])),
            ValueError,
            r"task_ids has 3 entries but (input_ids has batch size|the batch has) 2",
        ),
        bad(
            f"served/{kind}/task_ids_a_list",
            lambda _, make=make: forward(make(), tokens(), task_ids=[0, 1]),
            TypeError,
            r"task_ids must be a torch\.Tensor, got list",
        ),
        bad(
            f"served/{kind}/no_task_ids",
            lambda _, make=make: forward(make(), tokens()),
            ValueError,
            r"the model serves [23] stacked tasks: pass task_ids",
        ),
        bad(
            f"served/{kind}/generate_without_task_ids",
            lambda _, make=make: generate(make(), tokens()),
            ValueError,
            r"pass task_ids",
        ),
        bad(
            f"served/{kind}/generate_task_id_out_of_range",
            lambda _, make=make: generate(make(), tokens(), task_ids=torch.tensor([0, 3])),
            IndexError,
            r"task_ids holds id 3",
        ),
        bad(
            f"served/{kind}/generate_too_few_task_ids",
            # One task id for two samples is repeated as if it were one per beam.
            lambda _, make=make: generate(make(), tokens(), task_ids=torch.tensor([1])),
            ValueError,
            r"task_ids has 1 entr.* 2",
        ),
    )
]

# --------------------------------------------------------------------------- configs, patch API

CONFIG_CASES = [
    bad("DePTConfig/negative_r", lambda _: dk.DePTConfig(4, r=-1), ValueError, r"r must be >= 0"),
    bad("DePTConfig/float_r", lambda _: dk.DePTConfig(4, r=2.0), TypeError, r"r must be an int"),
    bad(
        "DePTConfig/negative_m",
        lambda _: dk.DePTConfig(-1, r=2),
        ValueError,
        r"num_virtual_tokens must be >= 0, got -1",
    ),
    bad(
        "DePTConfig/max_length_0",
        lambda _: dk.DePTConfig(4, r=2, max_length=0),
        ValueError,
        r"max_length must be >= 1, got 0",
    ),
    bad(
        "DePTConfig/lora_alpha_str",
        lambda _: dk.DePTConfig(4, r=2, lora_alpha="8"),
        TypeError,
        r"lora_alpha must be a number, got str",
    ),
    bad(
        "DePTConfig/lora_alpha_nan",
        lambda _: dk.DePTConfig(4, r=2, lora_alpha=float("nan")),
        ValueError,
        r"lora_alpha must be finite, got nan",
    ),
    bad(
        "DePTConfig/lora_alpha_inf",
        lambda _: dk.DePTConfig(4, r=2, lora_alpha=float("inf")),
        ValueError,
        r"lora_alpha must be finite, got inf",
    ),
    bad(
        "DePTConfig/unknown_index",
        lambda _: dk.DePTConfig(4, r=2, index="row"),
        ValueError,
        r"index must be one of",
    ),
    bad(
        "DePTConfig/unknown_prompt_init",
        lambda _: dk.DePTConfig(4, r=2, prompt_init="zeros"),
        ValueError,
        r"prompt_init must be one of .*got 'zeros'",
    ),
    bad(
        "DePTConfig/text_init_without_text",
        lambda _: dk.DePTConfig(4, r=2, prompt_init="text"),
        ValueError,
        r"prompt_init='text' needs init_text",
    ),
    bad(
        "DePTConfig/init_text_an_int",
        lambda _: dk.DePTConfig(4, r=2, prompt_init="text", init_text=5),
        TypeError,
        r"init_text must be a sequence of int token ids .*got int",
    ),
    bad(
        "DePTConfig/init_text_a_str",
        lambda _: dk.DePTConfig(4, r=2, prompt_init="text", init_text="Classify:"),
        TypeError,
        r"init_text must be a sequence of int token ids \(tokenize the text first\), got str",
    ),
    bad(
        "DePTConfig/init_text_negative",
        lambda _: dk.DePTConfig(4, r=2, prompt_init="text", init_text=(3, -1)),
        ValueError,
        r"init_text holds negative token ids \[-1\]",
    ),
    bad(
        "DePTConfig/init_text_with_random_init",
        lambda _: dk.DePTConfig(4, r=2, init_text=(3,)),
        ValueError,
        r"init_text is only used with prompt_init='text'",
    ),
    bad(
        "PromptTuningConfig/zero_tokens",
        lambda _: dk.PromptTuningConfig(0),
        ValueError,
        r"num_virtual_tokens must be >= 1, got 0",
    ),
    bad(
        "PromptTuningConfig/bool_tokens",
        lambda _: dk.PromptTuningConfig(True),
        TypeError,
        r"num_virtual_tokens must be an int, got bool",
    ),
    bad(
        "PromptTuningConfig/init_text_float",
        lambda _: dk.PromptTuningConfig(2, prompt_init="text", init_text=(1.0,)),
        TypeError,
        r"init_text must hold int token ids",
    ),
    bad(
        "EPTConfig/zero_tokens",
        lambda _: dk.EPTConfig(0),
        ValueError,
        r"num_virtual_tokens must be >= 1",
    ),
    bad("EPTConfig/hidden_0", lambda _: dk.EPTConfig(1, hidden=0), ValueError, r"hidden must be"),
    bad(
        "EPTConfig/residual_int",
        lambda _: dk.EPTConfig(1, residual=1),
        TypeError,
        r"residual must be a bool, got int",
    ),
    bad(
        "AoTConfig/unknown_reparam",
        lambda _: dk.AoTConfig("lora", r=2),
        ValueError,
        r"reparam must be one of \('fc', 'kron'\), got 'lora'",
    ),
    bad("AoTConfig/r_0", lambda _: dk.AoTConfig("fc", r=0), ValueError, r"r must be >= 1, got 0"),
    bad(
        "AoTConfig/dropout_one",
        lambda _: dk.AoTConfig("fc", r=2, dropout=1.0),
        ValueError,
        r"dropout must lie in \[0, 1\), got 1\.0",
    ),
    bad(
        "AoTConfig/negative_dropout",
        lambda _: dk.AoTConfig("fc", r=2, dropout=-0.1),
        ValueError,
        r"dropout must lie in \[0, 1\)",
    ),
    bad(
        "AoTConfig/nan_dropout",
        lambda _: dk.AoTConfig("fc", r=2, dropout=float("nan")),
        ValueError,
        r"dropout must lie in \[0, 1\), got nan",
    ),
    bad(
        "AoTConfig/str_dropout",
        lambda _: dk.AoTConfig("fc", r=2, dropout="0.1"),
        TypeError,
        r"dropout must be a number, got str",
    ),
    bad(
        "AoTConfig/unknown_activation",
        lambda _: dk.AoTConfig("fc", r=2, activation="x"),
        ValueError,
        r"activation must be one of",
    ),
    bad(
        "AoTConfig/a_without_b",
        lambda _: dk.AoTConfig("kron", r=2, a=3),
        ValueError,
        r"give both Kronecker heights a and b",
    ),
    bad(
        "AoTConfig/heights_with_fc",
        lambda _: dk.AoTConfig("fc", r=2, a=3, b=3),
        ValueError,
        r"reparam='fc' takes neither",
    ),
    bad(
        "equal_budget/both_given",
        lambda _: dk.equal_budget(100, 768, 256, num_virtual_tokens=40, r=45),
        ValueError,
        r"give exactly one of num_virtual_tokens or r",
    ),
    bad(
        "equal_budget/m_over_l",
        lambda _: dk.equal_budget(100, 768, 256, num_virtual_tokens=101),
        ValueError,
        r"num_virtual_tokens=101 exceeds prompt_length=100",
    ),
    bad(
        "equal_budget/r_over_budget",
        lambda _: dk.equal_budget(100, 768, 256, r=100),
        ValueError,
        r"r=100 alone needs 102400 parameters, over the budget 76800",
    ),
    bad(
        "equal_budget/zero_length",
        lambda _: dk.equal_budget(0, 768, 256, r=1),
        ValueError,
        r"prompt_length must be >= 1",
    ),
]


def bert(cls=transformers.BertModel) -> torch.nn.Module:
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32,
    )  # fmt: skip
    return cls(config).eval()


def deberta_v2(**changes) -> torch.nn.Module:
    return aot.tiny_model("deberta-v2", **changes)


def encoder_prompt_model(arch: str = "roberta") -> torch.nn.Module:
    return dk.patch(aot.tiny_model(arch), make_config("dept"))


def patched_twice(_):
    model = prompt_model()
    dk.patch(model, make_config("pt"))


def fused_twice(_):
    dk.fuse(aot_model(fused=True))


def replace_into(_, adapter_of: Callable):
    model = prompt_model()
    replace_adapter(model, adapter_of())
    return forward(model, tokens())


PATCH_CASES = [
    bad("patch/twice", patched_twice, ValueError, r"GPT2LMHeadModel is already patched"),
    bad(
        "patch/unsupported_model",
        lambda _: dk.patch(torch.nn.Linear(2, 2), make_config("pt")),
        TypeError,
        r"unsupported model Linear \(model_type=None\)",
    ),
    bad(
        "patch/bert_masked_lm_with_a_prompt_method",
        lambda _: dk.patch(bert(transformers.BertForMaskedLM), make_config("dept")),
        TypeError,
        r"prompt methods on BERT cover BertModel and BertForSequenceClassification, got "
        r"BertForMaskedLM",
    ),
    bad(
        "patch/deberta_v2_multiple_choice_with_a_prompt_method",
        lambda _: dk.patch(
            deberta_v2(cls=transformers.DebertaV2ForMultipleChoice), make_config("pt")
        ),
        TypeError,
        r"prompt methods on DeBERTa-v2 cover DebertaV2Model and "
        r"DebertaV2ForSequenceClassification, got DebertaV2ForMultipleChoice",
    ),
    bad(
        "patch/roberta_past_its_position_table",
        lambda _: forward(encoder_prompt_model(), tokens(s=59)),
        ValueError,
        r"need 63 positions, but RoBERTa's position table \(config.max_position_embeddings\) "
        r"has 62 \(its first 2 rows precede position 0\)",
    ),
    bad(
        "patch/bert_prompt_inputs_embeds_only",
        lambda _: encoder_prompt_model("bert")(inputs_embeds=torch.zeros(1, 3, 32)),
        ValueError,
        r"the patched BertModel needs input_ids",
    ),
    bad(
        "patch/bert_prompt_position_ids",
        lambda _: forward(
            encoder_prompt_model("bert"), tokens(), position_ids=torch.arange(5).expand(2, 5)
        ),
        ValueError,
        r"position_ids are not supported by the patched BertModel",
    ),
    bad(
        "patch/config_a_dict",
        lambda _: dk.patch(gpt2(), {"num_virtual_tokens": 4}),
        TypeError,
        r"config must be one of .*got dict",
    ),
    bad(
        "patch/no_config_on_a_plain_model",
        lambda _: dk.patch(gpt2()),
        TypeError,
        r"needs a config",
    ),
    bad(
        "patch/init_text_outside_vocabulary",
        lambda _: dk.patch(
            gpt2(), dk.PromptTuningConfig(2, prompt_init="text", init_text=(VOCAB,))
        ),
        ValueError,
        r"init_text ids \[128\] are outside the vocabulary \[0, 128\)",
    ),
    bad(
        "patch/kron_heights_under_vocabulary",
        lambda _: dk.patch(gpt2(), dk.AoTConfig("kron", r=2, a=2, b=8)),
        ValueError,
        r"a\*b=16 ids, fewer than the vocabulary V=128",
    ),
    bad("unpatch/unpatched", lambda _: dk.unpatch(gpt2()), ValueError, r"is not patched"),
    bad("adapter/unpatched", lambda _: dk.adapter(gpt2()), ValueError, r"is not patched"),
    bad(
        "param_groups/unpatched",
        lambda _: dk.param_groups(gpt2(), 0.3, 1e-4),
        ValueError,
        r"is not patched",
    ),
    bad(
        "param_groups/ept_without_lowrank_lr",
        lambda _: dk.param_groups(dk.patch(gpt2(), dk.EPTConfig(2)), 0.3),
        ValueError,
        r"EPTAdapter has parameters that need lowrank_lr \(the method has no default",
    ),
    bad(
        "param_groups/unknown_group",
        lambda _: dk.param_groups(prompt_model(), promt_lr=0.3),
        TypeError,
        r"unknown arguments \['promt_lr'\]; group rates are lowrank_lr, prompt_lr",
    ),
    bad(
        "param_groups/fused_aot",
        lambda _: dk.param_groups(aot_model(fused=True), lowrank_lr=1e-3),
        RuntimeError,
        r"a fused AoT adapter has no trainable parameters",
    ),
    bad(
        "fold/not_ept",
        lambda _: dk.fold(prompt_model()),
        TypeError,
        r"DePTAdapter has nothing to fold",
    ),
    bad("merge/unpatched", lambda _: dk.merge(gpt2()), ValueError, r"is not patched"),
    bad(
        "merge/int_dtype",
        lambda _: dk.merge(aot_model(), dtype=torch.int64),
        TypeError,
        r"table must be float32, float16 or bfloat16, got torch\.int64",
    ),
    bad("fuse/not_aot", lambda _: dk.fuse(prompt_model()), TypeError, r"fuse materialises AoT"),
    bad("fuse/twice", fused_twice, ValueError, r"the adapter is already fused"),
    bad(
        "fuse/int_dtype",
        lambda _: dk.fuse(aot_model(), dtype=torch.int64),
        TypeError,
        r"table must be float32, float16 or bfloat16, got torch\.int64",
    ),
    bad(
        "attach_adapter/already_patched",
        lambda _: attach_adapter(prompt_model(), new_adapter(gpt2(), make_config("pt"))),
        ValueError,
        r"already has an attribute 'dept_adapter'",
    ),
    bad(
        "attach_adapter/not_an_adapter",
        lambda _: attach_adapter(gpt2(), None),
        TypeError,
        r"adapter",
    ),
    bad(
        "replace_adapter/unpatched",
        lambda _: replace_adapter(gpt2(), new_adapter(gpt2(), make_config("pt"))),
        ValueError,
        r"is not patched",
    ),
    bad(
        "replace_adapter/other_family",
        lambda tmp: replace_into(tmp, lambda: new_adapter(gpt2(), dk.AoTConfig("fc", r=2))),
        (TypeError, ValueError),
        r"AoTAdapter",
    ),
]

# --------------------------------------------------------------------------- stack_adapters


def dept_variant(**change):
    return dk.patch(gpt2(), dataclasses.replace(make_config("dept"), **change))


STACK_CASES = [
    bad("stack/nothing", lambda _: dk.stack_adapters([]), ValueError, r"at least one"),
    bad(
        "stack/a_single_path",
        lambda tmp: dk.stack_adapters(str(tmp), model=gpt2()),
        TypeError,
        r"sources must be a sequence of models or adapter directories, got the single path",
    ),
    bad(
        "stack/an_int_source",
        lambda _: dk.stack_adapters([prompt_model(), 3]),
        TypeError,
        r"source 1 is a int; sources are patched models or adapter directories",
    ),
    bad(
        "stack/unpatched_source",
        lambda _: dk.stack_adapters([gpt2()]),
        ValueError,
        r"GPT2LMHeadModel is not patched",
    ),
    bad(
        "stack/directory_not_found",
        lambda tmp: dk.stack_adapters([tmp / "missing"], model=gpt2()),
        FileNotFoundError,
        r"no adapter config at .*missing",
    ),
    bad(
        "stack/directories_without_model",
        lambda tmp: dk.stack_adapters([save(tmp, prompt_model())]),
        ValueError,
        r"pass model=",
    ),
    bad(
        "stack/two_methods",
        lambda _: dk.stack_adapters([prompt_model(), prompt_model(method="pt")]),
        ValueError,
        r"stack_adapters needs adapters of one method",
    ),
    bad(
        "stack/other_base_weights",
        lambda _: dk.stack_adapters(
            [prompt_model(), dk.patch(tiny_model("gpt2", seed=1), make_config("dept", 8))]
        ),
        ValueError,
        r"source 1's base weight 'transformer\.wte\.weight' differs",
    ),
    bad(
        "stack/other_architecture",
        lambda _: dk.stack_adapters([prompt_model("gpt2"), prompt_model("llama")]),
        ValueError,
        r"source 1 is a LlamaForCausalLM with different weights",
    ),
    *(
        bad(
            f"stack/dept_{name}_differs",
            lambda _, change=change: dk.stack_adapters([dept_variant(), dept_variant(**change)]),
            ValueError,
            rf"adapter 1 has {name}=",
        )
        for name, change in (
            ("r", {"r": 2}),
            ("max_length", {"max_length": 32}),
            ("num_virtual_tokens", {"num_virtual_tokens": 2}),
            ("index", {"index": "token"}),
        )
    ),
    bad(
        "stack/prompt_lengths_differ",
        lambda _: dk.stack_adapters(
            [prompt_model(method="pt"), dk.patch(gpt2(), dk.PromptTuningConfig(2))]
        ),
        ValueError,
        r"adapter 1 has num_virtual_tokens=2, adapter 0 has 5: stacked prompts share one length",
    ),
    bad(
        "AoTAdapter.stack/not_fused",
        lambda _: AoTAdapter.stack([aot_model(fused=True).dept_adapter, aot_model().dept_adapter]),
        ValueError,
        r"adapter 1 is not fused",
    ),
    bad(
        "stack/aot_reparams_differ",
        lambda _: dk.stack_adapters([aot_model(fused=True), aot_model("fc", fused=True)]),
        ValueError,
        r"adapter 1 uses reparam='fc', adapter 0 uses 'kron'",
    ),
    bad(
        "stack/aot_layers_differ",
        lambda _: AoTAdapter.stack(
            [
                aot_model(fused=True).dept_adapter,
                aot_model(fused=True, model=gpt2(n_layer=3)).dept_adapter,
            ]
        ),
        ValueError,
        r"adapter 1 has 3 layers, adapter 0 has 2",
    ),
    bad(
        "stack/aot_vocabularies_differ",
        lambda _: AoTAdapter.stack(
            [
                aot_model(fused=True).dept_adapter,
                aot_model(fused=True, model=gpt2(vocab_size=VOCAB + 1)).dept_adapter,
            ]
        ),
        ValueError,
        r"adapter 1 has \(V, d\) = \(129, 32\), adapter 0 has \(128, 32\)",
    ),
    bad(
        "stack/prompt_directory_onto_aot_model",
        lambda tmp: dk.stack_adapters([save(tmp, prompt_model(method="pt"))], model=aot_model()),
        ValueError,
        r"model is patched with a AoTAdapter; the stacked adapter is a PromptTuningAdapter",
    ),
    bad(
        "stack/aot_directory_onto_wider_model",
        lambda tmp: dk.stack_adapters([save(tmp, aot_model(fused=True))], model=gpt2(n_embd=48)),
        ValueError,
        r"layers\.0\.table has shape \(128, 32\) but the adapter expects \(128, 48\)",
    ),
    bad(
        "DePTAdapter.stack/nothing",
        lambda _: DePTAdapter.stack([]),
        ValueError,
        r"DePTAdapter\.stack needs at least one adapter",
    ),
    bad(
        "PromptTuningAdapter.stack/other_kind",
        lambda _: PromptTuningAdapter.stack(
            [prompt_model(method="pt").dept_adapter, prompt_model().dept_adapter]
        ),
        TypeError,
        r"adapter 1 is a DePTAdapter; PromptTuningAdapter\.stack stacks PromptTuningAdapters",
    ),
    bad(
        "AoTAdapter.stack/nothing",
        lambda _: AoTAdapter.stack([]),
        ValueError,
        r"at least one adapter",
    ),
    bad(
        "AoTAdapter.stack/other_kind",
        lambda _: AoTAdapter.stack([prompt_model().dept_adapter]),
        TypeError,
        r"adapter 0 is a DePTAdapter",
    ),
]

# --------------------------------------------------------------------------- adapter files


def save(tmp: Path, model, name: str = "adapter") -> Path:
    directory = tmp / name
    dk.save_adapter(model, directory)
    return directory


def edited(tmp: Path, model=None, config=None, weights=None) -> Path:
    """A saved adapter (of `model`, by default a DePT GPT-2) with its config JSON replaced by
    `config(fields)` (a dict, or raw text) and its safetensors file rewritten by
    `weights(path)`."""
    directory = save(tmp, prompt_model() if model is None else model)
    if config is not None:
        path = directory / CONFIG
        new = config(json.loads(path.read_text()))
        path.write_text(new if isinstance(new, str) else json.dumps(new))
    if weights is not None:
        weights(directory / WEIGHTS)
    return directory


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def random_bytes(path: Path) -> None:
    path.write_bytes(os.urandom(256))


def retensor(fn: Callable) -> Callable[[Path], None]:
    """Rewrite every tensor of a safetensors file through `fn`."""

    def edit(path: Path) -> None:
        save_file({k: fn(t) for k, t in load_file(str(path)).items()}, str(path))

    return edit


def load(directory: Path, model=None):
    return dk.load_adapter(gpt2() if model is None else model, directory)


def without(key: str) -> Callable[[dict], dict]:
    return lambda fields: {k: v for k, v in fields.items() if k != key}


def setting(**values) -> Callable[[dict], dict]:
    return lambda fields: {**fields, **values}


AOT_FIELDS = {"method": "aot", "reparam": "kron", "r": 3, "fused": False, "num_tasks": None}

FILE_CASES = [
    bad("save/unpatched", lambda tmp: save(tmp, gpt2()), ValueError, r"is not patched"),
    bad(
        "load/no_directory",
        lambda tmp: load(tmp / "missing"),
        FileNotFoundError,
        r"no adapter config at .*missing",
    ),
    bad(
        "load/no_weights",
        lambda tmp: load(edited(tmp, weights=Path.unlink)),
        FileNotFoundError,
        r"no adapter weights at .*adapter_model\.safetensors",
    ),
    *(
        bad(
            f"load/{name}_weights",
            lambda tmp, edit=edit: load(edited(tmp, weights=edit)),
            ValueError,
            r"adapter_model\.safetensors is not a readable safetensors file",
        )
        for name, edit in (
            ("truncated", truncate),
            ("random", random_bytes),
            ("empty", lambda path: path.write_bytes(b"")),
        )
    ),
    bad(
        "load/int_weights",
        lambda tmp: load(edited(tmp, weights=retensor(lambda t: t.long()))),
        ValueError,
        r"'lora_a' has dtype torch\.int64; adapter parameters are floating point",
    ),
    bad(
        "load/nan_weights",
        lambda tmp: load(edited(tmp, weights=retensor(lambda t: t * float("nan")))),
        ValueError,
        r"'lora_a' holds non-finite values",
    ),
    bad(
        "load/json_garbage",
        lambda tmp: load(edited(tmp, config=lambda _: "{not json")),
        ValueError,
        r"adapter_config\.json is not valid JSON",
    ),
    bad(
        "load/json_list",
        lambda tmp: load(edited(tmp, config=lambda _: [1, 2])),
        ValueError,
        r"adapter_config\.json must hold a JSON object, got a list",
    ),
    bad(
        "load/no_method",
        lambda tmp: load(edited(tmp, config=without("method"))),
        ValueError,
        r"method must be one of \['aot', 'dept', 'ept', 'prompt_tuning'\], got None",
    ),
    bad(
        "load/unknown_method",
        lambda tmp: load(edited(tmp, config=setting(method="lora"))),
        ValueError,
        r"method must be one of .*got 'lora'",
    ),
    bad(
        "load/missing_field",
        lambda tmp: load(edited(tmp, config=without("r"))),
        ValueError,
        r"adapter_config\.json: bad dept config: .*'r'",
    ),
    bad(
        "load/unknown_field",
        lambda tmp: load(edited(tmp, config=setting(rank=3))),
        ValueError,
        r"bad dept config: .*'rank'",
    ),
    bad(
        "load/negative_r",
        lambda tmp: load(edited(tmp, config=setting(r=-1))),
        ValueError,
        r"adapter_config\.json: bad dept config: r must be >= 0, got -1",
    ),
    bad(
        "load/r_a_string",
        lambda tmp: load(edited(tmp, config=setting(r="3"))),
        ValueError,
        r"bad dept config: r must be an int, got str",
    ),
    *(
        bad(
            f"load/num_tasks_{value!r}",
            lambda tmp, value=value: load(edited(tmp, config=setting(num_tasks=value))),
            ValueError,
            r"num_tasks must be null or an int >= 1, got",
        )
        for value in (0, "2", True)
    ),
    bad(
        "load/num_tasks_without_stacked_weights",
        lambda tmp: load(edited(tmp, config=setting(num_tasks=2))),
        ValueError,
        r"lora_a has shape \(8, 3\) but the adapter expects \(2, 8, 3\)",
    ),
    bad(
        "load/file_of_another_method",
        lambda tmp: load(
            edited(tmp, config=lambda _: {"method": "prompt_tuning", "num_virtual_tokens": 4})
        ),
        ValueError,
        r"holds \['lora_a', 'lora_b', 'prompt'\], the prompt_tuning adapter needs \['prompt'\]",
    ),
    bad(
        "load/prompt_file_as_aot",
        lambda tmp: load(edited(tmp, config=lambda _: AOT_FIELDS)),
        ValueError,
        r"the aot adapter needs \['layers\.0\.w_l'",
    ),
    bad(
        "load/fused_a_string",
        lambda tmp: load(edited(tmp, aot_model(fused=True), config=setting(fused="false"))),
        ValueError,
        r"fused must be true or false, got 'false'",
    ),
    bad(
        "load/vocab_size_a_string",
        lambda tmp: load(edited(tmp, aot_model(), config=setting(vocab_size="128"))),
        ValueError,
        r"vocab_size must be an int >= 1, got '128'",
    ),
    bad(
        "load/wider_model",
        lambda tmp: load(edited(tmp), gpt2(n_embd=48)),
        ValueError,
        r"lora_b has shape \(3, 32\) but the adapter expects \(3, 48\)",
    ),
    bad(
        "load/token_mode_other_vocabulary",
        lambda tmp: load(
            edited(tmp, dk.patch(gpt2(), dk.DePTConfig(4, r=2, index="token"))),
            gpt2(vocab_size=VOCAB + 1),
        ),
        ValueError,
        r"lora_a has shape \(128, 2\) but the adapter expects \(129, 2\)",
    ),
    bad(
        "load/model_patched_with_another_config",
        lambda tmp: load(edited(tmp), dk.patch(gpt2(), dk.DePTConfig(4, r=2))),
        ValueError,
        r"the model is patched with DePTConfig\(.*r=2.*the checkpoint needs",
    ),
    bad(
        "load/fused_file_onto_unfused_model",
        lambda tmp: load(edited(tmp, aot_model(fused=True)), aot_model()),
        ValueError,
        r"has fused=true but the model's adapter has fused=false; call dept_kernels\.unpatch",
    ),
    bad(
        "load/aot_more_layers",
        lambda tmp: load(edited(tmp, aot_model()), gpt2(n_layer=3)),
        ValueError,
        r"the aot adapter needs \[.*'layers\.2\.w_l'",
    ),
    bad(
        "load/aot_deberta_v2_more_layers",
        lambda tmp: load(
            edited(tmp, aot_model(model=deberta_v2())), deberta_v2(num_hidden_layers=3)
        ),
        ValueError,
        r"the aot adapter needs \[.*'layers\.2\.w_l'",
    ),
    bad(
        "load/fused_aot_more_layers",
        lambda tmp: load(edited(tmp, aot_model(fused=True)), gpt2(n_layer=3)),
        ValueError,
        r"the aot adapter needs \[.*'layers\.2\.table'\]",
    ),
    bad(
        # V = 128 and 129 give the same Kronecker heights (11 x 12): only V tells them apart.
        "load/aot_other_vocabulary",
        lambda tmp: load(edited(tmp, aot_model()), gpt2(vocab_size=VOCAB + 1)),
        ValueError,
        r"saved for a vocabulary of V=128, the model's has V=129",
    ),
    bad(
        "load/fused_aot_other_vocabulary",
        lambda tmp: load(edited(tmp, aot_model(fused=True)), gpt2(vocab_size=VOCAB + 1)),
        ValueError,
        r"V=128, the model's has V=129",
    ),
    bad(
        "load/fused_aot_wider_model",
        lambda tmp: load(
            edited(tmp, aot_model(fused=True), config=without("vocab_size")), gpt2(n_embd=48)
        ),
        ValueError,
        r"layers\.0\.table has shape \(128, 32\) but the adapter expects \(128, 48\)",
    ),
    bad(
        "load/fused_aot_num_tasks_without_stacked_tables",
        lambda tmp: load(edited(tmp, aot_model(fused=True), config=setting(num_tasks=2))),
        ValueError,
        r"layers\.0\.table has shape \(128, 32\) but the adapter expects \(2, 128, 32\), "
        r"from adapter_config\.json",
    ),
    bad(
        "load/fused_aot_int_tables",
        lambda tmp: load(edited(tmp, aot_model(fused=True), weights=retensor(torch.Tensor.long))),
        ValueError,
        r"'layers\.0\.table' has dtype torch\.int64",
    ),
]

# --------------------------------------------------------------------------- official DePT files


def t5_768(**change) -> transformers.T5ForConditionalGeneration:
    """A T5 as wide as the official checkpoint's t5-base (d=768), tiny everywhere else: the
    DePT adapter does not depend on the vocabulary size."""
    torch.manual_seed(0)
    config = transformers.T5Config(
        vocab_size=64, d_model=768, d_kv=8, num_heads=2, d_ff=16, num_layers=1,
        num_decoder_layers=1, decoder_start_token_id=0, **change,
    )  # fmt: skip
    return transformers.T5ForConditionalGeneration(config).eval()


def official(tmp: Path, config=None, state=None, raw: bytes | None = None, model=None):
    """Load a copy of the official checkpoint whose config went through `config(fields)`,
    whose state dict went through `state(tensors)`, or whose .bin is `raw` bytes."""
    directory = tmp / "official"
    shutil.copytree(OFFICIAL, directory)
    if config is not None:
        path = directory / CONFIG
        new = config(json.loads(path.read_text()))
        path.write_text(new if isinstance(new, str) else json.dumps(new))
    weights = directory / "adapter_model.bin"
    if raw is not None:
        weights.write_bytes(raw)
    if state is not None:
        tensors = torch.load(weights, map_location="cpu", weights_only=True)
        new = state(tensors)
        if new is None:
            weights.unlink()
        else:
            torch.save(new, weights)
    return dk.load_dept_checkpoint(t5_768() if model is None else model, directory)


def replace(key: str, fn: Callable) -> Callable[[dict], dict]:
    return lambda tensors: {**tensors, key: fn(tensors[key])}


A_KEY, B_KEY = "prompt_encoder.lora_embedding_A", "prompt_encoder.lora_embedding_B"

OFFICIAL_CASES = [
    bad(
        "official_file/peft_type",
        lambda tmp: official(tmp, config=setting(peft_type="LORA")),
        ValueError,
        r"peft_type must be 'PROMPT_TUNING_LORA' \(official DePT\), got 'LORA'",
    ),
    bad(
        "official_file/missing_field",
        lambda tmp: official(tmp, config=without("max_length")),
        ValueError,
        r"adapter_config\.json lacks \['max_length'\]",
    ),
    bad(
        "official_file/r_a_string",
        lambda tmp: official(tmp, config=setting(r="15")),
        ValueError,
        r"adapter_config\.json: bad DePT config: r must be an int, got str",
    ),
    bad(
        "official_file/negative_r",
        lambda tmp: official(tmp, config=setting(r=-1)),
        ValueError,
        r"bad DePT config: r must be >= 0",
    ),
    bad(
        "official_file/token_dim_a_string",
        lambda tmp: official(tmp, config=setting(token_dim="768")),
        ValueError,
        r"token_dim must be an int >= 1, got '768'",
    ),
    bad(
        "official_file/narrower_model",
        lambda tmp: official(tmp, model=tiny_model("t5")),
        ValueError,
        r"checkpoint token_dim=768 does not match the model's embedding dim d=32",
    ),
    bad(
        "official_file/decoder_prompts",
        lambda tmp: official(tmp, config=setting(num_transformer_submodules=3)),
        ValueError,
        r"num_transformer_submodules=3; the official code saves 1 or 2",
    ),
    bad(
        "official_file/json_garbage",
        lambda tmp: official(tmp, config=lambda _: "{bad"),
        ValueError,
        r"adapter_config\.json is not valid JSON",
    ),
    bad(
        "official_file/json_list",
        lambda tmp: official(tmp, config=lambda _: [1]),
        ValueError,
        r"must hold a JSON object, got a list",
    ),
    bad(
        "official_file/no_bin",
        lambda tmp: official(tmp, state=lambda _: None),
        FileNotFoundError,
        r"no adapter_model\.bin at",
    ),
    *(
        bad(
            f"official_file/{name}_bin",
            lambda tmp, raw=raw: official(
                tmp, raw=raw(OFFICIAL.joinpath("adapter_model.bin").read_bytes())
            ),
            ValueError,
            r"adapter_model\.bin is not a readable torch checkpoint",
        )
        for name, raw in (
            ("truncated", lambda data: data[: len(data) // 2]),
            ("random", lambda _: os.urandom(1000)),
            ("empty", lambda _: b""),
        )
    ),
    bad(
        "official_file/not_a_dict",
        lambda tmp: official(tmp, state=lambda _: torch.zeros(3)),
        ValueError,
        r"must hold a dict of named tensors, got Tensor",
    ),
    bad(
        "official_file/not_a_tensor",
        lambda tmp: official(tmp, state=lambda t: {**t, "prompt_embeddings": [1.0]}),
        ValueError,
        r"'prompt_embeddings' is a list, not a tensor",
    ),
    bad(
        "official_file/int_prompt",
        lambda tmp: official(tmp, state=replace("prompt_embeddings", torch.Tensor.long)),
        ValueError,
        r"'prompt_embeddings' has dtype torch\.int64",
    ),
    bad(
        "official_file/nan_lora_b",
        lambda tmp: official(tmp, state=replace(B_KEY, lambda b: b * float("nan"))),
        ValueError,
        r"'prompt_encoder\.lora_embedding_B' holds non-finite values",
    ),
    bad(
        "official_file/no_prompt",
        lambda tmp: official(tmp, state=lambda t: {A_KEY: t[A_KEY], B_KEY: t[B_KEY]}),
        ValueError,
        r"has no 'prompt_embeddings'",
    ),
    bad(
        "official_file/b_without_a",
        lambda tmp: official(tmp, state=lambda t: {k: v for k, v in t.items() if k != A_KEY}),
        ValueError,
        r"holds lora_embedding_B but no lora_embedding_A",
    ),
    bad(
        "official_file/two_a",
        lambda tmp: official(tmp, state=lambda t: {**t, "x.lora_embedding_A": t[A_KEY]}),
        ValueError,
        r"several tensors end with 'lora_embedding_A'",
    ),
    bad(
        "official_file/fewer_virtual_tokens_than_saved",
        lambda tmp: official(tmp, config=setting(num_virtual_tokens=40)),
        ValueError,
        r"prompt_embeddings has shape \(80, 768\) but .* needs \(40, 768\)",
    ),
    bad(
        "official_file/more_virtual_tokens_than_saved",
        lambda tmp: official(tmp, config=setting(num_virtual_tokens=100)),
        ValueError,
        r"prompt_embeddings has shape \(80, 768\) but .* needs \(100, 768\)",
    ),
    bad(
        "official_file/max_length",
        lambda tmp: official(tmp, config=setting(max_length=128)),
        ValueError,
        r"lora_embedding_A has shape \(256, 15\) but .* needs \(128, 15\)",
    ),
    bad(
        "official_file/rank",
        lambda tmp: official(tmp, config=setting(r=16)),
        ValueError,
        r"lora_embedding_A has shape \(256, 15\) but .* needs \(256, 16\)",
    ),
    bad(
        "official_file/model_patched_with_another_config",
        lambda tmp: official(tmp, model=dk.patch(t5_768(), dk.DePTConfig(8, r=2))),
        ValueError,
        r"the model is patched with",
    ),
]

# --------------------------------------------------------------------------- visual rows


def visual(b: int = 2, n_v: int = 3, d: int = 32, dtype=torch.float32) -> torch.Tensor:
    """Visual rows (B, n_v, d) for the tiny T5 (d = 32) and `tokens()` (B = 2)."""
    return torch.randn(b, n_v, d, generator=torch.Generator().manual_seed(n_v)).to(dtype)


def t5_encoder_model():
    return dk.patch(tiny_model("t5", transformers.T5EncoderModel), make_config("dept"))


VISUAL_CASES = [
    *(
        bad(
            f"visual/{call}/batch",
            lambda _, run=run: run(prompt_model("t5"), tokens(), visual_embeds=visual(b=3)),
            ValueError,
            r"visual_embeds has 3 samples but input_ids has 2",
        )
        for call, run in (("forward", forward), ("generate", generate))
    ),
    *(
        bad(
            f"visual/{call}/width",
            lambda _, run=run: run(prompt_model("t5"), tokens(), visual_embeds=visual(d=33)),
            ValueError,
            r"visual_embeds has width 33; the model's embeddings have d=32",
        )
        for call, run in (("forward", forward), ("generate", generate))
    ),
    *(
        bad(
            f"visual/{call}/ndim",
            lambda _, run=run: run(prompt_model("t5", "pt"), tokens(), visual_embeds=visual()[0]),
            ValueError,
            r"visual_embeds must be 3-D \(batch, n_v, d\), got shape \(3, 32\)",
        )
        for call, run in (("forward", forward), ("generate", generate))
    ),
    bad(
        "visual/encoder_model/ndim",
        lambda _: t5_encoder_model()(input_ids=tokens(), visual_embeds=visual()[None]),
        ValueError,
        r"visual_embeds must be 3-D \(batch, n_v, d\), got shape \(1, 2, 3, 32\)",
    ),
    bad(
        "visual/int_embeds",
        lambda _: forward(prompt_model("t5"), tokens(), visual_embeds=tokens(s=32)[:, None]),
        TypeError,
        r"visual_embeds must be a floating-point tensor, got torch\.int64",
    ),
    bad(
        "visual/other_device",
        lambda _: forward(prompt_model("t5", "ept"), tokens(), visual_embeds=visual().to("meta")),
        ValueError,
        r"visual_embeds is on meta but the model's embeddings are on cpu",
    ),
    *(
        bad(
            f"visual/{call}/mask_without_embeds",
            lambda _, run=run: run(
                prompt_model("t5"), tokens(), visual_attention_mask=torch.ones(2, 3)
            ),
            ValueError,
            r"visual_attention_mask was given without visual_embeds",
        )
        for call, run in (("forward", forward), ("generate", generate))
    ),
    *(
        bad(
            f"visual/{call}/mask_shape",
            lambda _, run=run: run(
                prompt_model("t5"),
                tokens(),
                visual_embeds=visual(),
                visual_attention_mask=torch.ones(2, 4),
            ),
            ValueError,
            r"visual_attention_mask must have shape \(batch, n_v\) = \(2, 3\) like "
            r"visual_embeds, got \(2, 4\)",
        )
        for call, run in (("forward", forward), ("generate", generate))
    ),
    bad(
        "visual/encoder_model/mask_shape",
        lambda _: t5_encoder_model()(
            input_ids=tokens(), visual_embeds=visual(), visual_attention_mask=torch.ones(2, 3, 1)
        ),
        ValueError,
        r"visual_attention_mask must have shape \(batch, n_v\) = \(2, 3\)",
    ),
    bad(
        "visual/text_mask_3d",
        lambda _: forward(
            prompt_model("t5"), tokens(), attention_mask=torch.ones(2, 5, 5), visual_embeds=visual()
        ),
        ValueError,
        r"attention_mask must be a 2D \(batch, seq\) padding mask, got \(2, 5, 5\)",
        kernels=True,
    ),
    bad(
        "visual/encoder_with_inputs_embeds",
        lambda _: prompt_model("t5").get_encoder()(
            inputs_embeds=visual(n_v=5), visual_embeds=visual()
        ),
        ValueError,
        r"got visual rows with inputs_embeds",
    ),
    *(
        bad(
            f"visual/decoder_{call}",
            lambda _, run=run: run(prompt_model("gpt2"), tokens(), visual_embeds=visual()),
            TypeError,
            r"(GPT2LMHeadModel|GPT2LMHeadModel\.generate) got visual_embeds / "
            r"visual_attention_mask: visual rows are supported on the patched T5 models only",
        )
        for call, run in (("forward", forward), ("generate", generate))
    ),
]

CATALOGUE = [
    *OP_CASES,
    *MODEL_CASES,
    *VISUAL_CASES,
    *TASK_CASES,
    *CONFIG_CASES,
    *PATCH_CASES,
    *STACK_CASES,
    *FILE_CASES,
    *OFFICIAL_CASES,
]


@pytest.mark.parametrize(("call", "exc", "match", "kernels"), CATALOGUE)
def test_bad_input_raises_a_clear_error(call, exc, match, kernels, tmp_path, monkeypatch):
    if not kernels:
        # The checks must run before a kernel touches memory: the kernels are cut off.
        cut_off_kernels(monkeypatch)
    with pytest.raises(exc, match=match):
        call(tmp_path)


DEPT_OP_CASES = [row for row in OP_CASES if row.id.startswith("dept/")]


def test_dept_embedding_checks_on_every_backend(backend, tmp_path, monkeypatch):
    """The `dept_embedding` rows under each backend here: its checks do not depend on the
    backend selected, and all run before that backend's kernels."""
    cut_off_kernels(monkeypatch)
    for row in DEPT_OP_CASES:
        call, exc, match, _ = row.values
        try:
            with pytest.raises(exc, match=match):
                call(tmp_path)
        except BaseException as e:
            e.add_note(f"catalogue row {row.id} on backend {backend}")
            raise


# --------------------------------------------------------------------------- valid inputs


def transposed(x: torch.Tensor) -> torch.Tensor:
    """The same values with the last two dims' strides swapped (not contiguous)."""
    return x.mT.contiguous().mT


def strided(x: torch.Tensor) -> torch.Tensor:
    """The same values with a last-dim stride of 2 (not contiguous)."""
    return torch.stack([x, torch.zeros_like(x)], dim=-1)[..., 0]


def batch_major(x: torch.Tensor) -> torch.Tensor:
    """The same (B, s, d) values laid out sequence-first (not contiguous)."""
    return x.transpose(0, 1).contiguous().transpose(0, 1)


def outputs(fn: Callable, kw: dict) -> list[torch.Tensor]:
    """`fn(**kw)` and the gradients of its float tensor arguments (zeros where unused)."""
    kw = {
        k: t.detach().requires_grad_() if isinstance(t, torch.Tensor) and t.is_floating_point()
        else t
        for k, t in kw.items()
    }  # fmt: skip
    leaves = [t for t in kw.values() if isinstance(t, torch.Tensor) and t.requires_grad]
    out = fn(**kw)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(out)
    grads = torch.autograd.grad(out, leaves, grad_out, allow_unused=True)
    zeros = [torch.zeros_like(t) if g is None else g for t, g in zip(leaves, grads, strict=True)]
    return [out, *zeros]


# (name, op, valid arguments, the arguments to make non-contiguous and how)
NON_CONTIGUOUS = [
    ("dept/ids", dept_embedding, op_args(), {"input_ids": transposed}),
    ("dept/weight", dept_embedding, op_args(), {"weight": transposed}),
    ("dept/weight_strided", dept_embedding, op_args(), {"weight": strided}),
    ("dept/prompt_strided", dept_embedding, op_args(), {"prompt": strided}),
    ("dept/lora", dept_embedding, op_args(), {"lora_a": transposed, "lora_b": strided}),
    (
        "dept/position_ids",
        dept_embedding,
        op_args(position_ids=ids([[3, 1, 0, 5], [2, 2, 4, 0]])),
        {"position_ids": transposed},
    ),
    (
        "dept/token_mode",
        dept_embedding,
        op_args(lora_a=randn(V, R), index="token"),
        {"input_ids": strided, "lora_a": transposed},
    ),
    (
        "dept/stacked",
        dept_embedding,
        stacked_args(),
        {"prompt": transposed, "lora_a": transposed, "lora_b": strided, "task_ids": strided},
    ),
    ("dept/visual_strided", dept_embedding, op_args(visual=randn(2, 3, D)), {"visual": strided}),
    (
        "dept/visual_transposed",
        dept_embedding,
        stacked_args(visual=randn(2, 3, D)),
        {"visual": transposed},
    ),
    ("aot_add/hidden", aot_bias_add, aot_args(), {"hidden": batch_major}),
    ("aot_add/ids_table", aot_bias_add, aot_args(), {"input_ids": strided, "table": transposed}),
    (
        "aot_add/stacked",
        aot_bias_add,
        task_table_args(),
        {"table": transposed, "task_ids": strided, "hidden": strided},
    ),
    (
        "aot_kron",
        aot_kron_bias,
        kron_args(),
        {"w_l": transposed, "w_m": strided, "w_r": transposed},
    ),
    (
        "aot_fc",
        aot_fc_bias,
        fc_args(),
        {"embedding": transposed, "w1": transposed, "b1": strided, "w2": strided},
    ),
]


@pytest.mark.parametrize(
    ("op", "kw", "layouts"), [pytest.param(*case[1:], id=case[0]) for case in NON_CONTIGUOUS]
)
def test_non_contiguous_inputs_give_the_contiguous_result(backend, op, kw, layouts):
    odd = {**kw, **{name: layout(kw[name]) for name, layout in layouts.items()}}
    assert not any(odd[name].is_contiguous() for name in layouts)
    (out, *grads), (want, *want_grads) = outputs(op, odd), outputs(op, kw)
    if op in (aot_kron_bias, aot_fc_bias):
        # The rows come from matmuls, which may sum strided factors in another order.
        assert_close(out, want, torch.float32)
    else:
        # A gather-add does the same arithmetic whatever the layout.
        assert torch.equal(out, want)
    # The low-rank gradients are matmuls of the strided factors: fp32 rounding apart.
    for g, w in zip(grads, want_grads, strict=True):
        assert_close(g, w, torch.float32)


# (name, op, arguments that are empty somewhere, the reference formula): the ops must return
# the empty (or prompt-only) result and zero gradients, never raise or read out of bounds.
EMPTY = [
    ("dept/batch_0", op_args(input_ids=ids([[]] * 0).reshape(0, 4))),
    ("dept/seq_0", op_args(input_ids=ids([[], []]))),
    ("dept/prompt_0", op_args(prompt=randn(0, D))),
    ("dept/no_prompt", op_args(prompt=None)),
    ("dept/rank_0", op_args(lora_a=randn(L, 0), lora_b=randn(0, D))),
    ("dept/stacked_batch_0", stacked_args(input_ids=ids([[]]).reshape(0, 4), task_ids=ids([]))),
    ("dept/stacked_seq_0", stacked_args(input_ids=ids([[], []]))),
    ("dept/visual_batch_0", op_args(input_ids=ids([]).reshape(0, 4), visual=randn(0, 3, D))),
    ("dept/visual_seq_0", op_args(input_ids=ids([[], []]), visual=randn(2, 3, D))),
    ("dept/visual_rows_0", op_args(visual=randn(2, 0, D))),
    (
        "dept/visual_alone",
        op_args(
            input_ids=ids([[], []]), prompt=None, lora_a=None, lora_b=None, visual=randn(2, 3, D)
        ),
    ),
]
AOT_EMPTY = [
    ("aot_add/batch_0", aot_args(hidden=randn(0, 4, D), input_ids=ids([]).reshape(0, 4))),
    ("aot_add/seq_0", aot_args(hidden=randn(2, 0, D), input_ids=ids([[], []]))),
    (
        "aot_add/stacked_batch_0",
        task_table_args(hidden=randn(0, 4, D), input_ids=ids([]).reshape(0, 4), task_ids=ids([])),
    ),
]


@pytest.mark.parametrize(
    ("op", "reference", "kw"),
    [pytest.param(dept_embedding, reference_dept_embedding, kw, id=n) for n, kw in EMPTY]
    + [pytest.param(aot_bias_add, reference_aot_bias_add, kw, id=n) for n, kw in AOT_EMPTY],
)
def test_empty_inputs_give_the_empty_result(backend, op, reference, kw):
    got, want = outputs(op, kw), outputs(reference, kw)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        if w.numel():  # an empty tensor compares equal to anything of its shape
            assert_close(g, w, torch.float32)


def test_empty_batch_of_the_reparameterised_aot_ops_and_the_official_formula(backend):
    hidden, no_ids = randn(0, 4, D), ids([]).reshape(0, 4)
    assert aot_kron_bias(**kron_args(hidden=hidden, input_ids=no_ids)).shape == (0, 4, D)
    assert aot_fc_bias(**fc_args(hidden=hidden, input_ids=no_ids)).shape == (0, 4, D)
    out = official_dept_embedding(**official_args(input_ids=ids([]).reshape(0, L)))
    assert out.shape == (0, M + L, D)


# Parameters need not share the table's dtype (docs/design.md §1: fp32 accumulation, output in
# the table's dtype), so these mixes are valid.
MIXED = [
    ("dept/half_lora", op_args(lora_a=randn(L, R).half(), lora_b=randn(R, D).half()), None),
    ("dept/bf16_table", op_args(weight=randn(V, D).bfloat16()), torch.bfloat16),
    ("dept/half_prompt", op_args(prompt=randn(M, D).half()), None),
]


@pytest.mark.parametrize(("kw", "dtype"), [pytest.param(kw, d, id=n) for n, kw, d in MIXED])
def test_mixed_parameter_dtypes_follow_the_table(backend, kw, dtype):
    out = dept_embedding(**kw)
    assert out.dtype == kw["weight"].dtype
    assert_close(out, reference_dept_embedding(**kw), dtype or torch.float32)


def test_a_half_table_adds_to_fp32_hidden(backend):
    kw = aot_args(table=randn(V, D).half())
    out = aot_bias_add(**kw)
    assert out.dtype == torch.float32
    assert_close(out, reference_aot_bias_add(**kw), torch.float32)


def test_empty_sequence_through_a_patched_model_is_the_prompt_alone():
    base = tiny_model("gpt2")
    model = dk.patch(copy.deepcopy(base), make_config("pt"))
    prompt = model.dept_adapter.prompt.detach()
    got = model(input_ids=tokens(s=0)).logits
    want = base(inputs_embeds=prompt.expand(2, -1, -1)).logits
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("make", [prompt_model, aot_model], ids=["dept", "aot"])
def test_non_contiguous_ids_through_a_patched_model(make):
    model = make()
    randomize(model.dept_adapter)  # a non-zero delta or bias, so the ids' rows matter
    want = forward(model, tokens()).logits
    odd = transposed(tokens())
    assert not odd.is_contiguous()
    assert torch.equal(forward(model, odd).logits, want)


def _unpatched(model) -> bool:
    return not dk.is_patched(model) and not hasattr(model, "dept_adapter")


def test_a_failed_load_leaves_the_model_unpatched(tmp_path):
    model = t5_768()
    flags = [p.requires_grad for p in model.parameters()]
    with pytest.raises(ValueError, match="lora_embedding_A has shape"):
        official(tmp_path / "a", config=setting(max_length=128), model=model)
    with pytest.raises(ValueError, match="non-finite"):
        load(edited(tmp_path / "b", weights=retensor(lambda t: t * float("nan"))), model)
    assert _unpatched(model)
    assert [p.requires_grad for p in model.parameters()] == flags
