"""dept_embedding: every backend against the formula, forward and backward."""

from __future__ import annotations

import ast
import dataclasses
import pathlib

import pytest
import torch
from helpers import BACKENDS, DEVICE, assert_close
from helpers.ops import DTYPES, MIXED, Case, leaves, make_inputs, run

import dept_kernels
from dept_kernels.ops import dept_embedding
from dept_kernels.testing import official_dept_embedding, reference_dept_embedding

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
    # Positions in blocks (8 per block in the cpu kernel) and a partial last block.
    Case("position_blocks", batch=3, seq=19, max_len=21, d=97),
    # Single-task batches of 4 or more: the deltas of all s positions in a table first.
    Case("position_table", batch=5, seq=19, max_len=21, d=97),
    Case("tasks_position_blocks", batch=5, seq=21, max_len=24, d=65, tasks=MIXED),
    # Per-sample rows with at least 4 tokens per row of lora_a: the cpu kernel's table of
    # every row's delta (fewer tokens: one delta per token, the cases above).
    Case("position_ids_table", batch=5, seq=13, max_len=6, d=97, position_ids=True),
    Case("token_mode_table", batch=5, seq=9, vocab=7, d=65, token=True),
    Case("tasks", batch=5, tasks=MIXED),
    Case("tasks_position_ids", batch=5, tasks=MIXED, position_ids=True),
    Case("tasks_token_mode", batch=5, tasks=MIXED, token=True),
    Case("tasks_prompt_tuning", batch=5, tasks=MIXED, lowrank=False),
    Case("tasks_broadcast_prompt", batch=5, tasks=MIXED, broadcast_prompt=True, m=4),
    Case("tasks_no_prompt", batch=5, tasks=MIXED, m=0),
    Case("tasks_batch_1", batch=1, tasks=(2,)),
    Case("tasks_one_task_int32", batch=3, tasks=(0, 0, 0), int32_ids=True),
]


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


