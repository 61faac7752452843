"""AoT ops: gather-add and both reparameterisations against the formulas, every backend."""

from __future__ import annotations

import pytest
import torch
from helpers import DEVICE, assert_close, randint, randn, tensor
from helpers.aot import check_dropout_per_distinct_id

from dept_kernels.ops import (
    aot_bias_add,
    aot_fc_bias,
    aot_kron_bias,
    fc_rows,
    kron_rows,
)
from dept_kernels.testing import reference_aot_bias_add

DTYPES = [
    (torch.float32, torch.float32),
    (torch.float16, torch.float16),
    (torch.bfloat16, torch.bfloat16),
    (torch.bfloat16, torch.float32),  # bf16 activations, fp32 adapter
]
dtype_ids = ["fp32", "fp16", "bf16", "bf16-fp32"]


def grads(out, params, grad_out):
    return torch.autograd.grad(out, params, grad_out)


def check(out, ref, params, dtype, seed=1):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE, out.dtype)
    assert out.dtype == ref.dtype and out.shape == ref.shape
    assert_close(out, ref, dtype)
    for a, b in zip(grads(out, params, g), grads(ref, params, g), strict=True):
        assert a.dtype == b.dtype
        assert_close(a, b, dtype)


def ids_with_repeats(batch, seq, vocab, gen):
    """Ids drawn from a few values so most rows repeat, plus one unique id per sample."""
    ids = randint(min(vocab, 4), batch, seq, gen=gen)
    if seq:
        ids[:, -1] = randint(vocab, batch, gen=gen)
    return ids


@pytest.mark.parametrize("hdtype,pdtype", DTYPES, ids=dtype_ids)
@pytest.mark.parametrize("stacked", [False, True], ids=["single", "tasks"])
@pytest.mark.parametrize("batch,seq,d", [(2, 5, 33), (1, 7, 64), (3, 1, 17)])
def test_bias_add(backend, hdtype, pdtype, stacked, batch, seq, d):
    gen = torch.Generator().manual_seed(0)
    vocab = 13
    hidden = randn(batch, seq, d, gen=gen, dtype=hdtype).requires_grad_()
    ids = ids_with_repeats(batch, seq, vocab, gen)
    shape = (3, vocab, d) if stacked else (vocab, d)
    table = randn(*shape, gen=gen, dtype=pdtype).requires_grad_()
    task_ids = randint(3, batch, gen=gen) if stacked else None
    out = aot_bias_add(hidden, ids, table, task_ids=task_ids)
    ref = reference_aot_bias_add(hidden, ids, table, task_ids=task_ids)
    check(out, ref, (hidden, table), hdtype)


def test_bias_add_int32_ids_and_frozen_table(backend):
    gen = torch.Generator().manual_seed(0)
    hidden = randn(2, 6, 20, gen=gen).requires_grad_()
    ids = randint(9, 2, 6, gen=gen).int()
    table = randn(9, 20, gen=gen)
    out = aot_bias_add(hidden, ids, table)
    check(out, reference_aot_bias_add(hidden, ids, table), (hidden,), torch.float32)


