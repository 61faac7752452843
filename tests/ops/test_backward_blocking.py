"""The DePT backward's one-read batch sums: the boundaries of the kernels' tiles (odd widths,
column tails, batches of 1 and of a few samples), the prompt rows summed in the same pass as
the token rows, thread counts and determinism, on every backend, against the formula."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close
from helpers.ops import DTYPES, Case, make_inputs, run

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
    is read once."""
    kw = make_inputs(CASES[0], torch.float32, torch.float32)
    kernels = backends.load(backend)
    calls = []
    reduce = kernels.reduce

    def spy(g, m, *args):
        calls.append((tuple(g.shape), m))
        return reduce(g, m, *args)

    monkeypatch.setattr(kernels, "reduce", spy)
    run(dept_embedding, kw)
    case = CASES[0]
    assert calls == [((case.batch, case.m + case.seq, case.d), 0)]