@pytest.mark.parametrize(
    "case",
    [
        Case("position", batch=5, tasks=MIXED),
        Case("position_ids", batch=5, tasks=MIXED, position_ids=True),
        Case("token", batch=5, tasks=MIXED, token=True),
    ],
    ids=lambda c: c.name,
)
def test_mixed_batch_equals_per_task_runs(backend, case):
    kw = make_inputs(case, torch.float32, torch.float32)
    out, grads, grad_out = run(dept_embedding, kw)
    names = ["prompt", "lora_a", "lora_b"]
    task_ids = kw.pop("task_ids")
    for k in task_ids.unique().tolist():
        mine = task_ids == k
        # Task k's samples on their own, with task k's (2-D) parameters.
        single = {**kw, "input_ids": kw["input_ids"][mine]}
        single.update({n: kw[n][k].detach().requires_grad_() for n in names})
        if case.position_ids:
            single["position_ids"] = kw["position_ids"][mine]
        out_k, grads_k, _ = run(dept_embedding, single, grad_out[mine])
        assert_close(out[mine], out_k, torch.float32)
        for g, g_k in zip(grads, grads_k, strict=True):
            assert_close(g[k], g_k, torch.float32)
    unused = max(case.tasks) + 1
    assert all(not g[unused].any() for g in grads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("token", [False, True], ids=["position", "token"])
def test_weight_gradient_when_it_trains(backend, token, dtype):
    # 10 tokens of a 50-row table: the table's gradient is written from segment sums.
    kw = make_inputs(Case("w", token=token), dtype, dtype)
    kw["weight"].requires_grad_()
    out, grads, grad_out = run(dept_embedding, kw)
    ref, ref_grads, _ = run(reference_dept_embedding, kw, grad_out)
    assert_close(out, ref, dtype)
    assert len(grads) == 4
    for g, rg in zip(grads, ref_grads, strict=True):
        assert g.dtype == rg.dtype
        assert_close(g, rg, dtype)


@pytest.mark.parametrize("tasks", [None, MIXED], ids=["single", "tasks"])
@pytest.mark.parametrize("position_ids", [False, True], ids=["positions", "position_ids"])
def test_frozen_prompt_trainable_lowrank(backend, tasks, position_ids):
    # Only the low-rank pair trains: the prompt rows still offset the token rows.
    case = Case("frozen_prompt", batch=5, tasks=tasks, position_ids=position_ids)
    kw = make_inputs(case, torch.float32, torch.float32)
    kw["prompt"] = kw["prompt"].detach()
    _, grads, grad_out = run(dept_embedding, kw)
    _, ref_grads, _ = run(reference_dept_embedding, kw, grad_out)
    assert len(grads) == 2
    for g, rg in zip(grads, ref_grads, strict=True):
        assert_close(g, rg, torch.float32)


def test_frozen_weight_gets_no_gradient(backend):
    kw = make_inputs(Case("frozen"), torch.float32, torch.float32)
    out = dept_embedding(**kw)
    out.sum().backward()
    assert kw["weight"].grad is None
    assert kw["prompt"].grad is not None and kw["lora_a"].grad is not None


@pytest.mark.parametrize(
    "case",
    [
        Case("empty_batch", batch=0),
        Case("empty_seq", seq=0),
        Case("empty_batch_tasks", batch=0, tasks=()),
        Case("empty_seq_tasks", seq=0, tasks=(1, 0)),
    ],
    ids=lambda c: c.name,
)
def test_empty(backend, case):
    kw = make_inputs(case, torch.float32, torch.float32)
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


@pytest.mark.parametrize(
    "case",
    [Case("pos"), Case("ids", position_ids=True), Case("tasks", tasks=(1, 0, 1, 0))],
    ids=lambda c: c.name,
)
def test_saved_tensors_hold_no_activation_sized_tensor(backend, case):
    case = dataclasses.replace(case, batch=4, seq=8, max_len=8, d=40, r=3)
    kw = make_inputs(case, torch.float32, torch.float32)
    saved: list[torch.Tensor] = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        dept_embedding(**{k: val for k, val in kw.items() if not k.startswith("_")})
    assert saved, "the op saves ids and the low-rank factors"
    # The factors themselves are saved (stacked per task they may outgrow one (s, d) row
    # block); anything else must be smaller than that.
    factors = {kw["lora_a"].data_ptr(), kw["lora_b"].data_ptr()}
    activation = case.seq * case.d
    others = [t.shape for t in saved if t.data_ptr() not in factors]
    assert all(shape.numel() < activation for shape in others), others


COMPILE_CASES = [
    Case("compile", position_ids=True),
    Case("compile_tasks", batch=5, tasks=MIXED, position_ids=True),
]


# The backends of the test device; triton only compiled (its interpreter under
# torch.compile would only repeat the eager check, slowly).
COMPILED_BACKENDS = [n for n in BACKENDS if n != "triton" or DEVICE == "cuda"]


def test_package_calls_no_builtin_older_dynamo_cannot_trace():
    """`locals()` (or a bare `vars()`) in the ops' path made `torch.compile(fullgraph=True)`
    fail under torch 2.11's Dynamo (the H200 run, bench/results/README.md); CI's torch traces
    it, so the fullgraph tests below cannot see it: the source is read instead."""
    root = pathlib.Path(dept_kernels.__file__).parent
    found = [
        f"{path.relative_to(root)}:{node.lineno}"
        for path in sorted(root.rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and (node.func.id == "locals" or (node.func.id == "vars" and not node.args))
    ]
    assert not found, f"calls of locals()/vars() in dept_kernels: {found}"


@pytest.mark.parametrize("case", COMPILE_CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("name", COMPILED_BACKENDS)
def test_torch_compile_fullgraph(name, case):
    kw = make_inputs(case, torch.float32, torch.float32)
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
            task_ids=args.get("task_ids"),
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


@pytest.mark.parametrize("case", COMPILE_CASES, ids=lambda c: c.name)
# None: the backend compiled graphs pass, resolved by the op at run time.
@pytest.mark.parametrize("name", [*COMPILED_BACKENDS, None])
def test_opcheck(name, case):
    kw = make_inputs(case, torch.float32, torch.float32)
    task_ids = kw.get("task_ids")
    args = (
        kw["input_ids"],
        kw["weight"],
        kw["prompt"],
        kw["lora_a"],
        kw["lora_b"],
        kw["position_ids"],
        task_ids,
        0 if task_ids is None else kw["prompt"].shape[0],
        0.7,
        "token" if case.token else "position",
        name,
    )
    torch.library.opcheck(torch.ops.dept_kernels.dept_embedding.default, args)


@pytest.mark.parametrize(
    "case",
    [
        Case("r0", r=0),
        Case("r0_position_ids", r=0, position_ids=True),
        Case("r0_token", r=0, token=True),
        Case("r0_tasks", r=0, batch=5, tasks=MIXED),
        Case("r0_no_prompt_tasks", r=0, m=0, batch=5, tasks=MIXED),
    ],
    ids=lambda c: c.name,
)
def test_rank_zero_gives_lowrank_factors_zero_gradients(backend, case):
    """With r = 0 the factors are defined but unused: zero gradients of their (empty)
    shapes, as autograd gives any unused parameter it reaches, not None."""
    kw = make_inputs(case, torch.float32, torch.float32)
    out, grads, grad_out = run(dept_embedding, kw)
    ref, ref_grads, _ = run(reference_dept_embedding, kw, grad_out)
    assert_close(out, ref, torch.float32)
    for param, g, rg in zip(leaves(kw), grads, ref_grads, strict=True):
        assert g.shape == param.shape
        assert_close(g, rg, torch.float32)


def test_zero_scaling_gives_lowrank_factors_zero_gradients(backend):
    kw = {**make_inputs(Case("s0"), torch.float32, torch.float32), "scaling": 0.0}
    out, grads, grad_out = run(dept_embedding, kw)
    ref, ref_grads, _ = run(reference_dept_embedding, kw, grad_out)
    assert_close(out, ref, torch.float32)
    for param, g, rg in zip(leaves(kw), grads, ref_grads, strict=True):
        assert g.shape == param.shape
        assert_close(g, rg, torch.float32)
    assert not grads[1].any() and not grads[2].any()  # lora_a, lora_b


def test_one_column_weight_with_any_last_stride(backend):
    """d = 1: a (V, 1) table counts as contiguous whatever its last stride, so
    `contiguous()` kept it and the C++ kernels refused it (RuntimeError on valid input)."""
    kw = make_inputs(Case("d1", d=1), torch.float32, torch.float32)
    kw["weight"] = kw["weight"].reshape(1, -1).clone().T  # (V, 1), strides (1, V)
    assert kw["weight"].is_contiguous() and kw["weight"].stride(-1) != 1
    out, grads, grad_out = run(dept_embedding, kw)
    ref, ref_grads, _ = run(reference_dept_embedding, kw, grad_out)
    assert_close(out, ref, torch.float32)
    for g, rg in zip(grads, ref_grads, strict=True):
        assert_close(g, rg, torch.float32)


@pytest.mark.parametrize(
    "name", ["official_dept_embedding", "reference_aot_bias_add", "reference_dept_embedding"]
)
def test_oracles_moved_to_testing_stay_importable_from_ops(name):
    import dept_kernels.ops
    import dept_kernels.testing

    with pytest.warns(DeprecationWarning, match=f"moved to dept_kernels.testing.{name}"):
        moved = getattr(dept_kernels.ops, name)
    assert moved is getattr(dept_kernels.testing, name)


def test_public_op_takes_no_switch_that_skips_the_range_checks():
    """Range checks are not optional in the public op: the library's hooks, whose own read
    covered the ranges, use the private entry point (`ops.dept_embedding.embed`)."""
    kw = make_inputs(Case("base"), torch.float32, torch.float32)
    for name in ("ids_checked", "_ids_checked", "checked"):
        with pytest.raises(TypeError, match=name):
            dept_embedding(**kw, **{name: True})


# The cpu kernel writes outputs larger than the cache with streaming stores (the rows'
# vector-aligned bodies; the ends, unaligned at this odd d, with ordinary stores; bf16 and
# fp16 only where the build has AVX-512, else they take ordinary stores here too). Each
# case's layout: the kernel path, then the same path at a batch small enough for ordinary
# stores (the table of rows needs 4 tokens per row of lora_a, so chunks of 4 samples).
STREAM_CASES = [
    Case("position", seq=1025, max_len=1025, d=1027),
    Case("position_ids_table", seq=1025, max_len=1025, d=1027, position_ids=True),
    Case("prompt_tuning", seq=1025, max_len=1025, d=1027, lowrank=False),
    Case("tasks", seq=1025, max_len=1025, d=1027, tasks=(1, 0) * 8),
]


@pytest.mark.skipif(DEVICE != "cpu" or "cpu" not in BACKENDS, reason="the cpu kernel's stores")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", STREAM_CASES, ids=lambda c: c.name)
def test_cpu_streaming_stores_write_what_ordinary_stores_write(case, dtype):
    module = dept_kernels.backends.load("cpu").module
    threshold = module.stream_threshold()
    if threshold < 0:
        pytest.skip("no streaming stores on this target")
    row_bytes = (case.m + case.seq) * case.d * dtype.itemsize
    chunk = 4
    assert chunk * row_bytes <= threshold, "the chunks must take ordinary stores"
    batch = chunk * (threshold // (chunk * row_bytes) + 1)  # just past the threshold
    if case.tasks is not None:
        case = dataclasses.replace(case, tasks=tuple(case.tasks[i % 2] for i in range(batch)))
    case = dataclasses.replace(case, batch=batch, vocab=64)
    kw = {k: v for k, v in make_inputs(case, dtype, dtype).items() if k[0] != "_"}
    with torch.no_grad(), dept_kernels.use_backend("cpu"):
        out = dept_embedding(**kw)
        assert out.nbytes > threshold
        per_sample = ("input_ids", "position_ids", "task_ids")
        for lo in range(0, batch, chunk):
            part = {k: v[lo : lo + chunk] if k in per_sample else v for k, v in kw.items()}
            assert torch.equal(out[lo : lo + chunk], dept_embedding(**part))
        assert_close(out, reference_dept_embedding(**kw), dtype)