@pytest.mark.parametrize("hdtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_bias_add_inplace(backend, hdtype):
    gen = torch.Generator().manual_seed(0)
    hidden = randn(2, 5, 24, gen=gen, dtype=hdtype)
    ids = randint(7, 2, 5, gen=gen)
    table = randn(7, 24, gen=gen)
    expected = reference_aot_bias_add(hidden, ids, table)
    with torch.no_grad():
        out = aot_bias_add(hidden, ids, table, inplace=True)
    assert out is hidden
    assert_close(hidden, expected, hdtype)


def test_bias_add_inplace_refuses_autograd(backend):
    hidden = randn(1, 2, 4).requires_grad_()
    with pytest.raises(RuntimeError, match="inference"):
        aot_bias_add(
            hidden, torch.zeros(1, 2, dtype=torch.long, device=DEVICE), randn(3, 4), inplace=True
        )


def test_bias_add_empty(backend):
    hidden = randn(0, 4, 8).requires_grad_()
    table = randn(5, 8).requires_grad_()
    out = aot_bias_add(hidden, torch.zeros(0, 4, dtype=torch.long, device=DEVICE), table)
    assert out.shape == (0, 4, 8)
    out.sum().backward()
    assert torch.equal(table.grad, torch.zeros_like(table))


def kron_factors(a, b, r, d, gen, dtype=torch.float32):
    return [
        randn(*shape, gen=gen, dtype=dtype).requires_grad_()
        for shape in ((a, r), (b, r), (r * r, d))
    ]


@pytest.mark.parametrize("hdtype,pdtype", DTYPES, ids=dtype_ids)
@pytest.mark.parametrize("vocab,a,b", [(20, 4, 5), (17, 3, 7)], ids=["exact", "V<a*b"])
def test_kron_matches_full_table(backend, hdtype, pdtype, vocab, a, b):
    gen = torch.Generator().manual_seed(0)
    d, r = 33, 3
    hidden = randn(2, 6, d, gen=gen, dtype=hdtype).requires_grad_()
    ids = ids_with_repeats(2, 6, vocab, gen)
    w_l, w_m, w_r = kron_factors(a, b, r, d, gen, pdtype)
    out = aot_kron_bias(hidden, ids, w_l, w_m, w_r)
    # The oracle materialises all V rows from the formula, P_x = Σ_pq W_L[i,p] W_M[j,q] W_R[pr+q].
    x = torch.arange(vocab, device=DEVICE)
    i, j = x // b, x % b
    full = torch.einsum("xp,xq,pqd->xd", w_l[i].float(), w_m[j].float(), w_r.float().view(r, r, d))
    ref = reference_aot_bias_add(hidden, ids, full.to(pdtype))
    check(out, ref, (hidden, w_l, w_m, w_r), hdtype)


def fc_factors(e, r, d, gen, dtype=torch.float32):
    return [
        randn(*shape, gen=gen, dtype=dtype).requires_grad_()
        for shape in ((e, r), (r,), (r, d), (d,))
    ]


@pytest.mark.parametrize("hdtype,pdtype", DTYPES, ids=dtype_ids)
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_fc_matches_full_table(backend, hdtype, pdtype, activation):
    gen = torch.Generator().manual_seed(0)
    vocab, e, d, r = 15, 10, 33, 4
    hidden = randn(2, 6, d, gen=gen, dtype=hdtype).requires_grad_()
    ids = ids_with_repeats(2, 6, vocab, gen)
    embedding = randn(vocab, e, gen=gen, dtype=hdtype)
    w1, b1, w2, b2 = fc_factors(e, r, d, gen, pdtype)
    out = aot_fc_bias(hidden, ids, embedding, w1, b1, w2, b2, activation=activation)
    act = torch.nn.functional.relu if activation == "relu" else torch.nn.functional.gelu
    full = act(embedding.to(pdtype) @ w1 + b1) @ w2 + b2
    ref = reference_aot_bias_add(hidden, ids, full)
    check(out, ref, (hidden, w1, b1, w2, b2), hdtype)


def test_rows_helpers_agree_with_per_token_evaluation():
    gen = torch.Generator().manual_seed(0)
    ids = randint(12, 3, 4, gen=gen)
    w_l, w_m, w_r = kron_factors(3, 4, 2, 8, gen)
    per_token = kron_rows(ids.reshape(-1), w_l, w_m, w_r).view(3, 4, 8)
    table = kron_rows(torch.arange(12, device=DEVICE), w_l, w_m, w_r)
    torch.testing.assert_close(per_token, table[ids])
    w1, b1, w2, b2 = fc_factors(8, 3, 8, gen)
    emb = randn(12, 8, gen=gen)
    torch.testing.assert_close(
        fc_rows(ids.reshape(-1), emb, w1, b1, w2, b2).view(3, 4, 8),
        fc_rows(torch.arange(12, device=DEVICE), emb, w1, b1, w2, b2)[ids],
    )


@pytest.mark.parametrize("reparam", ["kron", "fc"])
def test_dropout_reproducible_under_seed_and_per_id(backend, reparam):
    gen = torch.Generator().manual_seed(0)
    d = 16
    hidden = torch.zeros(2, 8, d, device=DEVICE)
    ids = tensor([[1, 2, 1, 3, 1, 2, 0, 4]] * 2)
    if reparam == "kron":
        w = kron_factors(2, 3, 2, d, gen)

        def run():
            return aot_kron_bias(hidden, ids, *w, dropout_p=0.5)

    else:
        emb = randn(5, 6, gen=gen)
        w = fc_factors(6, 3, d, gen)
        w[0].data.abs_()  # positive pre-activations: dropped inputs show in the output

        def run():
            return aot_fc_bias(hidden, ids, emb, *w, dropout_p=0.5)

    check_dropout_per_distinct_id(run)


BAD = [
    ("hidden_2d", dict(hidden=randn(2, 4)), ValueError, "hidden must be 3-D"),
    (
        "ids_shape",
        dict(input_ids=torch.zeros(2, 3, device=DEVICE).long()),
        ValueError,
        "input_ids shape",
    ),
    (
        "ids_float",
        dict(input_ids=torch.zeros(2, 4, device=DEVICE)),
        TypeError,
        "input_ids must be int64",
    ),
    (
        "id_range",
        dict(input_ids=torch.full((2, 4), 9, device=DEVICE)),
        IndexError,
        r"input_ids.*\[0, 9\)",
    ),
    ("negative", dict(input_ids=torch.full((2, 4), -1, device=DEVICE)), IndexError, "negative"),
    ("width", dict(table=randn(9, 5)), ValueError, "table has width"),
    ("tasks_missing", dict(table=randn(2, 9, 6)), ValueError, "need task_ids"),
    (
        "tasks_unneeded",
        dict(task_ids=torch.zeros(2, device=DEVICE).long()),
        ValueError,
        "stacked tables",
    ),
    (
        "task_range",
        dict(table=randn(2, 9, 6), task_ids=tensor([0, 2])),
        IndexError,
        r"task_ids.*\[0, 2\)",
    ),
    (
        "task_count",
        dict(table=randn(2, 9, 6), task_ids=tensor([0])),
        ValueError,
        "task_ids has 1 entries",
    ),
    ("table_device", dict(table=torch.randn(9, 6, device="meta")), ValueError, "table is on meta"),
]


@pytest.mark.parametrize("name,over,exc,match", BAD, ids=[b[0] for b in BAD])
def test_bias_add_bad_input(backend, name, over, exc, match):
    kw = dict(
        hidden=randn(2, 4, 6), input_ids=torch.zeros(2, 4, device=DEVICE).long(), table=randn(9, 6)
    )
    kw.update(over)
    with pytest.raises(exc, match=match):
        aot_bias_add(**kw)


def test_reparam_bad_input():
    gen = torch.Generator().manual_seed(0)
    hidden, ids = randn(1, 3, 8), tensor([[0, 5, 11]])
    w_l, w_m, w_r = kron_factors(3, 4, 2, 8, gen)
    with pytest.raises(IndexError, match=r"input_ids holds id 12"):
        aot_kron_bias(hidden, ids + 1, w_l, w_m, w_r)
    with pytest.raises(ValueError, match="disagree on r"):
        aot_kron_bias(hidden, ids, w_l, w_m, w_r[:3])
    with pytest.raises(ValueError, match="dropout_p"):
        aot_kron_bias(hidden, ids, w_l, w_m, w_r, dropout_p=1.0)
    w1, b1, w2, b2 = fc_factors(8, 3, 8, gen)
    emb = randn(12, 8)
    with pytest.raises(ValueError, match="activation"):
        aot_fc_bias(hidden, ids, emb, w1, b1, w2, b2, activation="swish")
    with pytest.raises(ValueError, match="FC shapes disagree"):
        aot_fc_bias(hidden, ids, emb, w1, b1, w2[:, :4], b2)


@pytest.mark.parametrize("stacked", [False, True], ids=["single", "tasks"])
def test_bias_add_inplace_into_a_view_of_its_table_adds_the_rows_as_they_were(backend, stacked):
    """`hidden` a view of `table`: the in-place add must read the table as it was before the
    call, as the formula does, not rows that earlier tokens (or kernel tiles) already
    updated. 64 tokens span several kernel tiles, and the last ones read the first rows."""
    d = 8
    table = randn(2, 40, d) if stacked else randn(80, d)
    hidden = table.view(-1, d)[:64].view(4, 16, d)
    ids = (63 - torch.arange(64, device=DEVICE)).view(4, 16)
    task_ids = None
    if stacked:
        ids = ids % 40
        task_ids = tensor([1, 1, 0, 0])  # flat row = task * 40 + id: 79 - n, then 15 - n'
    expected = reference_aot_bias_add(hidden.clone(), ids, table.clone(), task_ids=task_ids)
    with torch.no_grad():
        out = aot_bias_add(hidden, ids, table, task_ids=task_ids, inplace=True)
    assert out is hidden
    assert_close(hidden, expected, torch.float32)


def test_bias_add_inplace_with_ids_in_hidden_memory_reads_the_ids_as_they_were(backend):
    """int64 ids viewing the memory of `hidden` (which the in-place add overwrites): the op
    must range-check and gather with the ids as they were, never with the new bytes."""
    d, vocab = 8, 5
    hidden = randn(4, 16, d)
    ids = hidden.view(torch.int64).view(-1)[:64].view(4, 16)
    ids.copy_((torch.arange(64, device=DEVICE) % vocab).view(4, 16))
    table = randn(vocab, d)
    expected = reference_aot_bias_add(hidden.clone(), ids.clone(), table)
    with torch.no_grad():
        aot_bias_add(hidden, ids, table, inplace=True)
    assert_close(hidden, expected, torch.float32)


def test_public_aot_ops_take_no_switch_that_skips_the_range_checks(backend):
    """Range checks are not optional in the public ops: the library's own callers that have
    checked the ids already use private entry points."""
    gen = torch.Generator().manual_seed(0)
    hidden, ids = randn(1, 3, 8), tensor([[0, 5, 11]])
    w_l, w_m, w_r = kron_factors(3, 4, 2, 8, gen)
    w1, b1, w2, b2 = fc_factors(8, 3, 8, gen)
    calls = [
        lambda: aot_bias_add(hidden, ids, randn(12, 8), ids_checked=True),
        lambda: aot_kron_bias(hidden, ids, w_l, w_m, w_r, ids_checked=True),
        lambda: aot_fc_bias(hidden, ids, randn(12, 8), w1, b1, w2, b2, ids_checked=True),
    ]
    for call in calls:
        with pytest.raises(TypeError, match="ids_checked"):
            call()


def test_bias_add_one_column_inputs_with_any_last_stride(backend):
    """d = 1: torch counts a one-column tensor as contiguous whatever its last stride, so
    `contiguous()` does not give the unit stride the kernels need (triton recursed forever)."""
    gen = torch.Generator().manual_seed(0)
    table = randn(1, 7, gen=gen).T  # (7, 1), strides (1, 7)
    hidden = torch.as_strided(randn(6, gen=gen), (2, 3, 1), (3, 1, 5))
    ids = randint(7, 2, 3, gen=gen)
    assert table.is_contiguous() and table.stride(-1) != 1 and hidden.stride(-1) != 1
    out = aot_bias_add(hidden, ids, table)
    assert_close(out, reference_aot_bias_add(hidden, ids, table), torch.float32)
