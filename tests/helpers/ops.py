"""The dept_embedding op's test cases: a case table's row, its inputs on DEVICE, and the
output and gradients of a run (shared by the op's forward/backward, property and
reliability tests)."""

from __future__ import annotations

import dataclasses

import torch

from . import DEVICE


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    batch: int = 2
    seq: int = 5
    max_len: int = 8
    d: int = 33  # not a power of two: every kernel needs its column mask
    vocab: int = 50
    m: int = 3
    r: int = 4
    lowrank: bool = True
    int32_ids: bool = False
    position_ids: bool = False
    token: bool = False
    broadcast_prompt: bool = False
    # Task of each sample (len == batch): parameters stacked per task, T = max + 2, so one
    # task is unused and must get zero gradients.
    tasks: tuple[int, ...] | None = None


MIXED = (1, 0, 1, 2, 0)  # repeated and interleaved tasks


# (weight dtype, parameter dtype): the last is mixed precision, fp32 adapters on a bf16 table.
DTYPES = [
    (torch.float32, torch.float32),
    (torch.float16, torch.float16),
    (torch.bfloat16, torch.bfloat16),
    (torch.bfloat16, torch.float32),
]


def make_inputs(case: Case, wdtype: torch.dtype, pdtype: torch.dtype, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, case.vocab, (case.batch, case.seq), generator=g).to(DEVICE)
    if case.int32_ids:
        ids = ids.int()
    kw: dict = {
        "input_ids": ids,
        "weight": torch.randn(case.vocab, case.d, generator=g).to(DEVICE, wdtype),
    }
    # Per-task parameters carry a leading T dim.
    lead = () if case.tasks is None else (max(case.tasks, default=0) + 2,)
    if case.tasks is not None:
        kw["task_ids"] = torch.tensor(case.tasks, dtype=ids.dtype, device=DEVICE)

    def param(*shape: int) -> torch.Tensor:
        return torch.randn(*lead, *shape, generator=g).to(DEVICE, pdtype).requires_grad_()

    if case.m:
        if case.broadcast_prompt:
            row = param(1, case.d)
            kw["_leaf"] = row
            kw["prompt"] = row.expand(*lead, case.m, case.d)
        else:
            kw["prompt"] = param(case.m, case.d)
    if case.lowrank:
        kw["lora_a"] = param(case.vocab if case.token else case.max_len, case.r)
        kw["lora_b"] = param(case.r, case.d)
        kw["scaling"] = 0.7
    if case.token:
        kw["index"] = "token"
    if case.position_ids:
        kw["position_ids"] = torch.randint(0, case.max_len, (case.batch, case.seq), generator=g).to(
            DEVICE
        )
    return kw


def leaves(kw: dict) -> list[torch.Tensor]:
    names = ["_leaf"] if "_leaf" in kw else ["prompt"]
    names += ["lora_a", "lora_b", "weight"]
    return [kw[n] for n in names if n in kw and kw[n].requires_grad]


def run(fn, kw: dict, grad_out: torch.Tensor | None = None, seed: int = 1):
    """Output and gradients of every trainable leaf for a fixed random output gradient."""
    args = {k: val for k, val in kw.items() if not k.startswith("_")}
    out = fn(**args)
    if grad_out is None:
        g = torch.Generator().manual_seed(seed)
        grad_out = torch.randn(out.shape, generator=g).to(out.device, out.dtype)
    params = leaves(kw)
    grads = torch.autograd.grad(out, params, grad_out) if params else ()
    return out, grads, grad_out


# The backends' kernels that read the output gradient in the DePT backward: `reduce`, and
# the optional fused position-mode backward (`Backend` in dept_kernels/backends/_registry.py).
GRAD_READERS = ("reduce", "reduce_lowrank")


def spy_grad_reads(kernels, monkeypatch) -> list[tuple[str, torch.Tensor, int]]:
    """Wraps each of `kernels`' GRAD_READERS that it has, for the test's duration; the list
    returned fills with (kernel name, gradient read, m) per call."""
    calls: list[tuple[str, torch.Tensor, int]] = []
    for name in GRAD_READERS:
        kernel = getattr(kernels, name, None)
        if kernel is None:
            continue

        def spy(g, m, *args, kernel=kernel, name=name):
            calls.append((name, g, m))
            return kernel(g, m, *args)

        monkeypatch.setattr(kernels, name, spy)
    return calls
