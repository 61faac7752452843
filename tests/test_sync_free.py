"""Sync-free mode (issue 18, part 2): the ops read nothing back to the host, so a training
step can be captured in a CUDA graph; ids out of range are clamped before any kernel reads
memory and recorded on the device, to raise at the next check.

Counted on CPU by `helpers.syncs` (what a GPU would wait for); results compared against the
formula oracles of `dept_kernels.testing`, forward and gradients.
"""

from __future__ import annotations

import contextlib
import threading

import pytest
import torch
from helpers import DEVICE, aot, assert_close, models
from helpers.ops import MIXED, Case, make_inputs, run
from helpers.syncs import SyncCounter, library_step

import dept_kernels as dk
from dept_kernels.ops import aot_bias_add, aot_fc_bias, aot_kron_bias, dept_embedding
from dept_kernels.ops.aot import distinct_ids
from dept_kernels.testing import reference_aot_bias_add, reference_dept_embedding


@pytest.fixture(autouse=True)
def clean_state():
    """Every test starts and ends in the default mode with no error recorded."""
    dk.check_errors()
    yield
    dk.set_sync_free(False)
    with contextlib.suppress(ValueError):
        dk.check_errors()


# ----------------------------------------------------------------------------- the switch


def test_off_by_default_and_context_local():
    assert not dk.sync_free_enabled()
    seen = []
    with dk.sync_free():
        assert dk.sync_free_enabled()
        # Another thread keeps the process default.
        thread = threading.Thread(target=lambda: seen.append(dk.sync_free_enabled()))
        thread.start()
        thread.join()
        with dk.sync_free(False):
            assert not dk.sync_free_enabled()
        assert dk.sync_free_enabled()
    assert seen == [False]
    assert not dk.sync_free_enabled()


def test_process_default_and_a_context_over_it():
    dk.set_sync_free(True)
    seen = []
    thread = threading.Thread(target=lambda: seen.append(dk.sync_free_enabled()))
    thread.start()
    thread.join()
    assert seen == [True] and dk.sync_free_enabled()
    with dk.sync_free(False):
        assert not dk.sync_free_enabled()
    dk.set_sync_free(False)
    assert not dk.sync_free_enabled()


def test_switch_arguments_are_checked():
    with pytest.raises(TypeError, match="enabled must be a bool, got int"):
        dk.set_sync_free(1)
    with pytest.raises(TypeError, match="enabled must be a bool, got str"):
        dk.sync_free("yes")


# ----------------------------------------------------------------------------- the ops, in range

OP_CASES = [
    Case("base"),
    Case("position_ids", position_ids=True),
    Case("token_mode", token=True),
    Case("tasks", batch=5, tasks=MIXED),
    Case("tasks_position_ids", batch=5, tasks=MIXED, position_ids=True),
    Case("tasks_token_mode", batch=5, tasks=MIXED, token=True),
]


@pytest.mark.parametrize("case", OP_CASES, ids=lambda c: c.name)
def test_dept_embedding_matches_reference_without_a_sync(backend, case):
    kw = make_inputs(case, torch.float32, torch.float32)
    kw["weight"].requires_grad_()
    with dk.sync_free(), SyncCounter() as syncs:
        out, grads, grad_out = run(dept_embedding, kw)
    assert syncs.counts == {}, syncs.counts
    ref, ref_grads, _ = run(reference_dept_embedding, kw, grad_out)
    assert_close(out, ref, torch.float32)
    assert len(grads) == len(ref_grads) > 1
    for g, rg in zip(grads, ref_grads, strict=True):
        assert_close(g, rg, torch.float32)


def kron_factors(gen, a=3, b=4, r=2, d=16):
    return [
        torch.randn(*shape, generator=gen).to(DEVICE).requires_grad_()
        for shape in ((a, r), (b, r), (r * r, d))
    ]


def fc_factors(gen, e=6, r=3, d=16):
    return [
        torch.randn(*shape, generator=gen).to(DEVICE).requires_grad_()
        for shape in ((e, r), (r,), (r, d), (d,))
    ]


