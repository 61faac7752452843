"""pytest-benchmark: the AoT P-tuning ops against the paper's per-token formulas.

    pytest bench/test_bench_aot_ops.py --benchmark-only [--benchmark-columns=median,iqr]
    DEPT_BENCH_FULL=1 pytest bench/test_bench_aot_ops.py --benchmark-only   # every shape

Ops (`dept_kernels.ops`) and the official formula each is measured against (eager PyTorch
evaluated on every token, as the AoT paper's code does):

- `aot_bias_add`, the fused table's gather-add: `hidden + F.embedding(ids, P)`, P (V, d);
  gradients of hidden and P.
- `aot_kron_bias`: `hidden + (W_L[ids // b] ⊗ W_M[ids % b]) @ W_R` on all B*s tokens;
  the op forms the rows on the batch's distinct ids only. r = 32, so W_R is (r² = 1024, d),
  about one d x d projection, and a·b >= V with b = ceil(sqrt(V)) (the library's default).
  Gradients of hidden, W_L, W_M, W_R.
- `aot_fc_bias`: `hidden + f(E[ids] @ W_1 + b_1) @ W_2 + b_2` on all tokens, f = ReLU,
  r = 64, E the model's (V, d) input embedding (frozen); distinct ids only in the op.
  Gradients of hidden, W_1, b_1, W_2, b_2.

Each group is one (op, shape, dtype, pass), pass = forward (under no_grad) or
forward+backward (`torch.autograd.grad` of all the inputs above); its rows are the official
formula in eager PyTorch and under `torch.compile` (static shapes, compiled per shape and
dtype), every library backend that runs here (`dept_kernels-torch` is the eager reference
backend; cpu here, triton and cuda on a GPU) and, for the gather-add forward, the bandwidth
floor (copying an output-sized buffer); `bench/conftest.py` prints each row's ratio to the
official formula (eager and compiled) after pytest-benchmark's own table.
`extra_info` holds `saved_for_backward_bytes` (what autograd keeps between the passes) and
`peak_extra_bytes` (the step's peak allocation above what was live before it, outputs and
gradients included; on the CPU from the profiler's allocation events).

Dropout is 0 throughout, so that the per-token formula and the distinct-id op compute the
same thing (with dropout the op draws one mask per distinct id, the formula one per token).
`dtype` is that of the (B, s, d) hidden states, the fused table and the embedding E; the
Kronecker and FC factors stay fp32, as `dept_kernels.methods.AoTLayer` forms its rows in
fp32 whatever the model's dtype (and a CPU without bf16 instructions multiplies bf16
matrices about 50x slower than fp32 ones, which would time that and nothing else).

Inputs: ids from a Zipf law with exponent 1 over the vocabulary (so the count of distinct
ids per batch is realistic: about 45% of the tokens at these sizes); random weights with
unit-scale rows. Before timing, every implementation's output (and, for forward+backward,
its gradients) is checked once against the official formula evaluated in fp32, with the
per-dtype tolerance (`dept_kernels.testing.compare`), so a wrong kernel posts no time
(the official formula's bf16 gradients get 4x that: torch sums the table gradient in bf16).

Shapes are named after the models whose dims (and vocabulary) they take: T5 small / base /
large (B=16, s=256, V=32128), GPT-2 small / medium / large (B=8, s=512, V=50257) and
LLaMA-2-7B (B=8, s=512, d=4096, V=32000). On a GPU all run. On the CPU the default is
t5-base and gpt2 (GPT-2 small) only, two of the DePT suite's CPU shapes: their 100 rows,
checks and compiles included, take about 3 to 5 minutes on 2 cores at pytest-benchmark's
default rounds, and each further shape adds 1.5 minutes or more (the per-token Kronecker
formula alone is 2·B·s·r²·d flops per pass, 6.4 GFLOP at d=768). DEPT_BENCH_FULL=1 runs
every shape on the CPU too.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor

import dept_kernels
from dept_kernels.bench.baselines import per_token_fc, per_token_gather_add, per_token_kron
from dept_kernels.bench.memory import peak_extra_bytes, saved_bytes
from dept_kernels.bench.shapes import AOT_SHAPES, zipf_ids
from dept_kernels.bench.suite import DEVICE, FULL, library_backends, sync, with_backend
from dept_kernels.ops import aot_bias_add, aot_fc_bias, aot_kron_bias
from dept_kernels.testing.compare import assert_close

KRON_R = 32
FC_R = 64


SHAPE_NAMES = list(AOT_SHAPES) if DEVICE == "cuda" or FULL else ["t5-base", "gpt2"]
DTYPES = ["float32", "bfloat16"]
PASSES = ["forward", "forward+backward"]


def official_fc(hidden: Tensor, ids: Tensor, *weights: Tensor) -> Tensor:
    """`per_token_fc` without dropout; weights = (E, W_1, b_1, W_2, b_2)."""
    return per_token_fc(hidden, ids, *weights, dropout_p=0.0)


OPS: dict[str, tuple[Callable[..., Tensor], Callable[..., Tensor]]] = {
    # op: (official formula, library op), both called as f(hidden, ids, *weights)
    "aot_bias_add": (per_token_gather_add, aot_bias_add),
    "aot_kron_bias": (per_token_kron, aot_kron_bias),
    "aot_fc_bias": (official_fc, aot_fc_bias),
}
IMPLS = ["official-eager", "official-compile"] + [f"dept_kernels-{b}" for b in library_backends()]
CASES = [
    (op, shape, dtype, passes, impl)
    for op in OPS
    for shape in SHAPE_NAMES
    for dtype in DTYPES
    for passes in PASSES
    for impl in IMPLS + ["copy-floor"] * (op == "aot_bias_add" and passes == "forward")
]


@dataclass
class Problem:
    """Inputs of one (op, shape, dtype) and the official formula's fp32 results."""

    args: tuple  # (hidden, ids, *weights)
    wrt: list[Tensor]  # the inputs whose gradients forward+backward computes
    grad_out: Tensor
    expected: Tensor
    expected_grads: tuple[Tensor, ...]
    info: dict


