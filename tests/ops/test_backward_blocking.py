"""The DePT backward's one-read batch sums: the boundaries of the kernels' tiles (odd widths,
column tails, batches of 1 and of a few samples), the prompt rows summed in the same pass as
the token rows, thread counts and determinism, on every backend, against the formula."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import BACKENDS, assert_close
from helpers.ops import DTYPES, Case, make_inputs, run, spy_grad_reads

from dept_kernels import backends
from dept_kernels.ops import dept_embedding
from dept_kernels.testing import reference_dept_embedding

CASES = [
    # d odd (a column tail), s not a multiple of a row tile, B not a multiple of 4.
    Case("odd_d", batch=5, seq=13, max_len=16, d=771, m=3),
    Case("batch_1", batch=1, seq=11, max_len=11, d=257, m=2),
    Case("batch_4", batch=4, seq=7, max_len=9, d=64, m=5),
    Case("no_prompt", batch=6, seq=9, max_len=9, d=129, m=0),
    # Wide rows: many column tiles, then a tail of 3.
    Case("wide", batch=3, seq=3, max_len=4, d=4099, m=1, r=3),
    # Per-sample rows with repeats: the segmented path, prompt rows as its first segments.
    Case("position_ids", batch=5, seq=13, max_len=6, d=771, m=3, position_ids=True),
    Case("position_ids_no_prompt", batch=3, seq=7, max_len=4, d=65, m=0, position_ids=True),
    Case("token_mode", batch=5, seq=9, vocab=7, d=130, m=2, token=True),
    # Every token reads row 0: one segment holds most tokens, so its columns are split
    # among the threads.
    Case("one_row", batch=4, seq=9, max_len=1, d=771, m=2, position_ids=True),
]


def formula_grads(kw: dict, grad_out: torch.Tensor) -> list[torch.Tensor]:
    """[dP, dA, dB] from the definitions, in float64: dP = sum_b G[b, :m];
    S[l] = sum of G[b, m + t] over the tokens reading row l; dA = c S B^T; dB = c A^T S."""
    # On the CPU in float64 whatever the test device, then moved back for the comparison.
    g = grad_out.double().cpu()
    batch, seq = kw["input_ids"].shape
    m = kw["prompt"].shape[0] if "prompt" in kw else 0
    a, b = kw["lora_a"].detach().double().cpu(), kw["lora_b"].detach().double().cpu()
    if kw.get("index") == "token":
        rows = kw["input_ids"].long().cpu()
    elif "position_ids" in kw:
        rows = kw["position_ids"].long().cpu()
    else:
        rows = torch.arange(seq).expand(batch, seq)
    sums = torch.zeros(a.shape[0], g.shape[-1], dtype=torch.float64)
    for i in range(batch):
        for t in range(seq):
            sums[rows[i, t]] += g[i, m + t]
    grads = [g[:, :m].sum(0)] if m else []
    grads += [kw["scaling"] * sums @ b.T, kw["scaling"] * a.T @ sums]
    return [x.to(grad_out.device) for x in grads]


@pytest.mark.parametrize("wdtype,pdtype", DTYPES, ids=lambda t: str(t).split(".")[-1])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_matches_reference(backend, case, wdtype, pdtype):
    kw = make_inputs(case, wdtype, pdtype)
    _, grads, grad_out = run(dept_embedding, kw)
    _, ref_grads, _ = run(reference_dept_embedding, kw, grad_out)
    for g, rg, fg in zip(grads, ref_grads, formula_grads(kw, grad_out), strict=True):
        assert g.dtype == rg.dtype
        assert_close(g, rg, wdtype)
        assert_close(g, fg, wdtype)


@pytest.mark.parametrize("case", [CASES[0], CASES[4], CASES[5]], ids=lambda c: c.name)
def test_thread_counts_give_the_same_bits(backend, case):
    """Each sum runs over the batch in order, whatever the split the thread count picks."""
    kw = make_inputs(case, torch.float32, torch.float32)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 7):
            torch.set_num_threads(n)
            results.append(run(dept_embedding, kw)[1])
    finally:
        torch.set_num_threads(threads)
    for grads in results[1:]:
        for g, g1 in zip(grads, results[0], strict=True):
            assert torch.equal(g, g1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", [CASES[0], CASES[5]], ids=lambda c: c.name)
def test_deterministic(backend, case, dtype):
    kw = make_inputs(case, dtype, dtype)
    first = run(dept_embedding, kw)[1]
    second = run(dept_embedding, kw)[1]
    for g, g2 in zip(first, second, strict=True):
        assert torch.equal(g, g2)


def test_prompt_rows_in_the_same_reduce(backend, monkeypatch):
    """Prompt and factors both trained: one reduce call covers the m + s rows, so grad_out
    is read once; a backend with the fused position-mode backward makes that one call
    instead, and no `reduce`."""
    kw = make_inputs(CASES[0], torch.float32, torch.float32)
    kernels = backends.load(backend)
    name = "reduce" if getattr(kernels, "reduce_lowrank", None) is None else "reduce_lowrank"
    calls = spy_grad_reads(kernels, monkeypatch)
    run(dept_embedding, kw)
    case = CASES[0]
    # The fused kernel is told the prompt's length; `reduce` sums all rows (m = 0).
    m = case.m if name == "reduce_lowrank" else 0
    assert [(n, tuple(g.shape), mm) for n, g, mm in calls] == [
        (name, (case.batch, case.m + case.seq, case.d), m)
    ]
    if backend == "cpu":
        assert name == "reduce_lowrank"


# The cpu backend's fused position-mode backward (`reduce_lowrank`): its own edges, each
# thread count's branch (two threads run the GEMMs at once, others in turn), and the layouts
# `reduce` takes.
LOWRANK_CASES = [
    # (batch, m, s, L, d, r)
    (5, 3, 13, 16, 771, 4),
    (1, 0, 7, 7, 64, 1),
    (4, 2, 9, 30, 4099, 3),  # L > s: rows s.. of dA stay zero
    (3, 4, 0, 5, 33, 2),  # prompt rows only
]


def _lowrank_formula(grad, m, a, b, scaling):
    """[prompt sums, dA, dB] in float64; with bf16 factors the GEMMs take the token rows'
    sums rounded to fp32 (as the kernel forms them) and then to bf16 (docs/design.md §2)."""
    g = grad.double()
    sums = g.sum(0)
    tokens = sums[m:]
    if a.dtype == torch.bfloat16:
        tokens = tokens.float().bfloat16().double()
    d_a = torch.zeros(a.shape, dtype=torch.float64)
    d_a[: tokens.shape[0]] = scaling * tokens @ b.double().T
    d_b = scaling * a.double()[: tokens.shape[0]].T @ tokens
    return sums[:m], d_a, d_b


def _assert_rounded_once(got: torch.Tensor, want: torch.Tensor) -> None:
    """bf16 `got` within one rounding of the float64 `want` (bf16's unit roundoff, 2^-8
    relative: 8 significant bits), plus the fp32 GEMM's own error (fp32 tolerance of the
    largest element)."""
    assert got.dtype == torch.bfloat16
    scale = max(1.0, want.abs().max().item()) if want.numel() else 1.0
    torch.testing.assert_close(got.double(), want, rtol=2.0**-8, atol=1e-5 * scale)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the cpu backend is not available")
@pytest.mark.parametrize("threads", [1, 2, 7])
@pytest.mark.parametrize("factors", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", LOWRANK_CASES, ids=str)
def test_cpu_reduce_lowrank_matches_the_formula(shape, dtype, factors, threads):
    batch, m, seq, max_len, d, r = shape
    gen = torch.Generator().manual_seed(sum(shape))
    grad = torch.randn(batch, m + seq, d, generator=gen).to(dtype)
    a = torch.randn(max_len, r, generator=gen).to(factors)
    b = torch.randn(r, d, generator=gen).to(factors)
    kernel = backends.load("cpu").reduce_lowrank
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        sums, d_a, d_b = kernel(grad, m, a, b, 0.7)
    finally:
        torch.set_num_threads(before)
    want_sums, want_a, want_b = _lowrank_formula(grad, m, a, b, 0.7)
    # fp32 sums of the (exact) half-precision values: fp32 tolerance in every dtype.
    assert sums.dtype == torch.float32
    assert_close(sums, want_sums.float(), torch.float32)
    for got, want in ((d_a, want_a), (d_b, want_b)):
        if factors == torch.float32:
            assert got.dtype == torch.float32
            assert_close(got, want.float(), torch.float32)
        else:
            _assert_rounded_once(got, want)
    assert not d_a[seq:].any()


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the cpu backend is not available")
def test_cpu_reduce_lowrank_edges_and_layouts():
    kernel = backends.load("cpu").reduce_lowrank
    gen = torch.Generator().manual_seed(3)
    a, b = torch.randn(9, 2, generator=gen), torch.randn(2, 17, generator=gen)
    # No sample: zero prompt sums and gradients, of their shapes.
    sums, d_a, d_b = kernel(torch.empty(0, 11, 17), 2, a, b, 1.0)
    assert sums.shape == (2, 17) and not sums.any() and not d_a.any() and not d_b.any()
    # The text columns of a wider output (a view with a larger batch stride), under
    # inference mode, where the GEMMs' pool thread must see the caller's mode.
    wide = torch.randn(4, 15, 17, generator=gen)
    view = wide[:, :11]
    with torch.inference_mode():
        got = kernel(view, 2, a, b, 0.5)
    for x, want in zip(got, _lowrank_formula(view, 2, a, b, 0.5), strict=True):
        assert_close(x, want.float(), torch.float32)
    with pytest.raises(RuntimeError, match="lora_a must be"):
        kernel(view, 0, a, b, 1.0)  # s = 11 rows, more than L = 9
    # bf16 factors under inference mode too: their GEMMs write bf16 results on the pool
    # thread.
    a16, b16 = a.bfloat16(), b.bfloat16()
    with torch.inference_mode():
        got = kernel(view, 2, a16, b16, 0.5)
    want = _lowrank_formula(view, 2, a16, b16, 0.5)
    assert_close(got[0], want[0].float(), torch.float32)
    for x, w in zip(got[1:], want[1:], strict=True):
        _assert_rounded_once(x, w)
    # Factors that are views with other strides (a transposed parameter), fp32 and bf16.
    for fa, fb in ((a, b), (a16, b16)):
        sa, sb = fa.t().contiguous().t(), fb.t().contiguous().t()
        assert not sa.is_contiguous() and not sb.is_contiguous()
        got = kernel(view, 2, sa, sb, 0.5)
        want = _lowrank_formula(view, 2, fa, fb, 0.5)
        assert_close(got[0], want[0].float(), torch.float32)
        for x, w in zip(got[1:], want[1:], strict=True):
            assert x.is_contiguous()
            if fa.dtype == torch.float32:
                assert_close(x, w.float(), torch.float32)
            else:
                _assert_rounded_once(x, w)
    for bad in ((a.double(), b), (a16, b), (a.half(), b.half())):
        with pytest.raises(RuntimeError, match="both fp32 or both bf16"):
            kernel(view, 2, *bad, 1.0)


# The backward under a Python dispatch mode that runs the library's custom-op bodies under
# itself (as `helpers.syncs.SyncCounter` does), with two threads: the cpu `reduce_lowrank`
# runs its GEMMs on a pool thread, which must not dispatch into Python while the caller,
# holding the GIL, waits for it (an earlier version deadlocked here). In a subprocess, so a
# hang fails the test instead of stopping the suite.
_UNDER_A_MODE = """
import torch
from helpers.syncs import SyncCounter
import dept_kernels
from dept_kernels.ops import dept_embedding
torch.set_num_threads(2)
g = torch.Generator().manual_seed(0)
batch, seq, d, m, r = 4, 16, 64, 3, 4
kw = dict(
    input_ids=torch.randint(0, 50, (batch, seq), generator=g),
    weight=torch.randn(50, d, generator=g),
    prompt=torch.randn(m, d, generator=g, requires_grad=True),
    lora_a=torch.randn(seq, r, generator=g, requires_grad=True),
    lora_b=torch.randn(r, d, generator=g, requires_grad=True),
    scaling=0.5,
)
grad_out = torch.randn(batch, m + seq, d, generator=g)
# fp32, then bf16 throughout (its factors' GEMMs in bf16).
for dtype in (torch.float32, torch.bfloat16):
    names = ("prompt", "lora_a", "lora_b")
    params = [kw[k].detach().to(dtype).requires_grad_() for k in names]
    args = {**kw, "weight": kw["weight"].to(dtype), **dict(zip(names, params))}
    with dept_kernels.use_backend("cpu"):
        plain = torch.autograd.grad(dept_embedding(**args), params, grad_out.to(dtype))
        with SyncCounter():
            under = torch.autograd.grad(dept_embedding(**args), params, grad_out.to(dtype))
    assert all(torch.equal(a, b) for a, b in zip(plain, under, strict=True))
print("ok")
"""


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the cpu backend is not available")
def test_cpu_backward_under_a_python_dispatch_mode_with_two_threads():
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), str(root / "tests")])}
    run = subprocess.run(
        [sys.executable, "-c", _UNDER_A_MODE], capture_output=True, text=True, env=env, timeout=240
    )
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-3000:]
