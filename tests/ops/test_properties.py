"""Property-based tests: random shapes, dtypes, backends, index modes and task ids.

Each op draws 300 examples (derandomised, so CI runs the same ones every time) and checks
output and gradients against the differentiable reference.
"""

from __future__ import annotations

import torch
from helpers import BACKENDS, DEVICE, assert_close
from helpers.ops import DTYPES, Case, make_inputs, run
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dept_kernels
from dept_kernels.ops import aot_bias_add, dept_embedding
from dept_kernels.testing import reference_aot_bias_add, reference_dept_embedding

SETTINGS = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@st.composite
def dept_cases(draw) -> tuple[Case, torch.dtype, torch.dtype, str]:
    seq = draw(st.integers(0, 6))
    token = draw(st.booleans())
    lowrank = draw(st.booleans())
    batch = draw(st.integers(0, 3))
    m = draw(st.integers(0, 4))
    tasks = None
    # task_ids select stacked parameters, so they need a prompt or a low-rank pair.
    if (m or lowrank) and draw(st.booleans()):
        tasks = tuple(draw(st.lists(st.integers(0, 2), min_size=batch, max_size=batch)))
    case = Case(
        "drawn",
        batch=batch,
        seq=seq,
        max_len=seq + draw(st.integers(0 if seq else 1, 3)),
        d=draw(st.integers(1, 40)),
        vocab=draw(st.integers(1, 30)),
        m=m,
        r=draw(st.integers(1, 5)),
        lowrank=lowrank,
        int32_ids=draw(st.booleans()),
        position_ids=lowrank and not token and draw(st.booleans()),
        token=lowrank and token,
        broadcast_prompt=draw(st.booleans()),
        tasks=tasks,
    )
    wdtype, pdtype = draw(st.sampled_from(DTYPES))
    return case, wdtype, pdtype, draw(st.sampled_from(BACKENDS))


@SETTINGS
@given(dept_cases(), st.integers(0, 2**16))
def test_dept_embedding_matches_reference(drawn, seed):
    case, wdtype, pdtype, backend = drawn
    kw = make_inputs(case, wdtype, pdtype, seed=seed)
    with dept_kernels.use_backend(backend):
        out, grads, grad_out = run(dept_embedding, kw)
    ref, ref_grads, _ = run(reference_dept_embedding, kw, grad_out)
    assert out.shape == ref.shape
    assert_close(out, ref, wdtype)
    for g, rg in zip(grads, ref_grads, strict=True):
        assert_close(g, rg, wdtype)


@SETTINGS
@given(
    batch=st.integers(0, 3),
    seq=st.integers(0, 6),
    d=st.integers(1, 40),
    vocab=st.integers(1, 20),
    tasks=st.integers(0, 3),
    hdtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    tdtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    int32=st.booleans(),
    backend=st.sampled_from(BACKENDS),
    seed=st.integers(0, 2**16),
)
def test_aot_bias_add_matches_reference(
    batch, seq, d, vocab, tasks, hdtype, tdtype, int32, backend, seed
):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, seq, d, generator=g).to(DEVICE, hdtype).requires_grad_()
    ids = torch.randint(0, vocab, (batch, seq), generator=g).to(DEVICE)
    ids = ids.int() if int32 else ids
    shape = (tasks, vocab, d) if tasks else (vocab, d)
    table = torch.randn(shape, generator=g).to(DEVICE, tdtype).requires_grad_()
    task_ids = torch.randint(0, tasks, (batch,), generator=g).to(DEVICE) if tasks else None
    with dept_kernels.use_backend(backend):
        out = aot_bias_add(hidden, ids, table, task_ids=task_ids)
    ref = reference_aot_bias_add(hidden, ids, table, task_ids=task_ids)
    grad = torch.randn(out.shape, generator=g).to(DEVICE, hdtype)
    got = torch.autograd.grad(out, (hidden, table), grad)
    want = torch.autograd.grad(ref, (hidden, table), grad)
    assert_close(out, ref, hdtype)
    for a, b in zip(got, want, strict=True):
        assert a.dtype == b.dtype
        assert_close(a, b, a.dtype)
