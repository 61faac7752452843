"""dept_embedding: every backend against the formula, forward and backward."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import DEVICE, assert_close

import dept_kernels
from dept_kernels.ops import dept_embedding, official_dept_embedding, reference_dept_embedding


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


CASES = [
    Case("base"),
    Case("no_prompt", m=0),
    Case("s_equals_L", seq=8),
    Case("batch_1", batch=1),
    Case("rank_1", r=1),
    Case("int32_ids", int32_ids=True),
    Case("position_ids", position_ids=True),
    Case("token_mode", token=True),
    Case("broadcast_prompt", broadcast_prompt=True, m=4),
    Case("prompt_tuning", lowrank=False),
    Case("wide", d=160, r=70, seq=9, max_len=12, m=2),
]

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
    if case.m:
        if case.broadcast_prompt:
            row = torch.randn(1, case.d, generator=g).to(DEVICE, pdtype).requires_grad_()
            kw["_leaf"] = row
            kw["prompt"] = row.expand(case.m, case.d)
        else:
            kw["prompt"] = (
                torch.randn(case.m, case.d, generator=g).to(DEVICE, pdtype).requires_grad_()
            )
    if case.lowrank:
        rows = case.vocab if case.token else case.max_len
        kw["lora_a"] = torch.randn(rows, case.r, generator=g).to(DEVICE, pdtype).requires_grad_()
        kw["lora_b"] = torch.randn(case.r, case.d, generator=g).to(DEVICE, pdtype).requires_grad_()
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


@pytest.mark.parametrize("wdtype,pdtype", DTYPES, ids=lambda t: str(t).split(".")[-1])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_matches_reference(backend, case, wdtype, pdtype):
    kw = make_inputs(case, wdtype, pdtype)
    out, grads, grad_out = run(dept_embedding, kw)
    ref, ref_grads, _ = run(reference_dept_embedding, kw, grad_out)
    assert out.dtype == wdtype
    assert out.shape == (case.batch, case.m + case.seq, case.d)
    assert_close(out, ref, wdtype)
    for g, rg in zip(grads, ref_grads, strict=True):
        assert g.dtype == rg.dtype
        assert_close(g, rg, wdtype)


@pytest.mark.parametrize("token", [False, True], ids=["position", "token"])
def test_weight_gradient_when_it_trains(backend, token):
    kw = make_inputs(Case("w", token=token), torch.float32, torch.float32)
    kw["weight"].requires_grad_()
    out, grads, grad_out = run(dept_embedding, kw)
    ref, ref_grads, _ = run(reference_dept_embedding, kw, grad_out)
    assert_close(out, ref, torch.float32)
    assert len(grads) == 4
    for g, rg in zip(grads, ref_grads, strict=True):
        assert_close(g, rg, torch.float32)


def test_frozen_weight_gets_no_gradient(backend):
    kw = make_inputs(Case("frozen"), torch.float32, torch.float32)
    out = dept_embedding(**kw)
    out.sum().backward()
    assert kw["weight"].grad is None
    assert kw["prompt"].grad is not None and kw["lora_a"].grad is not None


@pytest.mark.parametrize("batch,seq", [(0, 5), (2, 0)], ids=["empty_batch", "empty_seq"])
def test_empty(backend, batch, seq):
    kw = make_inputs(Case("empty", batch=batch, seq=seq), torch.float32, torch.float32)
    out, grads, grad_out = run(dept_embedding, kw)
    ref, ref_grads, _ = run(reference_dept_embedding, kw, grad_out)
    assert out.shape == ref.shape
    for g, rg in zip(grads, ref_grads, strict=True):
        assert_close(g, rg, torch.float32)


def test_rank_zero_is_prompt_tuning(backend):
    kw = make_inputs(Case("r0", r=0), torch.float32, torch.float32)
    out = dept_embedding(**kw)
    plain = {k: val for k, val in kw.items() if k not in ("lora_a", "lora_b", "scaling")}
    assert_close(out, reference_dept_embedding(**plain), torch.float32)


def test_non_contiguous_inputs(backend):
    case = Case("nc", batch=3, seq=6)
    kw = make_inputs(case, torch.float32, torch.float32)
    kw["input_ids"] = kw["input_ids"].T.contiguous().T  # same values, column-major strides
    kw["weight"] = kw["weight"].T.contiguous().T
    lb = kw["lora_b"].detach().T.contiguous().T.requires_grad_()
    kw["lora_b"] = lb
    assert not kw["input_ids"].is_contiguous() and not kw["weight"].is_contiguous()
    out, grads, grad_out = run(dept_embedding, kw)
    ref, ref_grads, _ = run(reference_dept_embedding, kw, grad_out)
    assert_close(out, ref, torch.float32)
    for g, rg in zip(grads, ref_grads, strict=True):
        assert_close(g, rg, torch.float32)


def test_official_formula_agrees_at_full_length(backend):
    case = Case("official", seq=8, max_len=8, batch=3)
    kw = make_inputs(case, torch.float32, torch.float32)
    out, grads, grad_out = run(dept_embedding, kw)
    official, official_grads, _ = run(official_dept_embedding, kw, grad_out)
    assert_close(out, official, torch.float32)
    for g, og in zip(grads, official_grads, strict=True):
        assert_close(g, og, torch.float32)


def test_official_formula_rejects_short_inputs():
    kw = make_inputs(Case("short"), torch.float32, torch.float32)
    with pytest.raises(ValueError, match="s == max_length"):
        official_dept_embedding(**kw)


@pytest.mark.parametrize("case", [Case("pos"), Case("ids", position_ids=True)], ids=str)
def test_saved_tensors_hold_no_activation_sized_tensor(backend, case):
    case = dataclasses.replace(case, batch=4, seq=8, max_len=8, d=40, r=3)
    kw = make_inputs(case, torch.float32, torch.float32)
    saved: list[torch.Size] = []

    def pack(t):
        saved.append(t.shape)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        dept_embedding(**{k: val for k, val in kw.items() if not k.startswith("_")})
    assert saved, "the op saves ids and the low-rank factors"
    activation = case.seq * case.d
    assert all(shape.numel() < activation for shape in saved), saved


@pytest.mark.parametrize("name", [n for n in dept_kernels.available_backends() if n != "triton"])
def test_torch_compile_fullgraph(name):
    # The triton interpreter under compile only repeats the eager check, slowly.
    kw = make_inputs(Case("compile", position_ids=True), torch.float32, torch.float32)
    args = {k: val for k, val in kw.items() if not k.startswith("_")}

    def step(input_ids, prompt, lora_a, lora_b):
        out = dept_embedding(
            input_ids,
            args["weight"],
            prompt,
            lora_a,
            lora_b,
            scaling=0.7,
            position_ids=args["position_ids"],
        )
        return (out.float() ** 2).sum()

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    params = (args["prompt"], args["lora_a"], args["lora_b"])
    with dept_kernels.use_backend(name):
        loss = compiled(args["input_ids"], *params)
        grads = torch.autograd.grad(loss, params)
        ref_loss = step(args["input_ids"], *params)
        ref_grads = torch.autograd.grad(ref_loss, params)
    assert_close(loss, ref_loss, torch.float32)
    for g, rg in zip(grads, ref_grads, strict=True):
        assert_close(g, rg, torch.float32)


@pytest.mark.parametrize("name", [n for n in dept_kernels.available_backends() if n != "triton"])
def test_opcheck(name):
    kw = make_inputs(Case("opcheck", position_ids=True), torch.float32, torch.float32)
    args = (
        kw["input_ids"],
        kw["weight"],
        kw["prompt"],
        kw["lora_a"],
        kw["lora_b"],
        kw["position_ids"],
        0.7,
        name,
    )
    torch.library.opcheck(torch.ops.dept_kernels.dept_embedding.default, args)