@functools.lru_cache(maxsize=1)  # the cases run grouped by (op, shape, dtype)
def problem(op: str, shape_name: str, dtype_name: str) -> Problem:
    """Zipf ids (B, s), hidden (B, s, d) and the op's weights on DEVICE; the reference."""
    shape = AOT_SHAPES[shape_name]
    dtype = getattr(torch, dtype_name)
    b, s, d, v = shape.batch, shape.seq, shape.d, shape.vocab
    gen = torch.Generator().manual_seed(0)

    def randn(*size: int, scale: float = 1.0, dt: torch.dtype = torch.float32) -> Tensor:
        # Drawn on the CPU so that every device gets the same inputs.
        return (torch.randn(size, generator=gen) * scale).to(DEVICE, dt)

    ids = zipf_ids(b, s, v).to(DEVICE)
    hidden = randn(b, s, d, dt=dtype).requires_grad_()
    info = {"tokens": b * s, "distinct_ids": int(ids.unique().numel())}
    if op == "aot_bias_add":
        weights = [randn(v, d, dt=dtype).requires_grad_()]
        wrt = [hidden, *weights]
    elif op == "aot_kron_bias":
        ka, kb = dept_kernels.AoTConfig("kron", r=KRON_R).kron_heights(v)
        # Kronecker products of unit variance times a unit-variance W_R: rows of unit scale,
        # so a wrong row shows against hidden's values even at bf16's tolerance.
        weights = [
            randn(ka, KRON_R, scale=KRON_R**-0.5).requires_grad_(),
            randn(kb, KRON_R, scale=KRON_R**-0.5).requires_grad_(),
            randn(KRON_R * KRON_R, d).requires_grad_(),
        ]
        wrt = [hidden, *weights]
        info.update(r=KRON_R, a=ka, b=kb)
    else:
        embedding = randn(v, d, dt=dtype)
        weights = [
            embedding,
            randn(d, FC_R, scale=d**-0.5).requires_grad_(),
            randn(FC_R, scale=0.1).requires_grad_(),
            randn(FC_R, d, scale=FC_R**-0.5).requires_grad_(),
            randn(d, scale=0.1).requires_grad_(),
        ]
        wrt = [hidden, *weights[1:]]
        info.update(r=FC_R)
    args = (hidden, ids, *weights)
    grad_out = randn(b, s, d, dt=dtype)
    official = OPS[op][0]
    # The reference: the official formula on fp32 copies of the hidden state and tables
    # (the casts are differentiable, so the gradients land on the inputs in their dtype).
    expected = official(*(a.float() if a.is_floating_point() else a for a in args))
    expected_grads = torch.autograd.grad(expected, wrt, grad_out.float())
    return Problem(args, wrt, grad_out, expected.detach(), expected_grads, info)


