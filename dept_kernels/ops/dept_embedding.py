"""Fused DePT input embedding (DESIGN.md §1, DePT / PT / EPT).

    out[b, :m]    = P                                          (B, m + s, d)
    out[b, m + t] = E[ids[b, t]] + scaling * (A[row(b, t)] @ B)

`row(b, t)` is `t` by default, `position_ids[b, t]` when given, or `ids[b, t]` in token
mode. Prompt tuning is the case without `lora_a`/`lora_b`; EPT passes its (n, d) prompt,
possibly a stride-0 broadcast of one row.

Multi-task batches: with `task_ids` (B,) the parameters are stacked per task, `P` (T, m, d),
`A` (T, L, r), `B` (T, r, d), and sample b uses task `k = task_ids[b]`:
`out[b, :m] = P[k]`, `out[b, m + t] = E[ids[b, t]] + scaling * (A[k, row(b, t)] @ B[k])`.
The op sorts the batch by task once (a stable argsort) and hands that order to the kernels,
which form each low-rank tile once per task present, not once per sample.

The public function validates shapes, dtypes and devices, then calls one custom op
(`dept_kernels::dept_embedding`) registered with `torch.library`, so `torch.compile`
traces it without a graph break. The op's implementation checks id ranges before any
kernel reads memory and dispatches to the selected backend. Backward reduces the output
gradient over the batch per low-rank row first (one pass, in the backend), then forms
`dA` and `dB` with two small matmuls here, so no (B, s, d) tensor is saved or created.
With tasks the rows are keyed by (task, row) and the matmuls run per task.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _backend
from . import _segments
from . import _validate as v

__all__ = ["dept_embedding", "official_dept_embedding", "reference_dept_embedding"]

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

    Returns:
        (B, m + s, d) tensor of `weight.dtype`.
    """
    num_tasks = _check_args(
        input_ids, weight, prompt, lora_a, lora_b, scaling, position_ids, index, task_ids
    )
    if lora_a is None:
        position_ids = None  # nothing reads rows
    if weight.stride(-1) != 1:
        # The kernels read rows with unit column stride. Not `contiguous()`: a one-column
        # table counts as contiguous whatever its last stride and would come back unchanged.
        weight = weight.clone(memory_format=torch.contiguous_format)
    backend = _backend.resolve_later(weight.device)
    return torch.ops.dept_kernels.dept_embedding(
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
        _check_default_positions(input_ids, lora_a)
    return num_tasks


def _check_default_positions(input_ids: Tensor, lora_a: Tensor) -> None:
    """Without position_ids token t reads row t of lora_a: s must not exceed L."""
    seq_len, max_length = input_ids.shape[1], lora_a.shape[-2]
    if seq_len > max_length:
        raise ValueError(
            f"input_ids has sequence length s={seq_len} > max_length L={max_length} "
            f"(rows of lora_a); truncate the input or raise max_length"
        )


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


def _check_values(
    input_ids: Tensor,
    weight: Tensor,
    lora_a: Tensor | None,
    position_ids: Tensor | None,
    index: str,
) -> None:
    """Range checks of every index tensor a kernel reads (reads them: a sync on GPU).

    The mode comes from the declared `index`, never from which tensors are the same object:
    one tensor passed as both input_ids and position_ids is read twice, against V and L.
    """
    v.check_range("input_ids", input_ids, weight.shape[0])
    if lora_a is None:
        return
    max_length = lora_a.shape[-2]
    if index == "token":
        # The rows are the ids, checked above; lora_a has one row per id (V = L, checked
        # with the shapes), so this holds unless the op was called around the public checks.
        if max_length < weight.shape[0]:
            v.check_range("input_ids", input_ids, max_length, hint="index='token' rows of lora_a")
    elif position_ids is not None:
        v.check_range(
            "position_ids",
            position_ids,
            max_length,
            hint=f"lora_a has max_length L={max_length} rows; truncate the input or raise "
            "max_length",
        )
    else:
        _check_default_positions(input_ids, lora_a)


def _lowrank_rows(
    input_ids: Tensor, lora_a: Tensor | None, position_ids: Tensor | None, index: str
) -> Tensor | None:
    """The rows of lora_a the tokens read: the ids in token mode, else the given positions
    (None: row t for token t)."""
    if lora_a is None:
        return None
    return input_ids if index == "token" else position_ids


# --------------------------------------------------------------------------- references


def reference_dept_embedding(
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
) -> Tensor:
    """The formula in plain differentiable PyTorch, fp32 accumulation: the test oracle.

    Every sample first gathers its own parameters (its task's with `task_ids`, else the
    shared ones), then the formula runs per sample with batched matmuls. Arguments are
    checked as `dept_embedding` checks them, so bad ones fail alike rather than as an
    indexing error deep in torch (or, for float ids, as a silent truncation).
    """
    num_tasks = _check_args(
        input_ids, weight, prompt, lora_a, lora_b, scaling, position_ids, index, task_ids
    )
    _check_values(input_ids, weight, lora_a, position_ids, index)
    if task_ids is not None:
        v.check_range("task_ids", task_ids, num_tasks)
    batch, seq_len = input_ids.shape

    def per_sample(x: Tensor) -> Tensor:
        if task_ids is None:
            return x.unsqueeze(0).expand(batch, *x.shape)
        return x[task_ids.long()]

    emb = F.embedding(input_ids.long(), weight).float()
    if lora_a is not None:
        if index == "token":
            rows = input_ids.long()
        elif position_ids is not None:
            rows = position_ids.long()
        else:
            rows = torch.arange(seq_len, device=input_ids.device).expand(batch, seq_len)
        samples = torch.arange(batch, device=input_ids.device)[:, None]
        a = per_sample(lora_a).float()[samples, rows]  # (B, s, r)
        emb = emb + scaling * (a @ per_sample(lora_b).float())
    out = emb.to(weight.dtype)
    if prompt is None:
        return out
    return torch.cat([per_sample(prompt).to(weight.dtype), out], dim=1)


def official_dept_embedding(
    input_ids: Tensor,
    weight: Tensor,
    prompt: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    *,
    scaling: float,
) -> Tensor:
    """The official DePT code's formula, kept as the baseline benchmarks beat.

    Materialises `A @ B` (L, d), repeats it over the batch, adds it to the looked-up
    embeddings and concatenates the batch-repeated prompt. Defined only for s == L, since
    the official code pads every input to max_length. Arguments are checked as
    `dept_embedding` checks them; the id range only outside `torch.compile`, where reading
    the ids would break the graph the benchmarks time.
    """
    for name, x in (("prompt", prompt), ("lora_a", lora_a), ("lora_b", lora_b)):
        if x is None:
            raise ValueError(f"the official formula needs {name}")
    _check_args(input_ids, weight, prompt, lora_a, lora_b, scaling, None, "position", None)
    batch, seq_len = input_ids.shape
    if seq_len != lora_a.shape[0]:
        raise ValueError(
            f"the official formula needs s == max_length: s={seq_len}, L={lora_a.shape[0]}"
        )
    if not torch.compiler.is_compiling():
        v.check_range("input_ids", input_ids, weight.shape[0])
    inputs_embeds = F.embedding(input_ids, weight)
    lora = (lora_a @ lora_b).repeat(batch, 1, 1)
    inputs_embeds = (inputs_embeds + scaling * lora).to(weight.dtype)
    prompts = prompt.to(weight.dtype).unsqueeze(0).repeat(batch, 1, 1)
    return torch.cat([prompts, inputs_embeds], dim=1)


# --------------------------------------------------------------------------- custom op


def _fp32_math(fn):
    """Run a custom op's body with autocast off: its math is fp32 by contract (DESIGN.md §1),
    but autocast stays on inside custom ops (and in a backward run under it), where it would
    round the low-rank products to half precision and mix dtypes in their stores."""

    @functools.wraps(fn)
    def body(*args, **kwargs):
        # Contexts only for the device types whose autocast is on (usually none).
        active = [t for t in ("cpu", "cuda") if torch.is_autocast_enabled(t)]
        if not active:
            return fn(*args, **kwargs)
        with contextlib.ExitStack() as stack:
            for device_type in active:
                stack.enter_context(torch.autocast(device_type, enabled=False))
            return fn(*args, **kwargs)

    return body


@torch.library.custom_op("dept_kernels::dept_embedding", mutates_args=())
@_fp32_math
def _dept_embedding_op(
    input_ids: Tensor,
    weight: Tensor,
    prompt: Tensor | None,
    lora_a: Tensor | None,
    lora_b: Tensor | None,
    position_ids: Tensor | None,
    task_ids: Tensor | None,
    num_tasks: int,
    scaling: float,
    index: str,
    backend: str | None,
) -> Tensor:
    _check_values(input_ids, weight, lora_a, position_ids, index)
    backend = _backend.resolved(backend, weight.device)
    rows = _lowrank_rows(input_ids, lora_a, position_ids, index)
    if lora_a is not None and lora_a.shape[-1] == 0:
        # r = 0: the delta is empty and the kernels run plain prompt tuning; the factors
        # stay inputs of the op so that backward gives them (empty) zero gradients.
        lora_a = lora_b = rows = None
    batch_order = None
    if task_ids is not None:
        v.check_range("task_ids", task_ids, num_tasks)
        if prompt is None and lora_a is None:
            # r = 0 without a prompt: nothing depends on the task.
            task_ids = None
        else:
            task_ids = task_ids.long()
            # Sorted once here, so the kernels can walk the batch task by task and form each
            # low-rank tile once per task present rather than once per sample.
            batch_order = torch.argsort(task_ids, stable=True)
    return _segments.impl(backend).forward(
        input_ids, weight, prompt, lora_a, lora_b, rows, scaling, task_ids, batch_order
    )


@_dept_embedding_op.register_fake
def _(
    input_ids,
    weight,
    prompt,
    lora_a,
    lora_b,
    position_ids,
    task_ids,
    num_tasks,
    scaling,
    index,
    backend,
):
    m = 0 if prompt is None else prompt.shape[-2]
    batch, seq_len = input_ids.shape
    return weight.new_empty(batch, m + seq_len, weight.shape[1])


@torch.library.custom_op("dept_kernels::dept_embedding_backward", mutates_args=())
@_fp32_math
def _dept_embedding_backward_op(
    grad_out: Tensor,
    input_ids: Tensor,
    rows: Tensor | None,
    task_ids: Tensor | None,
    lora_a: Tensor | None,
    lora_b: Tensor | None,
    num_prompt: int,
    num_tasks: int,
    vocab_size: int,
    scaling: float,
    prompt_dtype: torch.dtype,
    prompt_grad: bool,
    weight_grad: bool,
    backend: str | None,
) -> list[Tensor]:
    """Returns [d_prompt (m, d) or (T, m, d), d_lora_a, d_lora_b, d_weight (V, d) or empty].

    `num_prompt` is where the token rows of `grad_out` start; `prompt_grad` False skips the
    prompt's gradient (returned as zeros of its shape).
    """
    backend = _backend.resolved(backend, grad_out.device)
    d = grad_out.shape[-1]
    grad_out = grad_out.contiguous()
    m = num_prompt
    # Each absent gradient is its own empty tensor: custom-op outputs may not alias.
    d_a, d_b, d_weight = (grad_out.new_empty(0) for _ in range(3))
    if not prompt_grad:
        shape = (m, d) if task_ids is None else (num_tasks, m, d)
        d_prompt = grad_out.new_zeros(shape, dtype=prompt_dtype)
    elif task_ids is None:
        d_prompt = grad_out[:, :m].sum(0, dtype=torch.float32).to(prompt_dtype)
    else:
        d_prompt = _task_prompt_grad(grad_out, m, task_ids.long(), num_tasks, backend)
        d_prompt = d_prompt.to(prompt_dtype)
    if lora_a is not None and lora_a.shape[-1] == 0:
        # r = 0: the factors are unused, so their gradients are zeros (of empty shapes).
        d_a, d_b = torch.zeros_like(lora_a), torch.zeros_like(lora_b)
    elif task_ids is None:
        if lora_a is not None:
            used, g = _segments.row_sums(grad_out, m, rows, backend)
            b32 = lora_b.float()
            d_a = torch.zeros(lora_a.shape, dtype=torch.float32, device=grad_out.device)
            d_a[used] = scaling * (g @ b32.T)
            d_b = (scaling * (lora_a.float()[used].T @ g)).to(lora_b.dtype)
            d_a = d_a.to(lora_a.dtype)
    elif lora_a is not None:
        d_a, d_b = _task_lowrank_grads(
            grad_out, m, rows, task_ids.long(), lora_a, lora_b, scaling, backend
        )
    if weight_grad:
        used, g = _segments.row_sums(grad_out, m, input_ids, backend)
        d_weight = torch.zeros(vocab_size, d, dtype=grad_out.dtype, device=grad_out.device)
        d_weight[used] = g.to(grad_out.dtype)
    return [d_prompt, d_a, d_b, d_weight]


def _task_prompt_grad(
    grad_out: Tensor, m: int, task_ids: Tensor, num_tasks: int, backend: str
) -> Tensor:
    """fp32 (T, m, d): the prompt rows of `grad_out` (B, m + s, d) summed per task."""
    d = grad_out.shape[-1]
    d_prompt = grad_out.new_zeros(num_tasks * m, d, dtype=torch.float32)
    if m:
        # Rows keyed (task, prompt row) go through the deterministic segmented sum; it reads
        # token rows, so the prompt block (B, m, d, no s) is handed over as its own tensor.
        keys = task_ids[:, None] * m + torch.arange(m, device=grad_out.device)
        used, sums = _segments.row_sums(grad_out[:, :m].contiguous(), 0, keys, backend)
        d_prompt[used] = sums
    return d_prompt.view(num_tasks, m, d)


def _task_lowrank_grads(
    grad_out: Tensor,
    m: int,
    rows: Tensor | None,
    task_ids: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    scaling: float,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """(dA (T, L, r), dB (T, r, d)) for stacked factors, in their dtypes.

    The token gradients are summed per (task, row) key `task * L + row` in one segmented
    pass, then each task present gets its two small matmuls.
    """
    batch, width, _ = grad_out.shape
    max_len = lora_a.shape[1]
    if rows is None:
        rows = torch.arange(width - m, device=grad_out.device).expand(batch, -1)
    keys = task_ids[:, None] * max_len + rows.long()
    used, g = _segments.row_sums(grad_out, m, keys, backend)
    # `used` is sorted, so each task's rows form one run.
    tasks, counts = torch.unique_consecutive(used // max_len, return_counts=True)
    counts = counts.tolist()
    d_a = torch.zeros(lora_a.shape, dtype=torch.float32, device=grad_out.device)
    d_b = torch.zeros(lora_b.shape, dtype=torch.float32, device=grad_out.device)
    for k, g_k, rows_k in zip(
        tasks.tolist(), g.split(counts), (used % max_len).split(counts), strict=True
    ):
        d_a[k, rows_k] = scaling * (g_k @ lora_b[k].float().T)
        d_b[k] = scaling * (lora_a[k, rows_k].float().T @ g_k)
    return d_a.to(lora_a.dtype), d_b.to(lora_b.dtype)


@_dept_embedding_backward_op.register_fake
def _(
    grad_out,
    input_ids,
    rows,
    task_ids,
    lora_a,
    lora_b,
    num_prompt,
    num_tasks,
    vocab_size,
    scaling,
    prompt_dtype,
    prompt_grad,
    weight_grad,
    backend,
):
    d = grad_out.shape[-1]
    prompt_shape = (num_prompt, d) if task_ids is None else (num_tasks, num_prompt, d)
    d_prompt = grad_out.new_empty(prompt_shape, dtype=prompt_dtype)
    d_a = grad_out.new_empty(0) if lora_a is None else torch.empty_like(lora_a)
    d_b = grad_out.new_empty(0) if lora_b is None else torch.empty_like(lora_b)
    d_weight = grad_out.new_empty(vocab_size, d) if weight_grad else grad_out.new_empty(0)
    return [d_prompt, d_a, d_b, d_weight]


def _setup_context(ctx, inputs, output) -> None:
    input_ids, weight, prompt, lora_a, lora_b, position_ids, task_ids = inputs[:7]
    num_tasks, scaling, index, backend = inputs[7:]
    rows = _lowrank_rows(input_ids, lora_a, position_ids, index)
    # Only ids and the small low-rank factors are saved: nothing of size (B, s, d).
    ctx.save_for_backward(input_ids, rows, task_ids, lora_a, lora_b)
    ctx.num_prompt = 0 if prompt is None else prompt.shape[-2]
    ctx.num_tasks = num_tasks
    ctx.prompt_dtype = weight.dtype if prompt is None else prompt.dtype
    ctx.vocab_size = weight.shape[0]
    ctx.scaling = scaling
    ctx.backend = backend


def _backward(ctx, grad_out):
    input_ids, rows, task_ids, lora_a, lora_b = ctx.saved_tensors
    need = ctx.needs_input_grad
    d_prompt, d_a, d_b, d_weight = torch.ops.dept_kernels.dept_embedding_backward(
        grad_out,
        input_ids,
        rows,
        task_ids,
        lora_a if need[3] or need[4] else None,
        lora_b if need[3] or need[4] else None,
        ctx.num_prompt,
        ctx.num_tasks,
        ctx.vocab_size,
        ctx.scaling,
        ctx.prompt_dtype,
        bool(need[2]),
        bool(need[1]),
        ctx.backend,
    )
    return (
        None,
        d_weight if need[1] else None,
        d_prompt if need[2] else None,
        d_a if need[3] else None,
        d_b if need[4] else None,
        None,
        None,
        None,
        None,
        None,
        None,
    )


_dept_embedding_op.register_autograd(_backward, setup_context=_setup_context)
