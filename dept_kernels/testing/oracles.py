"""The formulas in plain differentiable PyTorch: the oracles the tests hold the ops to, and the
official DePT baseline the benchmarks beat (docs/design.md §1).

Each checks its arguments itself, from the formula, with none of the ops' checks: a bug in
those must not hide in the oracle. Bad arguments still fail with the ops' error types and
wording (a TypeError for float ids, an IndexError naming the id out of range), not as an
indexing error deep in torch or, for float ids, a silent truncation. Accumulation is fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["official_dept_embedding", "reference_aot_bias_add", "reference_dept_embedding"]


def _ids(name: str, x: object, ndim: int, upper: int | None) -> Tensor:
    """An int32/int64 tensor of rank `ndim` whose values lie in [0, upper) (unchecked: None)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must be int64 or int32, got {x.dtype}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(x.shape)}")
    if upper is not None and x.numel():
        lo, hi = int(x.min()), int(x.max())
        if lo < 0:
            raise IndexError(f"{name} holds a negative id ({lo}); ids must lie in [0, {upper})")
        if hi >= upper:
            raise IndexError(f"{name} holds id {hi}, out of range [0, {upper})")
    return x


def _floats(name: str, x: object, shape: tuple[int | None, ...]) -> Tensor:
    """A floating tensor whose shape matches `shape` (None: any size there)."""
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"{name} must be a floating torch.Tensor, got {type(x).__name__}")
    if x.dim() != len(shape) or any(
        w is not None and w != n for w, n in zip(shape, x.shape, strict=True)
    ):
        want = tuple("*" if w is None else w for w in shape)
        raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {want}")
    return x


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
    visual: Tensor | None = None,
) -> Tensor:
    """`out[b, :m] = P[k]`, `out[b, m + t] = E[ids[b, t]] + scaling * (A[k, row(b, t)] @ B[k])`
    (k = task_ids[b]; without tasks the parameters are shared), then `out[b, m + s + j] =
    visual[b, j]`: (B, m + s + n_v, d) of weight's dtype.

    Every sample first gathers its own parameters, then the formula runs per sample with
    batched matmuls. Arguments as `dept_embedding`'s.
    """
    weight = _floats("weight", weight, (None, None))
    vocab, d = weight.shape
    input_ids = _ids("input_ids", input_ids, 2, vocab)
    batch, seq_len = input_ids.shape
    if index not in ("position", "token"):
        raise ValueError(f"index must be 'position' or 'token', got {index!r}")
    if task_ids is None:
        num_tasks, lead = 0, ()
    else:
        stacked = [x for x in (prompt, lora_a) if isinstance(x, Tensor)]
        num_tasks = stacked[0].shape[0] if stacked else 0
        task_ids = _ids("task_ids", task_ids, 1, num_tasks)
        if task_ids.shape[0] != batch:
            raise ValueError(f"task_ids has {task_ids.shape[0]} entries, the batch {batch}")
        lead = (num_tasks,)

    def per_sample(x: Tensor) -> Tensor:
        if task_ids is None:
            return x.unsqueeze(0).expand(batch, *x.shape)
        return x[task_ids.long()]

    emb = F.embedding(input_ids.long(), weight).float()
    if (lora_a is None) != (lora_b is None):
        raise ValueError("lora_a and lora_b must be given together (or both None)")
    if lora_a is not None:
        lora_a = _floats("lora_a", lora_a, (*lead, None, None))
        max_length, rank = lora_a.shape[-2:]
        lora_b = _floats("lora_b", lora_b, (*lead, rank, d))
        if index == "token":
            rows = _ids("input_ids", input_ids, 2, max_length).long()
        elif position_ids is not None:
            rows = _ids("position_ids", position_ids, 2, max_length).long()
            if rows.shape != input_ids.shape:
                raise ValueError(f"position_ids has shape {tuple(rows.shape)}, not (B, s)")
        elif seq_len > max_length:
            raise ValueError(f"s={seq_len} > max_length L={max_length}: no row of lora_a")
        else:
            rows = torch.arange(seq_len, device=input_ids.device).expand(batch, seq_len)
        samples = torch.arange(batch, device=input_ids.device)[:, None]
        a = per_sample(lora_a).float()[samples, rows]  # (B, s, r)
        emb = emb + scaling * (a @ per_sample(lora_b).float())
    parts = [emb.to(weight.dtype)]
    if prompt is not None:
        prompt = _floats("prompt", prompt, (*lead, None, d))
        parts.insert(0, per_sample(prompt).to(weight.dtype))
    if visual is not None:
        visual = _floats("visual", visual, (batch, None, d))
        if visual.dtype != weight.dtype:
            raise TypeError(f"visual has dtype {visual.dtype} but weight has {weight.dtype}")
        parts.append(visual)
    return torch.cat(parts, dim=1)


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
    embeddings and concatenates the batch-repeated prompt: (B, m + s, d). Defined only for
    s == L, since the official code pads every input to max_length. The id range is checked
    only outside `torch.compile`, where reading the ids would break the graph the benchmarks
    time.
    """
    for name, x in (("prompt", prompt), ("lora_a", lora_a), ("lora_b", lora_b)):
        if x is None:
            raise ValueError(f"the official formula needs {name}")
    weight = _floats("weight", weight, (None, None))
    vocab, d = weight.shape
    upper = None if torch.compiler.is_compiling() else vocab
    batch, seq_len = _ids("input_ids", input_ids, 2, upper).shape
    if prompt.dim() == 2 and prompt.shape[-1] != d:
        raise ValueError(f"prompt has width {prompt.shape[-1]} but weight has d={d}")
    _floats("prompt", prompt, (None, d))
    max_length, rank = _floats("lora_a", lora_a, (None, None)).shape
    _floats("lora_b", lora_b, (rank, d))
    if seq_len != max_length:
        raise ValueError(f"the official formula needs s == max_length: s={seq_len}, L={max_length}")
    inputs_embeds = F.embedding(input_ids, weight)
    lora = (lora_a @ lora_b).repeat(batch, 1, 1)
    inputs_embeds = (inputs_embeds + scaling * lora).to(weight.dtype)
    prompts = prompt.to(weight.dtype).unsqueeze(0).repeat(batch, 1, 1)
    return torch.cat([prompts, inputs_embeds], dim=1)


def reference_aot_bias_add(
    hidden: Tensor, input_ids: Tensor, table: Tensor, *, task_ids: Tensor | None = None
) -> Tensor:
    """`hidden[b, t] + P[ids[b, t]]`, or `+ P[task_ids[b], ids[b, t]]` with stacked tables:
    (B, s, d) of hidden's dtype. The table's gradient is summed in fp32."""
    hidden = _floats("hidden", hidden, (None, None, None))
    batch, seq_len, d = hidden.shape
    lead = () if task_ids is None else (None,)
    table = _floats("table", table, (*lead, None, d))
    input_ids = _ids("input_ids", input_ids, 2, table.shape[-2])
    if input_ids.shape != (batch, seq_len):
        raise ValueError(
            f"input_ids has shape {tuple(input_ids.shape)}, hidden (B, s) is {(batch, seq_len)}"
        )
    table = table.float()
    if task_ids is not None:
        task_ids = _ids("task_ids", task_ids, 1, table.shape[0])
        table = table[task_ids.long()]  # (B, V, d)
        bias = torch.gather(table, 1, input_ids.long()[:, :, None].expand(-1, -1, d))
    else:
        bias = F.embedding(input_ids.long(), table)
    return (hidden.float() + bias).to(hidden.dtype)
