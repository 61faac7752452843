"""Determinism of every backward, and 64-bit offsets on outputs past 2^31 elements."""

from __future__ import annotations

import pytest
import torch
from helpers import BACKENDS, DEVICE, assert_close
from helpers.ops import MIXED, Case, make_inputs, run

import dept_kernels
from dept_kernels.ops import aot_bias_add, aot_fc_bias, aot_kron_bias, dept_embedding

DETERMINISM_CASES = [
    Case("positions", batch=4, seq=9, max_len=9, d=70),
    Case("position_ids", batch=4, seq=9, max_len=9, d=70, position_ids=True),
    Case("token", batch=4, seq=9, d=70, vocab=5, token=True),  # rows repeat a lot
    Case("tasks", batch=5, seq=7, d=70, tasks=MIXED),
]


@pytest.fixture
def deterministic():
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(previous)


@pytest.mark.parametrize("case", DETERMINISM_CASES, ids=lambda c: c.name)
def test_dept_embedding_backward_is_bitwise_deterministic(backend, deterministic, case):
    kw = make_inputs(case, torch.float32, torch.float32)
    kw["weight"].requires_grad_()
    _, first, grad_out = run(dept_embedding, kw)
    _, second, _ = run(dept_embedding, kw, grad_out)
    assert first
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("op", ["bias_add", "kron", "fc"])
def test_aot_backward_is_bitwise_deterministic(backend, deterministic, op):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(4, 9, 70, generator=g).to(DEVICE).requires_grad_()
    ids = torch.randint(0, 6, (4, 9), generator=g).to(DEVICE)  # few ids: long segments

    def param(*shape):
        return torch.randn(*shape, generator=g).to(DEVICE).requires_grad_()

    if op == "bias_add":
        params = [param(6, 70)]

        def fn():
            return aot_bias_add(hidden, ids, *params)

    elif op == "kron":
        params = [param(2, 3), param(3, 3), param(9, 70)]

        def fn():
            return aot_kron_bias(hidden, ids, *params)

    else:
        emb = torch.randn(6, 16, generator=g).to(DEVICE)
        params = [param(16, 5), param(5), param(5, 70), param(70)]

        def fn():
            return aot_fc_bias(hidden, ids, emb, *params)

    grad = torch.randn(4, 9, 70, generator=g).to(DEVICE)
    first = torch.autograd.grad(fn(), [hidden, *params], grad)
    second = torch.autograd.grad(fn(), [hidden, *params], grad)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the C++ cpu backend does not run here")
def test_cpu_output_past_2_31_elements_bf16():
    # 64 x (8 + 2048) x 16400 = 2,157,969,408 elements > 2^31: offsets past the int32 range.
    batch, seq, d, m, r, vocab = 64, 2048, 16400, 8, 2, 97
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    weight = torch.randn(vocab, d, generator=g).bfloat16()
    prompt = torch.randn(m, d, generator=g).bfloat16()
    lora_a = torch.randn(seq, r, generator=g)
    lora_b = torch.randn(r, d, generator=g)
    with torch.no_grad(), dept_kernels.use_backend("cpu"):
        out = dept_embedding(ids, weight, prompt, lora_a, lora_b, scaling=0.5)
    assert out.numel() > 2**31
    # Sampled rows, the last ones included: the formula row by row.
    for b, t in [(0, 0), (31, 1000), (batch - 1, seq - 1), (batch - 1, 0), (40, 2047)]:
        expected = weight[ids[b, t]].float() + 0.5 * (lora_a[t] @ lora_b)
        assert_close(out[b, m + t], expected.bfloat16(), torch.bfloat16)
    for b in (0, batch - 1):
        assert torch.equal(out[b, :m], prompt)
    # The very last elements: the tail of the final row.
    tail = weight[ids[-1, -1], -5:].float() + 0.5 * (lora_a[-1] @ lora_b[:, -5:])
    assert_close(out[-1, -1, -5:], tail.bfloat16(), torch.bfloat16)


@pytest.mark.parametrize("case", DETERMINISM_CASES, ids=lambda c: c.name)
def test_dept_embedding_under_autocast_keeps_fp32_math(backend, case):
    """Forward and backward run inside `torch.autocast` (as a training loop that calls
    backward in the autocast block does) give the fp32 results: autocast must not reach the
    op's low-rank products."""
    kw = make_inputs(case, torch.float32, torch.float32)
    out, grads, grad_out = run(dept_embedding, kw)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        auto_out, auto_grads, _ = run(dept_embedding, kw, grad_out)
    assert auto_out.dtype == torch.float32
    assert torch.equal(auto_out, out)
    for a, b in zip(auto_grads, grads, strict=True):
        assert_close(a, b, torch.float32)
