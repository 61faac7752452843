"""`python -m dept_kernels.check_build` compiles every GPU kernel for sm_80 and sm_90.

Run as the command, in a subprocess, with the pairwise cover of the Triton variants
(`--covering`): ~60 s on two cores with a cold Triton cache, ~13 s with a warm one. Every
CUDA kernel instantiation is compiled.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")


def _kernel_structs() -> set[str]:
    """The kernels of csrc/cuda: the structs with a per-thread `run` body."""
    names = set()
    for source in (ROOT / "csrc/cuda").glob("*.cu"):
        names |= set(re.findall(r"struct (\w+) \{\s+using Params", source.read_text()))
    return names


def test_check_build_compiles_every_kernel_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_INTERPRET"] = "1"  # the command must switch the interpreter off itself
    done = subprocess.run(
        [sys.executable, "-m", "dept_kernels.check_build", "--covering"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    lines = done.stdout.splitlines()
    bindings = [line for line in lines if line.startswith("bindings.cpp")]
    assert len(bindings) == 1 and bindings[0].split()[-1] == "ok", bindings
    assert re.search(r"check_build: (\d+)/\1 kernel builds ok", done.stdout)
    cuda = [line.split() for line in lines if re.match(r"\S+\.cu ", line)]
    structs = _kernel_structs()
    assert structs >= {"ForwardSharedDelta", "ForwardPerRow", "GatherAdd", "SegmentSumChunks"}
    for struct in structs:
        rows = [row for row in cuda if row[1].startswith(struct + "<")]
        targets = {field for row in rows for field in row if field.startswith("sm_")}
        assert targets == {"sm_80", "sm_90"}, (struct, targets)
        assert all("spills=0B/0B" in row and row[-1] == "ok" for row in rows), (struct, rows)