@functools.cache
def compiled(op: str) -> Callable[..., Tensor]:
    # Static shapes: each (shape, dtype) gets its own specialised graph, the strongest
    # baseline torch.compile offers for a fixed shape.
    return torch.compile(OPS[op][0], dynamic=False)


def implementation(op: str, impl: str) -> Callable[..., Tensor]:
    official, library = OPS[op]
    if impl == "official-eager":
        return official
    if impl == "official-compile":
        return compiled(op)
    return with_backend(library, impl.removeprefix("dept_kernels-"))


def check(
    fn: Callable[..., Tensor], p: Problem, passes: str, dtype: torch.dtype, grad_slack: float
) -> None:
    """`fn` agrees with the fp32 official formula: output, and gradients for the backward
    (within `grad_slack` times the dtype's tolerance)."""
    if passes == "forward":
        with torch.no_grad():
            out = fn(*p.args)
        assert_close(out, p.expected, dtype, what="output")
        return
    out = fn(*p.args)
    assert_close(out.detach(), p.expected, dtype, what="output")
    grads = torch.autograd.grad(out, p.wrt, p.grad_out)
    for i, (g, e) in enumerate(zip(grads, p.expected_grads, strict=True)):
        assert_close(g, e, dtype, slack=grad_slack, what=f"gradient of input {i}")


@pytest.mark.parametrize(("op", "shape", "dtype", "passes", "impl"), CASES)
def test_aot_op(benchmark, op: str, shape: str, dtype: str, passes: str, impl: str) -> None:
    p = problem(op, shape, dtype)
    benchmark.group = f"{op} {shape} {dtype} {passes}"
    benchmark.extra_info.update(p.info)
    if impl == "copy-floor":
        out = p.expected.to(getattr(torch, dtype))

        def step() -> None:
            torch.empty_like(out).copy_(out)
            sync()

    else:
        fn = implementation(op, impl)
        # The official formula in bf16 sums the table's gradient in bf16 (torch's embedding
        # backward): up to about 3% of the largest row sum off at these token counts. The
        # library sums in fp32 and is held to the test suite's tolerance.
        slack = 4.0 if impl.startswith("official") and dtype != "float32" else 1.0
        check(fn, p, passes, getattr(torch, dtype), slack)  # also compiles official-compile
        benchmark.extra_info["saved_for_backward_bytes"] = saved_bytes(lambda: fn(*p.args))[1]
        if passes == "forward":

            def step() -> None:
                with torch.no_grad():
                    fn(*p.args)
                sync()

        else:

            def step() -> None:
                torch.autograd.grad(fn(*p.args), p.wrt, p.grad_out)
                sync()

    # The check above was the warm-up (allocator, thread pool, compiled graphs); the copy
    # floor needs none.
    benchmark.extra_info["peak_extra_bytes"] = peak_extra_bytes(step, DEVICE)
    benchmark(step)
