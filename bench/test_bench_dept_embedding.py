"""pytest-benchmark: the fused DePT embedding against the official formula.

    pytest bench --benchmark-only [--benchmark-columns=median,iqr,ops]

Each group is one (shape, dtype, pass); its rows are the official formula in eager
PyTorch and under torch.compile, the torch reference backend, every library backend that
runs here, and the bandwidth floor (copying an output-sized buffer). `extra_info` records
the bytes the implementation saves for backward and its peak extra memory; after
pytest-benchmark's table (whose brackets are ratios to the group's fastest row),
`bench/conftest.py` prints each row's ratio to the official formula, eager and compiled, and
these memory columns.
"""

from __future__ import annotations

import functools

import pytest
import torch

from dept_kernels.bench import SHAPES, make_problem
from dept_kernels.bench.memory import peak_extra_bytes, saved_bytes
from dept_kernels.bench.suite import DEVICE, library_backends, sync, with_backend
from dept_kernels.ops import dept_embedding
from dept_kernels.testing import official_dept_embedding

# LLaMA-2-7B dims move 75 MB per forward in fp32 and dominate a 2-core run for little
# extra information; they are measured on GPU machines only.
SHAPE_NAMES = ["t5-small", "t5-base", "t5-large", "gpt2"] + (["llama-2-7b"] * (DEVICE == "cuda"))
DTYPES = ["float32", "bfloat16"]
IMPLS = ["official-eager", "official-compile", "copy-floor"] + [
    f"dept_kernels-{b}" for b in library_backends()
]


@functools.cache
def compiled_official():
    # Static shapes: one specialised graph per shape, as a user compiling for one model gets.
    return torch.compile(official_dept_embedding, dynamic=False)


def implementation(name: str):
    if name == "official-eager":
        return official_dept_embedding
    if name == "official-compile":
        return compiled_official()
    return with_backend(dept_embedding, name.removeprefix("dept_kernels-"))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("passes", ["forward", "forward+backward"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPE_NAMES)
def test_dept_embedding(benchmark, shape, dtype, passes, impl):
    kw = make_problem(SHAPES[shape], getattr(torch, dtype), DEVICE)
    benchmark.group = f"dept_embedding {shape} {dtype} {passes}"
    params = [kw["prompt"], kw["lora_a"], kw["lora_b"]]
    with torch.no_grad():
        out = official_dept_embedding(**kw)
    if impl == "copy-floor":
        if passes != "forward":
            pytest.skip("the bandwidth floor is a forward-only reference")

        def step():
            torch.empty_like(out).copy_(out)
            sync()

    else:
        fn = implementation(impl)
        benchmark.extra_info["saved_for_backward_bytes"] = saved_bytes(lambda: fn(**kw))[1]
        grad_out = torch.randn_like(out)
        if passes == "forward":

            def step():
                with torch.no_grad():
                    fn(**kw)
                sync()

        else:

            def step():
                torch.autograd.grad(fn(**kw), params, grad_out)
                sync()

    step()  # compiles, and warms caches, before the allocation count
    benchmark.extra_info["peak_extra_bytes"] = peak_extra_bytes(step, DEVICE)
    benchmark.pedantic(step, rounds=15, iterations=1, warmup_rounds=2)
