"""Fuzzing the patched-model entry points: random architecture, method, batch, padding,
position ids, non-contiguous ids and backend, each forward checked against the unpatched
model fed the formula (`test_patch.reference_forward`); random bad arguments must raise a
Python exception naming the argument; concurrent threads each get their own result."""

from __future__ import annotations

import random
import threading

import pytest
import torch
from helpers.models import (
    ARCHS,
    BACKENDS,
    PAD,
    VOCAB,
    patched_pair,
    reference_forward,
)
from hypothesis import given, settings
from hypothesis import strategies as st

import dept_kernels as dk

METHODS = ("dept", "pt", "ept")
CPU_BACKENDS = [b for b in BACKENDS if b != "triton"]  # the interpreter is too slow here


def _case(rng: random.Random):
    arch, method = rng.choice(ARCHS), rng.choice(METHODS)
    b, s = rng.randint(1, 3), rng.randint(1, 10)
    ids = torch.randint(
        2, VOCAB, (b, s), generator=torch.Generator().manual_seed(rng.getrandbits(31))
    )
    mask = torch.ones(b, s, dtype=torch.long)
    padding = rng.choice(["none", "right", "left"]) if s > 1 else "none"
    positions = None
    for row in range(b):
        k = rng.randint(0, s - 1) if padding != "none" else 0
        if padding == "right" and k:
            ids[row, s - k :], mask[row, s - k :] = PAD, 0
        elif padding == "left" and k:
            ids[row, :k], mask[row, :k] = PAD, 0
    if padding == "left" and arch != "t5":
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
    elif padding == "left":  # T5 reads an encoder input: pad it on the right
        mask = mask.flip(-1)
        ids = ids.flip(-1)
    if rng.random() < 0.5:  # the same ids as a non-contiguous view
        ids = ids.t().contiguous().t()
    labels = torch.randint(2, VOCAB, (b, 4))
    return arch, method, ids, mask, labels, positions, rng.choice(CPU_BACKENDS)


def _check(arch, method, ids, mask, labels, positions, backend):
    base, model = patched_pair(arch, method)
    extra = {} if positions is None else {"position_ids": positions}
    target = labels if arch == "t5" else ids
    with dk.use_backend(backend):
        out = model(input_ids=ids, attention_mask=mask, labels=target, **extra)
    ref = reference_forward(arch, base, model.dept_adapter, ids, mask, labels, positions)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=1e-5)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**31 - 1))
def test_fuzz_patched_forward_equals_formula(seed):
    _check(*_case(random.Random(seed)))


BAD = [
    (lambda ids: ids.float(), TypeError, "input_ids must be int64 or int32"),
    (lambda ids: ids[0], ValueError, "input_ids must be 2-D"),
    (lambda ids: ids.clone().fill_(VOCAB + 3), IndexError, "input_ids holds id"),
    (lambda ids: ids.clone().fill_(-1), IndexError, "input_ids holds a negative id"),
]


@settings(max_examples=24, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**31 - 1), bad=st.sampled_from(range(len(BAD))))
def test_fuzz_bad_ids_raise_naming_the_argument(seed, bad):
    arch, method, ids, mask, _, _, backend = _case(random.Random(seed))
    _, model = patched_pair(arch, method)
    make, error, message = BAD[bad]
    bad_ids = make(ids)
    kwargs = {"attention_mask": mask} if bad_ids.dim() == 2 else {}
    with dk.use_backend(backend), pytest.raises(error, match=message):
        model(input_ids=bad_ids, **kwargs)


def test_fuzz_threads_each_get_their_own_result():
    """Eight random cases at once in four threads (each with its own backend choice)."""
    cases = [_case(random.Random(1000 + i)) for i in range(8)]
    errors: list[BaseException] = []

    def work(chunk):
        try:
            for case in chunk:
                _check(*case)
        except BaseException as err:  # reported by the main thread
            errors.append(err)

    threads = [threading.Thread(target=work, args=(cases[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a worker hung"
    assert not errors, errors[0]
