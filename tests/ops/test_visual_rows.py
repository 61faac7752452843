"""dept_embedding with visual rows (CLIP-T5): `out[:, m + s:] = visual`, on every backend.

The expected values come from the formula written out here, sample by sample:
`[P[k]; E[ids] + scaling * A[k, rows] @ B[k]; V[b]]`, and the expected gradients from
autograd through it.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import DEVICE, assert_close
from helpers.ops import MIXED, Case, make_inputs, spy_grad_reads

from dept_kernels import backends
from dept_kernels.ops import dept_embedding

FLOATS = [torch.float32, torch.float16, torch.bfloat16]


@dataclasses.dataclass(frozen=True)
class VisualCase:
    case: Case
    n_v: int = 7
    # How the visual rows are laid out: "contiguous", "transposed" (column-major rows),
    # "sliced" (a window of a bigger buffer: padded batch and row strides) or "broadcast"
    # (one sample's rows expanded over the batch, batch stride 0).
    layout: str = "contiguous"

    @property
    def name(self) -> str:
        return f"{self.case.name}-nv{self.n_v}-{self.layout}"


CASES = [
    VisualCase(Case("base")),
    VisualCase(Case("base"), n_v=1),
    VisualCase(Case("base"), n_v=0),
    VisualCase(Case("no_prompt", m=0), n_v=3),
    VisualCase(Case("prompt_tuning", lowrank=False)),
    VisualCase(Case("position_ids", position_ids=True)),
    VisualCase(Case("token_mode", token=True), n_v=1),
    VisualCase(Case("wide", d=160, r=20, seq=9, max_len=12, m=2), n_v=17),
    VisualCase(Case("tasks", batch=5, tasks=MIXED)),
    VisualCase(Case("tasks_position_ids", batch=5, tasks=MIXED, position_ids=True), n_v=1),
    VisualCase(Case("tasks_token_mode", batch=5, tasks=MIXED, token=True)),
    VisualCase(Case("tasks_prompt_tuning", batch=5, tasks=MIXED, lowrank=False), n_v=3),
    VisualCase(Case("base"), layout="transposed"),
    VisualCase(Case("base"), layout="sliced"),
    VisualCase(Case("position_ids", position_ids=True), layout="sliced"),
    VisualCase(Case("tasks", batch=5, tasks=MIXED), layout="transposed"),
    VisualCase(Case("base"), layout="broadcast"),
]


def make_visual(vc: VisualCase, dtype: torch.dtype, seed: int = 5) -> tuple[torch.Tensor, ...]:
    """(visual as passed to the op, the leaf its gradient flows to)."""
    g = torch.Generator().manual_seed(seed)
    batch, n_v, d = vc.case.batch, vc.n_v, vc.case.d

    def leaf(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(DEVICE, dtype).requires_grad_()

    if vc.layout == "contiguous":
        x = leaf(batch, n_v, d)
        return x, x
    if vc.layout == "transposed":
        x = leaf(batch, d, n_v)
        return x.transpose(1, 2), x
    if vc.layout == "sliced":
        x = leaf(batch + 1, n_v + 2, d + 3)
        return x[1:, 1 : n_v + 1, 2 : d + 2], x
    x = leaf(1, n_v, d)
    return x.expand(batch, n_v, d), x


def expected(kw: dict, visual: torch.Tensor) -> torch.Tensor:
    """The formula, one sample at a time, in fp32 then rounded once to the table's dtype."""
    ids, weight = kw["input_ids"], kw["weight"]
    batch, seq = ids.shape
    tasks = kw.get("task_ids")
    samples = []
    for b in range(batch):
        k = None if tasks is None else int(tasks[b])

        def of_task(x: torch.Tensor, k: int | None = k) -> torch.Tensor:
            return x if k is None else x[k]

        text = weight.float()[ids[b].long()]
        if "lora_a" in kw:
            if kw.get("index") == "token":
                rows = ids[b].long()
            elif "position_ids" in kw:
                rows = kw["position_ids"][b].long()
            else:
                rows = torch.arange(seq, device=ids.device)
            a = of_task(kw["lora_a"]).float()[rows]
            text = text + kw["scaling"] * (a @ of_task(kw["lora_b"]).float())
        parts = [text.to(weight.dtype), visual[b]]
        if "prompt" in kw:
            parts.insert(0, of_task(kw["prompt"]).to(weight.dtype))
        samples.append(torch.cat(parts, 0))
    return torch.stack(samples)


