"""`bench/backward_floor.py`: the issue-17 comparison with the parts in series it reports."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "backward_floor.py"


def _load():
    spec = importlib.util.spec_from_file_location("backward_floor", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ratio_lines_sum_the_parts_and_place_the_goal():
    floor = _load()
    med = {
        "copy (floor)": 1.0e-3,
        "gy.sum(0)": 0.5e-3,
        "library fwd": 2.0e-3,
        "compile fwd": 2.2e-3,
        "library fwd+bwd": 4.0e-3,
        "compile fwd+bwd": 5.0e-3,
        "part: gather": 1.5e-3,
        "part: A @ B": 0.25e-3,
        "part: B @ S^T": 0.5e-3,
        "part: A^T @ S": 0.25e-3,
    }
    lines = [line for line, _ in floor.ratio_lines(med)]
    assert "compile / library = 1.25x (goal >= 1.25x)" in lines[0]
    assert "library / copy = 4.00x (goal <= 1.7x)" in lines[0]
    assert "fwd: library / copy = 2.00x" in lines[1]
    assert "compile / library = 1.10x" in lines[1]
    # 1.5 + 0.25 + 0.5 + 0.5 + 0.25 ms; the goal's time is 5.0 / 1.25 = 4.0 ms.
    assert "= 3.00 ms; library fwd+bwd = 1.33x of it, compile 1.67x" in lines[2]
    assert "(compile / 1.25) = 4.00 ms = 1.33x of it" in lines[2]


def test_each_line_is_judged_by_its_own_rows():
    floor = _load()
    lines = [("a fast", ("x", "y")), ("b slow", ("y", "z"))]
    quiet = {"x": 0.05, "y": 0.02, "z": 0.04}
    assert floor.judged(lines, quiet, []) == ["a fast", "b slow"]
    out = floor.judged(lines, {**quiet, "z": 0.3}, [])
    assert out[0] == "a fast" and "b slow" not in out
    assert "z 30%" in out[1] and "Inconclusive: 1 of 2 lines" in out[2]
    # A broken invariant voids every line, quiet or not.
    out = floor.judged(lines, quiet, ["library fwd+bwd is below its fwd"])
    assert not {"a fast", "b slow"} & set(out) and "Inconclusive" in out[-1]


def test_script_times_every_candidate_and_each_part():
    env = {**os.environ, "PYTHONPATH": str(SCRIPT.parents[1])}
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--shape", "t5-small", "--rounds", "3", "--unfused"],
        capture_output=True,
        text=True,
        env=env,
        timeout=280,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    floor = _load()
    names = [
        "copy (floor)",
        "gy.sum(0)",
        "library fwd",
        "compile fwd",
        "library fwd+bwd",
        "compile fwd+bwd",
        *floor.PARTS,
        floor.UNFUSED,
    ]
    for name in names:
        assert re.search(rf"^{re.escape(name)} +\d+\.\d{{3}} ", run.stdout, re.M), name
    # Quiet or not, the run either states its ratios or says it is inconclusive.
    assert "parts in series" in run.stdout or "Inconclusive" in run.stdout