@pytest.mark.parametrize("reparam", ["kron", "fc"])
def test_aot_reparameterisations_match_the_full_table_without_a_sync(backend, reparam):
    """The rows are formed for a padded list of distinct ids (its length a shape): the
    padding rows are read by no token and get no gradient."""
    gen = torch.Generator().manual_seed(0)
    vocab, d = 12, 16
    hidden = torch.randn(2, 7, d, generator=gen).to(DEVICE).requires_grad_()
    ids = torch.tensor([[1, 5, 1, 11, 0, 5, 5], [3, 1, 1, 11, 2, 7, 0]], device=DEVICE)
    if reparam == "kron":
        w = kron_factors(gen, d=d)
        x = torch.arange(vocab, device=DEVICE)
        full = torch.einsum("xp,xq,pqd->xd", w[0][x // 4], w[1][x % 4], w[2].view(2, 2, d))

        def op():
            return aot_kron_bias(hidden, ids, *w)
    else:
        emb = torch.randn(vocab, 6, generator=gen).to(DEVICE)
        w = fc_factors(gen, d=d)
        full = torch.relu(emb @ w[0] + w[1]) @ w[2] + w[3]

        def op():
            return aot_fc_bias(hidden, ids, emb, *w)

    grad_out = torch.randn(hidden.shape, generator=gen).to(DEVICE)
    with dk.sync_free(), SyncCounter() as syncs:
        out = op()
        grads = torch.autograd.grad(out, [hidden, *w], grad_out)
    assert syncs.counts == {}, syncs.counts
    ref = reference_aot_bias_add(hidden, ids, full)
    ref_grads = torch.autograd.grad(ref, [hidden, *w], grad_out)
    assert_close(out, ref, torch.float32)
    for g, rg in zip(grads, ref_grads, strict=True):
        assert_close(g, rg, torch.float32)


@pytest.mark.parametrize("reparam", ["kron", "fc"])
def test_aot_dropout_is_still_one_mask_per_distinct_id(reparam):
    gen = torch.Generator().manual_seed(0)
    d = 16
    hidden = torch.zeros(2, 8, d, device=DEVICE)
    ids = torch.tensor([[1, 2, 1, 3, 1, 2, 0, 4]] * 2, device=DEVICE)
    if reparam == "kron":
        w = kron_factors(gen, a=2, b=3, d=d)

        def op():
            return aot_kron_bias(hidden, ids, *w, dropout_p=0.5)
    else:
        emb = torch.randn(5, 6, generator=gen).to(DEVICE)
        w = fc_factors(gen, d=d)
        w[0].data.abs_()  # positive pre-activations: dropped inputs show in the output

        def op():
            return aot_fc_bias(hidden, ids, emb, *w, dropout_p=0.5)

    with dk.sync_free():
        aot.check_dropout_per_distinct_id(op)


@pytest.mark.parametrize(
    "ids,upper",
    [([[4, 1, 4, 0]], 5), ([[2, 2, 2]], 3), ([[6, 0], [3, 6]], 100), ([[0, 1, 2, 3]], 4)],
)
def test_padded_distinct_ids_agree_with_unique(ids, upper):
    ids = torch.tensor(ids, device=DEVICE)
    used, inverse = torch.unique(ids, return_inverse=True)
    with dk.sync_free(), SyncCounter() as syncs:
        padded, padded_inverse = distinct_ids(ids, upper)
    assert syncs.counts == {}
    assert padded.shape == (min(ids.numel(), upper),)
    assert torch.equal(padded[: used.numel()], used)
    assert torch.equal(padded[used.numel() :], torch.full_like(padded[used.numel() :], upper - 1))
    assert torch.equal(padded_inverse, inverse)


# ----------------------------------------------------------------------------- ids out of range


def _dept_inputs(case: Case) -> dict:
    kw = make_inputs(case, torch.float32, torch.float32)
    kw["weight"].requires_grad_()
    return kw


BAD_DEPT = [
    (Case("input_ids", batch=3), "input_ids", 50),
    (Case("input_ids_negative", batch=3), "input_ids", -3),
    (Case("position_ids", batch=3, position_ids=True), "position_ids", 8),
    (Case("task_ids", batch=3, tasks=(0, 1, 0)), "task_ids", 7),
]


@pytest.mark.parametrize("case,arg,value", BAD_DEPT, ids=lambda x: getattr(x, "name", str(x)))
def test_dept_out_of_range_is_clamped_and_raises_at_the_check(backend, case, arg, value):
    """Sample 1 holds the bad id: the call neither raises nor syncs; samples 0 and 2 equal
    the reference; sample 1 read the clamped row, in bounds; `check_errors` then raises
    once, naming the argument."""
    kw = _dept_inputs(case)
    bad = dict(kw)
    tensor = kw[arg].clone()
    if arg == "task_ids":
        tensor[1] = value
    else:
        tensor[1, 2] = value
    bad[arg] = tensor
    with dk.sync_free(check=False), SyncCounter() as syncs:
        out = dept_embedding(**{k: v for k, v in bad.items() if not k.startswith("_")})
    assert syncs.counts == {}
    keep = [0, *range(2, case.batch)]
    ref = reference_dept_embedding(
        **{
            k: (v[keep] if k in ("input_ids", "position_ids", "task_ids") else v)
            for k, v in kw.items()
            if not k.startswith("_")
        }
    )
    assert_close(out[keep], ref, torch.float32)
    # Sample 1 read the clamped id: the reference on the clamped ids gives its rows.
    clamped = dict(kw)
    upper = {
        "input_ids": kw["weight"].shape[0],
        "position_ids": case.max_len,
        "task_ids": kw["prompt"].shape[0],
    }
    clamped[arg] = tensor.clamp(0, upper[arg] - 1)
    clamped_ref = reference_dept_embedding(
        **{k: v for k, v in clamped.items() if not k.startswith("_")}
    )
    assert_close(out[1], clamped_ref[1], torch.float32)
    message = rf"{arg} held id {value}, out of range \[0, {upper[arg]}\)"
    with pytest.raises(ValueError, match=message):
        dk.check_errors()
    dk.check_errors()  # cleared


def test_the_block_end_checks():
    kw = _dept_inputs(Case("base"))
    ids = kw["input_ids"].clone()
    ids[0, 0] = 99
    args = {k: v for k, v in kw.items() if not k.startswith("_")}
    message = r"input_ids held id 99, out of range \[0, 50\)"
    with pytest.raises(ValueError, match=message), dk.sync_free():
        dept_embedding(**{**args, "input_ids": ids})
    # An error inside the block is the one reported; the record stays for a later check.
    with pytest.raises(KeyError), dk.sync_free():
        dept_embedding(**{**args, "input_ids": ids})
        raise KeyError("first")
    with pytest.raises(ValueError, match="input_ids held id 99"):
        dk.check_errors()


def test_the_next_call_in_the_default_mode_raises_what_was_recorded():
    kw = _dept_inputs(Case("base"))
    args = {k: v for k, v in kw.items() if not k.startswith("_")}
    ids = kw["input_ids"].clone()
    ids[1, 1] = 70
    dk.set_sync_free(True)
    dept_embedding(**{**args, "input_ids": ids})
    dk.set_sync_free(False)
    # Good ids, default mode: its one read also sees the record.
    with pytest.raises(ValueError, match="input_ids held id 70"):
        dept_embedding(**args)
    with SyncCounter() as syncs:
        dept_embedding(**args)  # cleared
    assert syncs.total == 1
    # Its own bad ids are reported first, with the default mode's error.
    dk.set_sync_free(True)
    dept_embedding(**{**args, "input_ids": ids})
    dk.set_sync_free(False)
    ids[1, 1] = 51
    with pytest.raises(IndexError, match=r"input_ids holds id 51, out of range \[0, 50\)"):
        dept_embedding(**{**args, "input_ids": ids})
    with pytest.raises(ValueError, match="input_ids held id 70"):
        dk.check_errors()


def test_aot_out_of_range_is_clamped_and_raises_at_the_check(backend):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 4, 8, generator=gen).to(DEVICE)
    table = torch.randn(10, 8, generator=gen).to(DEVICE).requires_grad_()
    ids = torch.tensor([[1, 2, 3, 4], [9, 10, 2, 1]], device=DEVICE)
    with dk.sync_free(check=False), SyncCounter() as syncs:
        out = aot_bias_add(hidden, ids, table)
        (grad,) = torch.autograd.grad(out.sum(), [table])
    assert syncs.counts == {}
    assert_close(out[0], reference_aot_bias_add(hidden[:1], ids[:1], table)[0], torch.float32)
    assert_close(
        out[1], reference_aot_bias_add(hidden[1:], ids[1:].clamp(max=9), table)[0], torch.float32
    )
    # Id 10 read row 9, so row 9 has the gradient of two tokens.
    assert torch.equal(
        grad.sum(1), torch.tensor([0, 2, 2, 1, 1, 0, 0, 0, 0, 2.0], device=DEVICE) * 8
    )
    with pytest.raises(ValueError, match=r"input_ids held id 10, out of range \[0, 10\)"):
        dk.check_errors()


def test_the_record_serves_inference_mode_and_training_alike():
    """The record made by a first call under `torch.inference_mode()` is updated by later
    calls outside it (an inference tensor could not be)."""
    from dept_kernels.ops import _sync_free

    _sync_free._records.clear()
    kw = _dept_inputs(Case("base"))
    args = {k: v for k, v in kw.items() if not k.startswith("_")}
    ids = kw["input_ids"].clone()
    ids[0, 0] = 60
    with dk.sync_free(check=False):
        with torch.inference_mode():
            dept_embedding(**{**args, "input_ids": ids})
        dept_embedding(**{**args, "input_ids": ids}).sum().backward()
    with pytest.raises(
        ValueError, match=r"input_ids held id 60, out of range \[0, 50\) \(last seen; 2"
    ):
        dk.check_errors()


def test_aot_stacked_task_ids_out_of_range():
    tables = torch.randn(2, 10, 8)
    hidden = torch.zeros(2, 3, 8)
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    with dk.sync_free(check=False):
        out = aot_bias_add(hidden, ids, tables, task_ids=torch.tensor([1, 5]))
    assert torch.equal(out[1], tables[1][ids[1]])
    with pytest.raises(ValueError, match=r"task_ids held id 5, out of range \[0, 2\)"):
        dk.check_errors()


# ----------------------------------------------------------------------------- training steps


@pytest.mark.parametrize("arch", ["t5", "gpt2", "gemma"])
def test_dept_training_step_reads_nothing(arch):
    """The patch adds no sync to a DePT step (T5: not even the padding trim's read, which
    sync-free mode skips; Gemma under transformers 5: not the check of the ids its scaled
    lookup reads); its loss and adapter gradients are the formula reference's."""
    base, model = models.patched_pair(arch, "dept")
    ids, mask, labels = models.batch()
    extra = {}
    if arch != "t5":
        # Left padding with position ids: the low-rank rows are gathered per token.
        labels = ids
        mask[0, :3] = 0
        extra["position_ids"] = (mask.cumsum(1) - 1).clamp(min=0)

    def loss(m):
        return m(input_ids=ids, attention_mask=mask, labels=labels, **extra).loss

    with dk.sync_free():
        forward, backward = library_step(base, model, loss)
        assert (forward, backward) == ({}, {}), (forward, backward)
        model.zero_grad()
        out = model(input_ids=ids, attention_mask=mask, labels=labels, **extra)
        out.loss.backward()
    adapter = model.dept_adapter
    ref = models.reference_forward(arch, base, adapter, ids, mask, labels, **extra)
    names, params = zip(*adapter.named_parameters(), strict=True)
    ref_grads = torch.autograd.grad(ref.loss, params)
    assert_close(out.loss, ref.loss, torch.float32)
    for name, p, rg in zip(names, params, ref_grads, strict=True):
        assert rg.abs().max() > 0, name
        assert_close(p.grad, rg, torch.float32)


@pytest.mark.parametrize("reparam", aot.REPARAMS)
def test_aot_training_step_reads_nothing(reparam):
    """No unique, no read: the distinct ids come padded to a static length. Without
    dropout (eval mode) the logits and gradients equal the reference's full tables."""
    base, model = aot.patched_pair("t5", reparam)
    ids = aot.batch()
    with dk.sync_free():
        forward, backward = library_step(base, model, lambda m: aot.scalar(aot.run("t5", m, ids)))
    assert (forward, backward) == ({}, {}), (forward, backward)
    model.eval()
    model.zero_grad()
    with dk.sync_free():
        logits = aot.run("t5", model, ids)
        aot.scalar(logits).backward()
    embedding = model.get_input_embeddings().weight
    tables = aot.formula_tables(model.dept_adapter, embedding)
    handles = aot.hook_reference(base, "t5", tables)
    try:
        ref = aot.run("t5", base, ids)
    finally:
        for h in handles:
            h.remove()
    aot.assert_close(logits, ref, torch.float32)
    params = list(model.dept_adapter.parameters())
    ref_grads = torch.autograd.grad(aot.scalar(ref), params)
    for p, rg in zip(params, ref_grads, strict=True):
        aot.assert_close(p.grad, rg, torch.float32)


def test_aot_model_out_of_range_raises_at_the_block_end():
    _, model = aot.patched_pair("t5", "kron")
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = aot.batch()
    ids[0, 7] = vocab + 4  # past the decoder labels (`aot.run`: the first 5 columns)
    message = rf"input_ids held id {vocab + 4}, out of range"
    with pytest.raises(ValueError, match=message), dk.sync_free():
        aot.run("t5", model, ids)


def test_compiled_step_reads_the_mode_at_run_time():
    """`torch.compile(fullgraph=True)` of a DePT and an AoT step: the ops read the mode when
    they run, so one compiled function runs checked or sync-free, and in the mode an id out
    of range is recorded, not raised."""
    case = Case("compile_tasks", batch=3, tasks=(0, 1, 0), position_ids=True)
    kw = make_inputs(case, torch.float32, torch.float32)
    args = {k: v for k, v in kw.items() if not k.startswith("_")}
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, case.seq, 16, generator=gen).to(DEVICE)
    w = kron_factors(gen)  # ids in [0, 12)

    def step(input_ids, aot_ids):
        out = dept_embedding(**{**args, "input_ids": input_ids})
        biased = aot_kron_bias(hidden, aot_ids, *w)
        return (out.float() ** 2).sum() + (biased**2).sum()

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    ids, aot_ids = args["input_ids"], args["input_ids"] % 12
    params = [args["prompt"], args["lora_a"], args["lora_b"], *w]
    ref = step(ids, aot_ids)
    ref_grads = torch.autograd.grad(ref, params)
    # (Not counted: torch.compile refuses to trace under a dispatch mode such as the counter.)
    with dk.sync_free():
        loss = compiled(ids, aot_ids)
        grads = torch.autograd.grad(loss, params)
    assert_close(loss, ref, torch.float32)
    for g, rg in zip(grads, ref_grads, strict=True):
        assert_close(g, rg, torch.float32)
    bad = aot_ids.clone()
    bad[0, 0] = 12
    with pytest.raises(IndexError, match=r"input_ids holds id 12, out of range \[0, 12\)"):
        compiled(ids, bad)
    with dk.sync_free(check=False):
        compiled(ids, bad)
    with pytest.raises(ValueError, match=r"input_ids held id 12, out of range \[0, 12\)"):
        dk.check_errors()