def _call(kw: dict, visual: torch.Tensor) -> torch.Tensor:
    args = {k: v for k, v in kw.items() if not k.startswith("_")}
    return dept_embedding(**args, visual=visual)


@pytest.mark.parametrize("dtype", FLOATS, ids=lambda t: str(t).split(".")[-1])
@pytest.mark.parametrize("vc", CASES, ids=lambda c: c.name)
def test_visual_rows_match_formula(backend, vc, dtype):
    case = vc.case
    kw = make_inputs(case, dtype, dtype)
    kw["weight"].requires_grad_()
    visual, visual_leaf = make_visual(vc, dtype)
    out = _call(kw, visual)
    assert out.shape == (case.batch, case.m + case.seq + vc.n_v, case.d)
    assert out.dtype == dtype
    ref = expected(kw, visual)
    assert_close(out, ref, dtype, what="output")
    # The visual rows are copies: bit for bit.
    assert torch.equal(out[:, case.m + case.seq :], visual.detach())

    params = [kw[n] for n in ("prompt", "lora_a", "lora_b") if n in kw]
    params += [kw["weight"], visual_leaf]
    g = torch.Generator().manual_seed(11)
    grad_out = torch.randn(out.shape, generator=g).to(DEVICE, dtype)
    grads = torch.autograd.grad(out, params, grad_out)
    ref_grads = torch.autograd.grad(ref, params, grad_out)
    for p, got, want in zip(params, grads, ref_grads, strict=True):
        assert got.shape == p.shape
        assert_close(got, want, dtype, what=f"gradient of a {tuple(p.shape)} input")


@pytest.mark.parametrize("vc", [CASES[0], CASES[8]], ids=lambda c: c.name)
def test_visual_gradient_is_the_output_gradient_slice(backend, vc):
    """d_visual = grad_out[:, m + s:] exactly, and the text inputs' gradients are those of
    the same call without visual rows (the backward reads only the text columns)."""
    case = vc.case
    kw = make_inputs(case, torch.float32, torch.float32)
    visual, _ = make_visual(vc, torch.float32)
    out = _call(kw, visual)
    text = case.m + case.seq
    g = torch.Generator().manual_seed(3)
    grad_out = torch.randn(out.shape, generator=g).to(DEVICE)
    params = [kw[n] for n in ("prompt", "lora_a", "lora_b")]
    *grads, d_visual = torch.autograd.grad(out, [*params, visual], grad_out)
    assert torch.equal(d_visual, grad_out[:, text:])
    plain = dept_embedding(**{k: v for k, v in kw.items() if not k.startswith("_")})
    plain_grads = torch.autograd.grad(plain, params, grad_out[:, :text].contiguous())
    for got, want in zip(grads, plain_grads, strict=True):
        assert torch.equal(got, want)
    assert torch.equal(out[:, :text], plain)


def test_no_visual_rows_equals_none(backend):
    kw = make_inputs(Case("base"), torch.float32, torch.float32)
    args = {k: v for k, v in kw.items() if not k.startswith("_")}
    empty = torch.zeros(2, 0, 33, device=DEVICE, requires_grad=True)
    out = dept_embedding(**args, visual=empty)
    assert torch.equal(out, dept_embedding(**args))
    (d_empty,) = torch.autograd.grad(out.sum(), [empty])
    assert d_empty.shape == (2, 0, 33)


@pytest.mark.parametrize("vc", [CASES[0], CASES[5], CASES[8]], ids=lambda c: c.name)
def test_backward_reads_the_text_columns_in_place(backend, vc, monkeypatch):
    """The kernels reading grad_out (`spy_grad_reads`) get its text columns as a view
    (samples m + s + n_v rows apart), not a (B, m + s, d) copy."""
    case = vc.case
    kw = make_inputs(case, torch.float32, torch.float32)
    visual, _ = make_visual(vc, torch.float32)
    out = _call(kw, visual)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    calls = spy_grad_reads(backends.load(backend), monkeypatch)
    torch.autograd.grad(out, [kw["lora_a"]], grad_out)
    seen = [(g.data_ptr(), g.stride(0)) for _, g, _ in calls]
    text_rows = [s for s in seen if s[1] == grad_out.stride(0)]
    assert text_rows and all(ptr == grad_out.data_ptr() for ptr, _ in text_rows), seen
