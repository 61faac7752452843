"""`pytest bench --benchmark-only` prints each row's ratio to the official formula (eager and
torch.compile) and its memory columns: a tiny benchmark file run through `bench/conftest.py`
in a subprocess, its printed ratios checked against the medians in its own JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dept_kernels.bench import ratio_table

ROOT = Path(__file__).resolve().parents[1]

# Rows named as the suites name them; each does a different amount of work, so that the
# ratios differ from 1. The memory figures are the front-ends' extra_info keys.
TINY_BENCH = """
import pytest
import torch

WORK = {"official-eager": 8, "official-compile": 4, "copy-floor": 1, "dept_kernels-torch": 2}


@pytest.mark.parametrize("impl", list(WORK))
@pytest.mark.parametrize("passes", ["forward"])
def test_tiny(benchmark, passes, impl):
    benchmark.group = f"tiny {passes}"
    x = torch.randn(256, 256)
    if impl != "copy-floor":
        benchmark.extra_info["saved_for_backward_bytes"] = 3 * 2**10 * WORK[impl]
        benchmark.extra_info["peak_extra_bytes"] = 2**20 * WORK[impl]

    def step():
        for _ in range(WORK[impl]):
            x.mul(2.0).add_(1.0)

    benchmark.pedantic(step, rounds=5, iterations=2, warmup_rounds=1)


def test_no_official_row(benchmark):
    benchmark.group = "unrelated"
    benchmark(lambda: None)
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[str, dict]:
    pytest.importorskip("pytest_benchmark")
    tmp = tmp_path_factory.mktemp("tinybench")
    (tmp / "conftest.py").write_text((ROOT / "bench" / "conftest.py").read_text())
    (tmp / "test_tiny_bench.py").write_text(TINY_BENCH)
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    )
    cmd = [sys.executable, "-m", "pytest", "--benchmark-only", "-p", "no:cacheprovider"]
    cmd += ["--benchmark-json", str(tmp / "out.json"), "-q", str(tmp)]
    done = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout, json.loads((tmp / "out.json").read_text())


def test_summary_prints_ratio_and_memory_columns(run):
    stdout, data = run
    section = stdout[stdout.index("ratios to the official formula, and memory") :]
    header = next(line for line in section.splitlines() if "implementation" in line)
    for column in ("median ms", "IQR ms", "vs eager", "vs compile", "saved for bwd", "peak extra"):
        assert column in header
    medians = {b["params"]["impl"]: b["stats"]["median"] for b in data["benchmarks"] if b["params"]}
    rows = {line.split()[0]: line for line in section.splitlines() if line.startswith("  ")}
    for impl, t in medians.items():
        line = rows[impl]
        assert f"{medians['official-eager'] / t:.2f}x" in line
        assert f"{medians['official-compile'] / t:.2f}x" in line
        assert f"{t / medians['copy-floor']:.2f}x" in line  # a forward: its time over the floor
    assert "6.0 KiB" in rows["dept_kernels-torch"] and "2.0 MiB" in rows["dept_kernels-torch"]
    assert "24.0 KiB" in rows["official-eager"] and "8.0 MiB" in rows["official-eager"]
    assert "unrelated" not in section  # a group without an official row gets no table


def test_json_carries_the_ratios(run):
    _, data = run
    benches = {b["params"]["impl"]: b for b in data["benchmarks"] if b["params"]}
    eager = benches["official-eager"]["stats"]["median"]
    lib = benches["dept_kernels-torch"]
    assert lib["extra_info"]["vs_official_eager"] == pytest.approx(eager / lib["stats"]["median"])
    assert (
        "vs_official_eager"
        not in next(b for b in data["benchmarks"] if not b["params"])["extra_info"]
    )


def test_noisy_rows_are_marked():
    group = [
        {"name": "a", "params": {"impl": "official-eager"}, "median": 1.0, "iqr": 0.5},
        {"name": "b", "params": {"impl": "dept_kernels-cpu"}, "median": 0.5, "iqr": 0.01},
    ]
    lines = ratio_table.summary([("g forward", group)])
    assert lines[2].endswith("(noisy)") and not lines[3].endswith("(noisy)")
    assert "2.00x" in lines[3]
    assert any(line.startswith("WARNING: 1 row(s)") for line in lines)
