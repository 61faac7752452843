"""Fused DePT input embedding (docs/design.md §1, DePT / PT / EPT): public API and checks.

    out[b, :m]         = P                                     (B, m + s + n_v, d)
    out[b, m + t]      = E[ids[b, t]] + scaling * (A[row(b, t)] @ B)
    out[b, m + s + j]  = V[b, j]                               (visual rows, optional)

`row(b, t)` is `t` by default, `position_ids[b, t]` when given, or `ids[b, t]` in token
mode. Prompt tuning is the case without `lora_a`/`lora_b`; EPT passes its (n, d) prompt,
possibly a stride-0 broadcast of one row. `visual` (B, n_v, d) rows (CLIP-T5's projected
image features) follow the text rows, written by the same kernel pass: no concatenation.

Multi-task batches: with `task_ids` (B,) the parameters are stacked per task, `P` (T, m, d),
`A` (T, L, r), `B` (T, r, d), and sample b uses task `k = task_ids[b]`:
`out[b, :m] = P[k]`, `out[b, m + t] = E[ids[b, t]] + scaling * (A[k, row(b, t)] @ B[k])`.
The op sorts the batch by task once (a stable argsort) and hands that order to the kernels,
which form each low-rank tile once per task present, not once per sample.

The public function validates shapes, dtypes and devices, then calls one custom op
(`dept_kernels::dept_embedding`, in `_dept_embedding_op`) registered with `torch.library`,
so `torch.compile` traces it without a graph break. The op's implementation checks id
ranges before any kernel reads memory and dispatches to the selected backend. Backward
(`_grads`) reduces the output gradient over the batch per low-rank row first (one pass, in
the backend), then forms `dA` and `dB` with two small matmuls, so no (B, s, d) tensor is
saved or created. With tasks the rows are keyed by (task, row) and the matmuls run per task.
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor

from .. import backends
from . import _validate as v
from ._dept_embedding_op import check_default_positions, dept_embedding_call

__all__ = ["INDEX_MODES", "dept_embedding"]

INDEX_MODES = ("position", "token")


def dept_embedding(
    input_ids: Tensor,
    weight: Tensor,
    prompt: Tensor | None = None,
    lora_a: Tensor | None = None,
    lora_b: Tensor | None = None,
    *,
    scaling: float = 1.0,
    position_ids: Tensor | None = None,
    index: str = "position",
    task_ids: Tensor | None = None,
    visual: Tensor | None = None,
) -> Tensor:
    """Soft prompt plus token embeddings with a low-rank positional (or token) delta.

    Args:
        input_ids: (B, s) int64 or int32 ids in [0, V).
        weight: (V, d) embedding table (fp32, fp16 or bf16); sets the output dtype.
        prompt: (m, d) soft prompt, or None for m = 0; (T, m, d) with `task_ids`. May be a
            stride-0 broadcast view.
        lora_a: (L, r) in position mode with s <= L, or (V, r) in token mode; (T, L, r) or
            (T, V, r) with `task_ids`.
        lora_b: (r, d), or (T, r, d) with `task_ids`. Both low-rank factors are given or
            both are None.
        scaling: multiplier of the low-rank delta (DePT: lora_alpha / sqrt(r)).
        position_ids: (B, s) rows of `lora_a` per token (left padding); position mode only.
        index: "position" (row = position) or "token" (row = input id).
        task_ids: (B,) int64 or int32 task of each sample, in [0, T). Every given parameter
            is then stacked per task along a leading dim T.
        visual: (B, n_v, d) rows written after the text rows, in `weight.dtype` on its
            device (any strides); n_v = 0 is the same as None. They do not depend on the
            task, and their gradient is the matching slice of the output's.

    Returns:
        (B, m + s + n_v, d) tensor of `weight.dtype`.
    """
    # Named one by one, not `locals()`: Dynamo of torch 2.11 cannot trace that builtin, and
    # `torch.compile(fullgraph=True)` of a step calling this op failed there (H200 run).
    args = {
        "input_ids": input_ids,
        "weight": weight,
        "prompt": prompt,
        "lora_a": lora_a,
        "lora_b": lora_b,
        "scaling": scaling,
        "position_ids": position_ids,
        "index": index,
        "task_ids": task_ids,
        "visual": visual,
    }
    return embed(args, ids_checked=False)


# `dept_embedding`'s defaults, for callers of `embed` that give some arguments only.
OP_DEFAULTS = {
    name: p.default
    for name, p in inspect.signature(dept_embedding).parameters.items()
    if p.default is not inspect.Parameter.empty
}


def embed(args: dict, ids_checked: bool) -> Tensor:
    """`dept_embedding(**args)` for the library's hooks: `args` holds every argument of
    `dept_embedding`; `ids_checked` says the hook's own read (the padding trim's) covered the
    op's `value_ranges` already, so the op does not read again. Not a switch of the public
    op: range checks are not optional there."""
    input_ids, weight, prompt = args["input_ids"], args["weight"], args["prompt"]
    lora_a, lora_b, scaling = args["lora_a"], args["lora_b"], args["scaling"]
    position_ids, index, task_ids = args["position_ids"], args["index"], args["task_ids"]
    visual = args["visual"]
    num_tasks = _check_args(
        input_ids, weight, prompt, lora_a, lora_b, scaling, position_ids, index, task_ids, visual
    )
    if lora_a is None:
        position_ids = None  # nothing reads rows
    if weight.stride(-1) != 1:
        # The kernels read rows with unit column stride. Not `contiguous()`: a one-column
        # table counts as contiguous whatever its last stride and would come back unchanged.
        weight = weight.clone(memory_format=torch.contiguous_format)
    backend = backends.resolve_later(weight.device)
    return dept_embedding_call(
        input_ids.contiguous(),
        weight,
        prompt,
        lora_a,
        lora_b,
        None if position_ids is None else position_ids.contiguous(),
        None if task_ids is None else task_ids.contiguous(),
        num_tasks,
        float(scaling),
        index,
        backend,
        visual,
        ids_checked,
    )


def _check_args(
    input_ids: Tensor,
    weight: Tensor,
    prompt: Tensor | None,
    lora_a: Tensor | None,
    lora_b: Tensor | None,
    scaling: float,
    position_ids: Tensor | None,
    index: str,
    task_ids: Tensor | None,
    visual: Tensor | None = None,
) -> int:
    """Static checks (shapes, dtypes, devices); returns T, or 0 without tasks."""
    if index not in INDEX_MODES:
        raise ValueError(f"index must be one of {INDEX_MODES}, got {index!r}")
    v.check_ids("input_ids", input_ids, ndim=2)
    v.check_float("weight", weight, ndim=2)
    _, d = weight.shape
    device = weight.device
    v.check_device("input_ids", input_ids, device)
    num_tasks = _check_tasks(
        task_ids, input_ids, device, {"prompt": prompt, "lora_a": lora_a, "lora_b": lora_b}
    )
    # Per-task parameters carry a leading T; every check below reads the trailing dims.
    ndim = 2 if task_ids is None else 3
    if prompt is not None:
        v.check_float("prompt", prompt, ndim=ndim)
        v.check_device("prompt", prompt, device)
        if prompt.shape[-1] != d:
            raise ValueError(
                f"prompt has width {prompt.shape[-1]} but weight has embedding dim d={d}"
            )
    v.check_scaling(scaling)
    _check_visual(visual, input_ids, weight)
    if (lora_a is None) != (lora_b is None):
        raise ValueError("lora_a and lora_b must be given together (or both None)")
    if position_ids is not None:
        if index == "token":
            raise ValueError("position_ids cannot be combined with index='token'")
        v.check_ids("position_ids", position_ids, ndim=2)
        v.check_device("position_ids", position_ids, device)
        if position_ids.shape != input_ids.shape:
            raise ValueError(
                f"position_ids shape {tuple(position_ids.shape)} must equal input_ids shape "
                f"{tuple(input_ids.shape)}"
            )
    if lora_a is None:
        return num_tasks
    v.check_float("lora_a", lora_a, ndim=ndim)
    v.check_float("lora_b", lora_b, ndim=ndim)
    v.check_device("lora_a", lora_a, device)
    v.check_device("lora_b", lora_b, device)
    if lora_a.shape[-1] != lora_b.shape[-2]:
        raise ValueError(
            f"rank mismatch: lora_a is {tuple(lora_a.shape)} (r={lora_a.shape[-1]}) but lora_b "
            f"is {tuple(lora_b.shape)} (r={lora_b.shape[-2]})"
        )
    if lora_b.shape[-1] != d:
        raise ValueError(f"lora_b has width {lora_b.shape[-1]} but weight has d={d}")
    if index == "token":
        if lora_a.shape[-2] != weight.shape[0]:
            raise ValueError(
                f"index='token' needs lora_a with one row per vocabulary entry: lora_a has "
                f"{lora_a.shape[-2]} rows, weight has V={weight.shape[0]}"
            )
    elif position_ids is None:
        check_default_positions(input_ids, lora_a)
    return num_tasks


def _check_visual(visual: Tensor | None, input_ids: Tensor, weight: Tensor) -> None:
    """`visual` is None or (B, n_v, d) in the dtype and on the device of `weight`."""
    if visual is None:
        return
    v.check_float("visual", visual, ndim=3)
    if visual.dtype != weight.dtype:
        raise TypeError(
            f"visual has dtype {visual.dtype} but weight has {weight.dtype}; they must match"
        )
    v.check_device("visual", visual, weight.device)
    batch, d = input_ids.shape[0], weight.shape[1]
    if visual.shape[0] != batch:
        raise ValueError(
            f"visual has batch size {visual.shape[0]} but input_ids has batch size {batch}"
        )
    if visual.shape[2] != d:
        raise ValueError(f"visual has width {visual.shape[2]} but weight has embedding dim d={d}")


def _check_tasks(
    task_ids: Tensor | None,
    input_ids: Tensor,
    device: torch.device,
    params: dict[str, Tensor | None],
) -> int:
    """Checks that `task_ids` and the stacking of `params` agree; returns T (0: no tasks)."""
    given = {name: x for name, x in params.items() if isinstance(x, Tensor)}
    if task_ids is None:
        for name, x in given.items():
            if x.dim() == 3:
                raise ValueError(
                    f"{name} has shape {tuple(x.shape)}: parameters stacked per task need "
                    f"task_ids (B,)"
                )
        return 0
    v.check_ids("task_ids", task_ids, ndim=1)
    v.check_device("task_ids", task_ids, device)
    if task_ids.shape[0] != input_ids.shape[0]:
        raise ValueError(
            f"task_ids has {task_ids.shape[0]} entries but input_ids has batch size "
            f"{input_ids.shape[0]}"
        )
    if not given:
        raise ValueError(
            "task_ids needs parameters stacked per task: prompt (T, m, d) and/or "
            "lora_a (T, L, r) with lora_b (T, r, d)"
        )
    for name, x in given.items():
        if x.dim() != 3:
            raise ValueError(
                f"with task_ids, {name} must be stacked per task (3-D, leading dim T), got "
                f"shape {tuple(x.shape)}"
            )
    counts = {name: x.shape[0] for name, x in given.items()}
    if len(set(counts.values())) > 1:
        found = ", ".join(f"{name} has T={count}" for name, count in counts.items())
        raise ValueError(f"task count mismatch between stacked parameters: {found}")
    return next(iter(counts.values()))
