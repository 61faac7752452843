"""The examples run as a user would run them."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_example(name: str) -> str:
    """Run `examples/<name>` in a fresh interpreter; its stdout, after asserting it exited 0."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / name)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def test_trainer_example_runs():
    out = run_example("train_dept_t5_trainer.py")
    # The example asserts that training lowered the loss and that the saved adapter reloads
    # to the same held-out loss; its report says so too.
    assert "training loss" in out and "after save/load" in out, out


def test_clip_t5_example_runs():
    out = run_example("dept_clip_t5.py")
    # The example asserts that training lowered the loss; it reports three groups and the
    # answers generate gave.
    assert "3 parameter groups" in out and "training loss" in out and "generate:" in out, out
