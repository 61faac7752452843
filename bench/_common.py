"""Helpers shared by the pytest-benchmark suites: device, backends, memory, inputs, checks.

Imported as `_common` (pytest puts `bench/` on `sys.path` for the modules in it).
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import Tensor

import dept_kernels

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# DEPT_BENCH_FULL=1 runs every shape on the CPU too; by default the CPU runs leave out the
# shapes that would make a 2-core run take far longer for little extra information.
FULL = os.environ.get("DEPT_BENCH_FULL", "0") == "1"
ZIPF_EXPONENT = 1.0

# One torch.compile'd function is called at many (shape, dtype, grad mode) combinations;
# dynamo keeps at most `recompile_limit` graphs per code object and beyond that silently
# runs the function eagerly, which would post eager times under a "compile" label. Room for
# every combination, and an error rather than an eager fallback if that is ever exceeded.
torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
torch._dynamo.config.fail_on_recompile_limit_hit = True


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def library_backends() -> list[str]:
    """The library's backends that take tensors on DEVICE: on a GPU all but cpu (which
    takes CPU tensors only); on the CPU cpu and torch (triton would run under its
    interpreter, which is no benchmark, and cuda needs a GPU)."""
    off = ("cpu",) if DEVICE == "cuda" else ("triton", "cuda")
    return [b for b in dept_kernels.available_backends() if b not in off]


def with_backend(fn: Callable[..., Tensor], backend: str) -> Callable[..., Tensor]:
    """`fn` run with the library's `backend` selected."""

    def run(*args, **kwargs) -> Tensor:
        with dept_kernels.use_backend(backend):
            return fn(*args, **kwargs)

    return run


def saved_bytes(fn: Callable[..., object], *args, **kwargs) -> int:
    """Bytes of the tensors autograd saves for backward during `fn(*args, **kwargs)`."""
    total = 0

    def pack(t: Tensor) -> Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args, **kwargs)
    return total


def peak_extra_bytes(fn: Callable[[], object]) -> int:
    """Peak bytes allocated on DEVICE during `fn()` above what was allocated at its start.

    The outputs and gradients `fn` makes count, as do its temporaries. On CUDA this is the
    caching allocator's peak; on the CPU, which keeps no such statistic, the running sum of
    the profiler's allocation events (in the order they happened).
    """
    if DEVICE == "cuda":
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [
        e
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    ]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def zipf_ids(batch: int, seq: int, vocab: int, seed: int = 0) -> Tensor:
    """(batch, seq) ids with P(rank k) ∝ k^-ZIPF_EXPONENT, ranks shuffled over the vocabulary."""
    gen = torch.Generator().manual_seed(seed)
    weights = torch.arange(1, vocab + 1, dtype=torch.float64) ** -ZIPF_EXPONENT
    ranks = torch.multinomial(weights, batch * seq, replacement=True, generator=gen)
    return torch.randperm(vocab, generator=gen)[ranks].reshape(batch, seq)


# The official AoT formulas (the paper's per-token eager PyTorch), the baselines of the
# suites: plain torch, without the library's helpers (which validate their ids). Each adds
# a (B, s, d) bias to hidden (B, s, d), in hidden's dtype; ids are (B, s) int64.


def per_token_gather_add(hidden: Tensor, ids: Tensor, table: Tensor) -> Tensor:
    """A fused table's bias: `hidden + table[ids]`, table (V, d)."""
    return hidden + F.embedding(ids, table)


def per_token_kron(hidden: Tensor, ids: Tensor, w_l: Tensor, w_m: Tensor, w_r: Tensor) -> Tensor:
    """Kronecker: `(W_L[x // b] ⊗ W_M[x % b]) @ W_R` on every token; W_L (a, r), W_M (b, r),
    W_R (r², d)."""
    b = w_m.shape[0]
    left, right = w_l[ids // b], w_m[ids % b]  # (B, s, r)
    kron = (left[..., :, None] * right[..., None, :]).flatten(-2)  # (B, s, r²)
    return hidden + (kron @ w_r).to(hidden.dtype)


def per_token_fc(
    hidden: Tensor,
    ids: Tensor,
    embedding: Tensor,
    w1: Tensor,
    b1: Tensor,
    w2: Tensor,
    b2: Tensor,
    *,
    dropout_p: float,
) -> Tensor:
    """FC: `relu(dropout(E[x]) @ W_1 + b_1) @ W_2 + b_2` on every token (one dropout mask
    per token), formed in the weights' dtype; E (V, e), W_1 (e, r), W_2 (r, d)."""
    x = F.embedding(ids, embedding).to(w1.dtype)  # (B, s, e)
    if dropout_p:
        x = F.dropout(x, dropout_p)
    return hidden + (F.relu(x @ w1 + b1) @ w2 + b2).to(hidden.dtype)


@functools.cache
def _test_helpers() -> ModuleType:
    """`tests/helpers.py` (the per-dtype tolerances of the test suite), loaded by path since
    `tests/` is no package and need not be on `sys.path` here."""
    path = Path(__file__).resolve().parents[1] / "tests" / "helpers.py"
    spec = importlib.util.spec_from_file_location("dept_kernels_test_helpers", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def assert_close(
    actual: Tensor, expected: Tensor, dtype: torch.dtype, what: str, slack: float = 1.0
) -> None:
    """The test suite's comparison: in fp32, with `slack` times the test suite's tolerance
    for `dtype` (`tests/helpers.py`), relative and scaled by the reference's magnitude."""
    tol = slack * _test_helpers().TOLERANCES[dtype]
    expected = expected.float()
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    try:
        torch.testing.assert_close(actual.float(), expected, atol=tol * scale, rtol=tol)
    except AssertionError as e:
        raise AssertionError(f"{what} disagrees with the reference: {e}") from None
