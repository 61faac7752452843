"""Ahead-of-time build of the Triton kernels for sm_80 and sm_90, without a GPU.

The test compiles a pairwise cover of the variants (every pair of dtype and constexpr
choices the launchers can make: 40 of 276 per target, ~40 s on two cores with a cold triton
cache, ~18 s warm); `python -m dept_kernels.triton.precompile` builds all of them (~3.5 min).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from dept_kernels.triton import dept_embedding as emb
from dept_kernels.triton import precompile


def test_variants_follow_the_launcher_tables():
    items = precompile.variants()
    assert len(items) == len(set(items))
    assert {v.kernel for v in items} == {
        "_fwd_position_kernel",
        "_fwd_rows_kernel",
        "_reduce_position_kernel",
        "_reduce_segment_kernel",
        "_gather_add_kernel",
    }
    assert {v.module for v in items} == {"dept_embedding", "aot_bias"}
    for weight in emb.FLOATS:
        for tasks in (False, True):
            for factor in (None, *emb.FLOATS):
                meta = emb.forward_constexprs(weight, factor, rows_mode=False, tasks=tasks)
                assert any(
                    v.kernel == "_fwd_position_kernel" and dict(v.constexprs) == meta for v in items
                )
            meta = emb.forward_constexprs(weight, torch.float32, rows_mode=True, tasks=tasks)
            assert any(v.kernel == "_fwd_rows_kernel" and dict(v.constexprs) == meta for v in items)
    # bf16 factors: tensor cores in both forward kernels (the H200 measured the position
    # kernel's fp32-FMA tile slower, docs/kernels.md).
    half = [v for v in items if dict(v.pointers).get("a_ptr") == torch.bfloat16]
    forwards = [v for v in half if v.kernel in ("_fwd_rows_kernel", "_fwd_position_kernel")]
    assert {v.kernel for v in forwards} == {"_fwd_rows_kernel", "_fwd_position_kernel"}
    assert not any(dict(v.constexprs)["DOT_FP32"] for v in forwards)


def test_covering_exercises_every_pair():
    items = precompile.variants()
    cover = precompile.covering(items)
    assert set().union(*(v.features() for v in cover)) == set().union(
        *(v.features() for v in items)
    )
    assert len(cover) < len(items) // 3


def test_every_kernel_compiles_for_sm80_and_sm90():
    results = precompile.compile_all((80, 90), precompile.covering(precompile.variants()))
    failures = [f"sm_{r.cc} {r.label}: {r.error}" for r in results if not r.ok]
    assert not failures, "\n".join(failures)
    assert {r.cc for r in results} == {80, 90}
    # Spilled registers would land in local memory, slow on the bandwidth-bound path.
    assert all(r.spill_bytes in (None, 0) for r in results), [
        (r.label, r.cc, r.spill_bytes) for r in results if r.spill_bytes
    ]
