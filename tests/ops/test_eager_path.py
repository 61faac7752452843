"""Eager calls run the custom ops' Python bodies directly (`dept_kernels/ops/_eager.py`):
the same bits as through the custom ops, forward and backward, on every backend; the
dispatcher's custom op is skipped on plain tensors and kept for anything else; the in-place
gather-add still tells autograd that it changed its input."""

from __future__ import annotations

import pytest
import torch
from helpers import randint, randn
from helpers.ops import MIXED, Case, make_inputs, run
from helpers.syncs import SyncCounter

from dept_kernels.ops import _eager, aot_bias_add, aot_kron_bias, dept_embedding
from dept_kernels.ops.aot import distinct_ids

CASES = [
    Case("positions"),
    Case("position_ids", position_ids=True),
    Case("token", token=True, vocab=7),
    Case("tasks", batch=5, tasks=MIXED, position_ids=True),
    Case("no_lowrank", lowrank=False),
]


@pytest.fixture
def custom_ops_only():
    """`fn()` with every call through the custom ops, as before the eager path."""

    def force(fn):
        with _eager.custom_ops_only():
            return fn()

    return force


def _same(a, b) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_dept_embedding_same_bits_either_path(backend, case, custom_ops_only):
    kw = make_inputs(case, torch.float32, torch.float32)
    kw["weight"].requires_grad_()
    out, grads, grad_out = run(dept_embedding, kw)
    ref_out, ref_grads, _ = custom_ops_only(lambda: run(dept_embedding, kw, grad_out))
    assert torch.equal(out, ref_out)
    _same(grads, ref_grads)


def _aot_inputs():
    hidden = randn(3, 5, 16).requires_grad_()
    table = randn(11, 16).requires_grad_()
    return hidden, randint(11, 3, 5), table


def test_aot_ops_same_bits_either_path(backend, custom_ops_only):
    hidden, ids, table = _aot_inputs()
    grad = randn(3, 5, 16)

    def gather_add():
        out = aot_bias_add(hidden, ids, table)
        return (out, *torch.autograd.grad(out, (hidden, table), grad))

    def kron():
        w_l, w_m, w_r = randn(4, 3), randn(3, 3), randn(9, 16)
        return (aot_kron_bias(hidden.detach(), ids, w_l, w_m, w_r),)

    for fn in (gather_add, lambda: distinct_ids(ids, 11)):
        _same(fn(), custom_ops_only(fn))
    torch.manual_seed(0)
    fast = kron()
    torch.manual_seed(0)
    _same(fast, custom_ops_only(kron))
    with torch.no_grad():
        inplace = hidden.detach().clone()
        aot_bias_add(inplace, ids, table, inplace=True)
        ref = hidden.detach().clone()
        custom_ops_only(lambda: aot_bias_add(ref, ids, table, inplace=True))
    assert torch.equal(inplace, ref)


def test_eager_calls_skip_the_custom_op(custom_ops_only):
    """A dispatch mode sees the body's aten ops in eager calls, the custom op otherwise."""
    kw = make_inputs(Case("positions"), torch.float32, torch.float32)
    args = {k: val for k, val in kw.items() if not k.startswith("_")}
    with SyncCounter() as eager:
        dept_embedding(**args)
    assert "dept_kernels::dept_embedding" not in eager.calls
    assert "aten::aminmax" in eager.calls  # the body's range check, seen directly
    with SyncCounter() as dispatched:
        custom_ops_only(lambda: dept_embedding(**args))
    assert dispatched.calls["dept_kernels::dept_embedding"] == 1


class _Tagged(torch.Tensor):
    """A tensor subclass with no behaviour of its own."""


def test_tensor_subclasses_keep_the_custom_op():
    hidden, ids, table = (x.detach() for x in _aot_inputs())
    with SyncCounter() as calls:
        out = aot_bias_add(hidden.as_subclass(_Tagged), ids, table)
    assert calls.calls["dept_kernels::aot_bias_add"] == 1
    assert torch.equal(out, aot_bias_add(hidden, ids, table))


def test_inplace_gather_add_bumps_the_version(backend):
    """A tensor autograd saved, changed in place by the kernel: backward must refuse, as it
    does after the custom op, not compute with the changed values."""
    hidden, ids, table = (x.detach() for x in _aot_inputs())
    weight = randn(16).requires_grad_()
    product = (hidden * weight).sum()  # saves hidden for weight's gradient
    version = hidden._version
    aot_bias_add(hidden, ids, table, inplace=True)
    assert hidden._version > version
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        product.backward()


def test_second_derivatives_raise_on_either_path(backend, custom_ops_only):
    """The ops are differentiable once: a second derivative raises on both paths (it never
    silently leaves the op's part out), while derivatives that only pass through the op's
    first derivative (AoT's hidden state, under create_graph) still work."""
    kw = make_inputs(Case("positions"), torch.float32, torch.float32)
    args = {k: val for k, val in kw.items() if not k.startswith("_")}

    def second_derivative():
        out = dept_embedding(**args)
        (d_b,) = torch.autograd.grad(out, [args["lora_b"]], torch.ones_like(out), create_graph=True)
        # With a term of its own that requires grad: a d_b without a graph would pass here.
        (d_b.sum() + (args["lora_b"] ** 2).sum()).backward()

    for run_path in (lambda fn: fn(), custom_ops_only):
        with pytest.raises(RuntimeError, match=r"differentiable once|no autograd formula"):
            run_path(second_derivative)

    hidden, ids, table = _aot_inputs()

    def through_hidden():
        out = aot_bias_add(hidden, ids, table)
        (d_hidden,) = torch.autograd.grad((out**2).sum(), [hidden], create_graph=True)
        return torch.autograd.grad(d_hidden.sum(), [hidden, table])

    _same(through_hidden(), custom_ops_only(through_hidden))