# ----------------------------------------------------------------------------- on a GPU


@pytest.mark.skipif(not torch.cuda.is_available(), reason="sync checks and CUDA graphs need a GPU")
def test_ops_never_sync_and_capture_in_a_cuda_graph():
    """CUDA's own sync check (`set_sync_debug_mode("error")`) passes a DePT and an AoT
    forward and backward; both capture in one CUDA graph, whose replays record an id out of
    range written into its static input, raised by the next check."""
    case = Case("tasks_position_ids", batch=5, tasks=MIXED, position_ids=True)
    kw = make_inputs(case, torch.float32, torch.float32)
    args = {k: v for k, v in kw.items() if not k.startswith("_")}
    params = [kw["prompt"], kw["lora_a"], kw["lora_b"]]
    gen = torch.Generator().manual_seed(3)
    grad_out = torch.randn(case.batch, case.m + case.seq, case.d, generator=gen).to(DEVICE)
    hidden = torch.randn(2, 7, 16, generator=gen).to(DEVICE).requires_grad_()
    aot_ids = torch.tensor([[1, 5, 1, 11, 0, 5, 5], [3, 1, 1, 11, 2, 7, 0]], device=DEVICE)
    w = kron_factors(gen)

    def step():
        out = dept_embedding(**args)
        biased = aot_kron_bias(hidden, aot_ids, *w, dropout_p=0.1)
        return torch.autograd.grad((out, biased), [*params, *w], (grad_out, hidden.detach()))

    with dk.sync_free(check=False):
        torch.cuda.set_sync_debug_mode("error")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        # Warm-up on a side stream, as capture needs (it also creates the error record).
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = step()
    torch.manual_seed(0)
    graph.replay()
    torch.cuda.synchronize()
    with dk.sync_free():
        torch.manual_seed(0)
        eager = step()
    for c, e in zip(captured[:3], eager[:3], strict=True):
        assert_close(c, e, torch.float32)
    args["input_ids"][1, 2] = 10_000
    graph.replay()
    with pytest.raises(ValueError, match="input_ids held id 10000"):
        dk.check_errors()
