"""Eager calls of the library's custom ops without the dispatcher's Python round trips.

A `torch.library.custom_op` is what `torch.compile` traces as one node, with its fake and
autograd registrations. Called eagerly it passes through the dispatcher twice (autograd, then
the backend key), each time back into Python, and that costs more host time than the op's own
checks and small torch ops. On a GPU the host's time per call is what a model pays for the op
at model sizes (`bench/results/README.md`: 0.2-0.3 ms per forward call against a 10-47 µs
kernel on an H200). So a call on plain tensors outside tracing runs the op's Python body
directly, its autograd through a `torch.autograd.Function` with the custom op's own
`setup_context` and backward; every other call (torch.compile tracing, fake, functional or
other subclassed tensors such as DTensor) goes through the custom op, as before.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

__all__ = ["EagerOp", "custom_ops_only"]

# Exactly these tensor types are run directly; subclasses (FakeTensor, FunctionalTensor,
# DTensor, ...) keep the custom op, whose registrations they rely on.
_PLAIN = (Tensor, torch.nn.Parameter)


# Set by `custom_ops_only`: every call through the custom ops.
_forced = False


def forced() -> bool:
    """Whether `custom_ops_only` is in force (a path that skips the custom ops checks it)."""
    return _forced


def _plain(args: tuple) -> bool:
    return all(type(a) in _PLAIN for a in args if isinstance(a, Tensor))


@contextlib.contextmanager
def custom_ops_only() -> Iterator[None]:
    """Every op call through its custom op while the block runs, as before the eager path:
    for the tests and measurements that compare the two. Process-wide, not per thread."""
    global _forced
    previous, _forced = _forced, True
    try:
        yield
    finally:
        _forced = previous


class EagerOp:
    """`call(*args)`: the custom op `op`'s result, computed by `body` (its Python body) on
    plain tensors outside tracing, with autograd from `setup_context` and `backward` (the
    op's own registrations) when given and an input requires grad."""

    def __init__(
        self,
        op: Callable,
        body: Callable,
        setup_context: Callable | None = None,
        backward: Callable | None = None,
    ) -> None:
        self.op = op
        self.body = body
        self.function = None
        if backward is not None:
            self.function = _function(body, setup_context, backward)

    def __call__(self, *args):
        if _forced or torch.compiler.is_compiling() or not _plain(args):
            return self.op(*args)
        if self.function is None or not _needs_grad(args):
            return self.body(*args)
        return self.function.apply(*args)


def _needs_grad(args: tuple) -> bool:
    return torch.is_grad_enabled() and any(isinstance(a, Tensor) and a.requires_grad for a in args)


def _function(body: Callable, setup_context: Callable, backward: Callable) -> type:
    """An autograd.Function of the op. The forward takes `ctx` and calls `setup_context`
    itself: a Function with a separate setup_context binds its arguments through
    `inspect.signature` on every call, which costs more than the op."""

    def forward(ctx, *args):
        out = body(*args)
        setup_context(ctx, args, out)
        return out

    def backward_once(ctx, *grads):
        with torch.no_grad():
            result = backward(ctx, *grads)
        if not torch.is_grad_enabled():  # no create_graph
            return result
        # Once differentiable, as the custom op is (its backward op has no autograd): under
        # create_graph every gradient carries a node that raises when differentiated, so a
        # second derivative fails rather than silently leaving the op's part out.
        # An incoming gradient passed through unchanged (AoT's hidden state: the bias is
        # added) keeps its own graph: it holds no derivative of the op.
        return tuple(
            _second_derivative_raises(r)
            if isinstance(r, Tensor) and not any(r is g for g in grads)
            else r
            for r in (result if isinstance(result, tuple) else (result,))
        )

    return type(
        f"{body.__name__}_function",
        (torch.autograd.Function,),
        {"forward": staticmethod(forward), "backward": staticmethod(backward_once)},
    )


def _second_derivative_raises(grad: Tensor) -> Tensor:
    """`grad` behind a node that raises when backpropagated through (a detached copy that
    requires grad gives the node an input to hang on)."""
    return torch._C._functions.DelayedError(
        "dept_kernels: the ops are differentiable once; a second derivative is not implemented",
        1,
    )(grad.detach().requires_grad_())
