"""`bench/host_overhead.py` and `bench/aot_overhead.py` run and report what they promise."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"


def run_script(name: str, *args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(BENCH.parent)}
    done = subprocess.run(
        [sys.executable, str(BENCH / name), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_host_overhead_times_the_fused_forward_with_and_without_its_plan():
    out = run_script("host_overhead.py", "--rounds", "3", "--calls", "2", "--forwards", "2")
    assert "aot_bias_add forward: eager path" in out
    for row in ("unpatched", "fused, plan", "fused, each layer's own call"):
        assert f"  {row}: " in out and " µs per forward" in out
    assert "the library's host time per forward" in out or "inconclusive" in out


def test_aot_overhead_reports_a_paired_ratio_and_the_profile():
    out = run_script(
        "aot_overhead.py", "--models", "gpt2", "--rounds", "3", "--batch", "1", "--seq", "4"
    )
    line = next(ln for ln in out.splitlines() if ln.startswith("gpt2: "))
    assert "fused/unpatched" in line or "inconclusive" in line
    # The profile goes through the custom ops: one in-place gather-add per layer (12).
    assert "dept_kernels::aot_bias_add_ +12" in out
