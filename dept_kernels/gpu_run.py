"""One command for a machine with a CUDA GPU, in stages that pay off in order.

    python -m dept_kernels.gpu_run [--suite] [--bench] [--main-job] [--budget SECONDS]
                                   [--out DIR]

Stages (each writes `<out>/<gpu>-<date>.json` again when it ends, so a run cut short keeps
what it finished):

  kernels  each kernel alone (DePT forward and backward reduction, AoT gather-add, the
           Kronecker and FC rows) on the triton and cuda backends at model-named shapes:
           device-event time with the L2 flushed, achieved bandwidth against the device's
           peak and its measured copy rate, and the public op's per-call time beside it
           (`dept_kernels.bench.device_kernels`); then which backend this table makes the
           default for CUDA tensors (`default_backend`)
  overhead AoT fused inference against the unpatched model (`bench/aot_overhead.py`) at
           T5-base, BERT-base and GPT-2 dims: at the batch issue 17 names (B=8, s=128),
           where a forward is bound by the host's time, and at B=32, s=512
  tests    the focused tests on CUDA tensors: host syncs and CUDA-graph capture, the main
           job's tests, then the kernel tests (tests/ops, tests/triton, tests/test_backend.py)
           (Triton compiled, not interpreted; the cuda backend built just in time)
  suite    the rest of the test suite on CUDA tensors                     (--suite)
  bench    `pytest bench --benchmark-only`, saved as pytest-benchmark JSON (--bench)
  main-job `python -m dept_kernels.bench --full` on CUDA: training at T5-base dims, inference,
           multi-task serving, the kernel table at every shape (--main-job)

`--budget` bounds the whole run: a stage's child process still running when it is spent is
stopped (its results so far are kept) and later stages are skipped. Without a GPU it says so
and exits 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

from . import backends
from .bench import device_kernels
from .bench.device_kernels import forward_min_bytes, peak_bandwidth, reduce_min_bytes
from .testing import pytest_record

__all__ = [
    "STAGES",
    "default_backend",
    "forward_min_bytes",
    "main",
    "peak_bandwidth",
    "pytest_outcomes",
    "reduce_min_bytes",
]

# The kernels the rule below compares, and how much faster cuda must be to be the default:
# triton needs no C++ toolchain on the user's machine, so a tie goes to it.
COMPARED_KERNELS = ("dept_forward", "dept_reduce", "aot_gather_add")
CUDA_MARGIN = 1.05
# The focused tests, short ones first: host syncs and CUDA-graph capture (which only a GPU
# checks), the main job on CUDA, then every op against its oracle, the launchers and the
# backend registry.
FOCUSED_TESTS = [
    "tests/test_sync_free.py",
    "tests/test_host_syncs.py",
    "tests/test_bench_main_job.py",
    "tests/ops",
    "tests/triton",
    "tests/test_backend.py",
]
# Seconds kept back from a stopped pytest stage for writing the results.
MARGIN_S = 10.0


@dataclasses.dataclass
class Run:
    """What the stages share: the options, the result so far, where it is written."""

    args: argparse.Namespace
    result: dict
    path: Path
    deadline: float | None
    device: str = "cuda"
    backends: tuple[str, ...] = ("triton", "cuda")

    def remaining(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()

    def write(self) -> None:
        self.path.write_text(json.dumps(self.result, indent=2))


@dataclasses.dataclass(frozen=True)
class Stage:
    run: Callable[[Run], dict]
    help: str
    default: bool


def environment() -> dict:
    props = torch.cuda.get_device_properties(0)
    driver = None
    if shutil.which("nvidia-smi"):
        done = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
        )
        driver = done.stdout.strip().splitlines()[0] if done.returncode == 0 else None
    versions = {}
    for package in ("triton", "transformers", "peft"):
        try:
            versions[package] = __import__(package).__version__
        except ImportError:
            versions[package] = None
    return {
        "device": props.name,
        "compute_capability": f"{props.major}.{props.minor}",
        "multiprocessors": props.multi_processor_count,
        "l2_bytes": getattr(props, "L2_cache_size", None),
        "memory_gib": round(props.total_memory / 2**30, 1),
        "driver": driver,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        **versions,
        "python": platform.python_version(),
        "date": datetime.date.today().isoformat(),
    }


def default_backend(rows: list[dict]) -> dict:
    """The backend the kernel table makes the default for CUDA tensors, and why.

    The rule (docs/backends.md): over every (kernel in COMPARED_KERNELS, shape, dtype) both
    backends ran, the geometric mean of cuda's kernel time over triton's; cuda becomes the
    default only if it is faster by more than CUDA_MARGIN, else triton stays.
    """
    times = {(r["kernel"], r["shape"], r["dtype"], r["backend"]): r["kernel_ms"] for r in rows}
    ratios = [
        times[(k, s, d, "cuda")] / times[(k, s, d, "triton")]
        for (k, s, d, b) in times
        if b == "triton" and k in COMPARED_KERNELS and (k, s, d, "cuda") in times
    ]
    if not ratios:
        return {"backend": "triton", "reason": "no kernel ran on both backends", "pairs": 0}
    mean = math.exp(sum(math.log(x) for x in ratios) / len(ratios))
    choice = "cuda" if mean * CUDA_MARGIN < 1 else "triton"
    return {
        "backend": choice,
        "cuda_over_triton_geomean": mean,
        "pairs": len(ratios),
        "reason": f"cuda takes {mean:.3f}x triton's time (geometric mean of {len(ratios)} "
        f"kernel, shape and dtype pairs); cuda must be under {1 / CUDA_MARGIN:.3f}x",
    }


def _build_in_background(name: str) -> tuple[threading.Thread, dict]:
    """Load backend `name` (the cuda extension builds) while other work runs."""
    outcome: dict = {}

    def load() -> None:
        try:
            backends.load(name)
        except Exception as error:
            outcome["error"] = f"{type(error).__name__}: {error}"

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    return thread, outcome


def kernels_stage(run: Run) -> dict:
    """The kernel table (`device_kernels.table`) per backend in `run.backends`; the backends
    after the first are loaded (the cuda extension built) while the first is timed."""
    args = run.args
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
    shapes = args.shapes.split(",")
    peak = peak_bandwidth(run.result["environment"]["device"])
    available = set(backends.available_backends())
    names = [n for n in run.backends if n in available]
    # Loaded first: a loading backend holds the registry's lock, which `load` of a backend
    # not yet loaded would wait for.
    for name in names[:1]:
        backends.load(name)
    builds = {n: _build_in_background(n) for n in names[1:]}
    copy_rate = device_kernels.copy_bandwidth(run.device)
    stage: dict = {"peak_Bps": peak, "copy_Bps": copy_rate, "rows": []}
    run.result["stages"]["kernels"] = stage
    print(f"copy: {copy_rate / 1e9:.0f} GB/s (read + written)", flush=True)
    for name in run.backends:
        if name not in available:
            stage[f"{name}_error"] = "not available here"
    families = list(device_kernels.CASE_FAMILIES)
    for name in names:
        if name in builds:
            thread, outcome = builds[name]
            thread.join()
            if "error" in outcome:
                stage[f"{name}_error"] = outcome["error"]
                print(f"{name} backend: {outcome['error']}", flush=True)
                continue
        rows = device_kernels.table(
            shapes, dtypes, [name], run.device, args.repeats, peak, copy_rate, families
        )
        for row in rows:
            stage["rows"].append(row)
            print(device_kernels.format_row(row), flush=True)
        # The torch-op rows are the same whatever the backend: timed once.
        families = [f for f in families if f in device_kernels.BACKEND_FAMILIES]
        run.write()
    stage["default_backend"] = default_backend(stage["rows"])
    print(f"default for CUDA tensors by this table: {stage['default_backend']}", flush=True)
    return stage


_OUTCOME = re.compile(r"^(\S+::\S.*?) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")
# pytest's own exit codes are 0..5; a negative one is a signal (a crash), as is any other.
PYTEST_EXIT_CODES = range(6)
# Times a crashed pytest is started again on the tests it had not reached.
MAX_RESTARTS = 5


def pytest_outcomes(lines: list[str]) -> dict[str, str]:
    """The outcome of each test, by id, from the output of `pytest -v`."""
    outcomes: dict[str, str] = {}
    for line in lines:
        hit = _OUTCOME.match(line)
        if hit:
            # A test that fails in teardown after passing is reported twice: the last stays.
            outcomes[hit[1]] = hit[2].lower()
    return outcomes


def _child(
    command: list[str], env: dict, log, timeout: float | None
) -> tuple[int | None, list[str]]:
    """Run `command`, its output appended to `log`; (exit code or None when stopped at
    `timeout`, the output's lines)."""
    lines: list[str] = []
    child = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,
    )

    def pump() -> None:
        for line in child.stdout:
            log.write(line)
            log.flush()
            lines.append(line.rstrip("\n"))

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        code: int | None = child.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, 9)
        child.wait()
        code = None
    reader.join(timeout=30)
    return code, lines


def _timeout(run: Run) -> float | None:
    remaining = run.remaining()
    return None if remaining is None else max(remaining - MARGIN_S, 1.0)


def _log_and_env(run: Run, name: str, **variables: str) -> tuple[Path, dict]:
    """(`<out>/<stem>-<name>.log`, the environment) of a stage's child processes."""
    log_path = Path(run.args.out) / f"{run.path.stem}-{name}.log"
    return log_path, {**os.environ, "PYTHONUNBUFFERED": "1", **variables}


def _pytest(run: Run, name: str, targets: list[str]) -> dict:
    """Run pytest on `targets` in a child process, its output to `<out>/<name>.log`, stopped
    when the budget is spent. Each failure is recorded as it happens
    (`dept_kernels.testing.pytest_record`); a crash is recorded against the test that was
    running, and pytest is started again on the tests it had not reached."""
    record_path = Path(run.args.out) / f"{run.path.stem}-{name}.record"
    record_path.unlink(missing_ok=True)
    base = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider"]
    log_path, env = _log_and_env(run, name, **{pytest_record.VARIABLE: str(record_path)})
    start = time.monotonic()
    crashes: list[dict] = []
    lines: list[str] = []
    with open(log_path, "w") as log:
        code, collected = _child([*base, "--collect-only", "-q", *targets], env, log, _timeout(run))
        ids = [line for line in collected if "::" in line and " " not in line]
        pending = ids if code == 0 and ids else None  # None: run `targets` as given
        # Test ids are relative to the working directory, which is the rootdir here; options
        # in `targets` are given as `--name=value`, so they can be told from paths.
        options = [t for t in targets if t.startswith("-")]
        command = [*base, "-v", "--tb=short", "-p", "dept_kernels.testing.pytest_record", *options]
        for _ in range(MAX_RESTARTS + 1):
            chosen = targets if pending is None else pending
            code, new = _child([*command, *chosen], env, log, _timeout(run))
            lines += new
            if code is None or code in PYTEST_EXIT_CODES or pending is None:
                break
            done = pytest_outcomes(lines)
            started, _ = pytest_record.read(str(record_path))
            running = next((i for i in reversed(started) if i not in done), None)
            fatal = next((ln for ln in new if "Fatal Python error" in ln), f"exit code {code}")
            crashes.append({"id": running, "message": f"crashed: {fatal}"})
            pending = [i for i in pending if i not in done and i != running]
            if not pending:
                break
    outcomes = pytest_outcomes(lines)
    counts: dict[str, int] = {}
    for outcome in outcomes.values():
        counts[outcome] = counts.get(outcome, 0) + 1
    _, messages = pytest_record.read(str(record_path))
    failures = [{"id": i, "message": m} for i, m in messages.items()] + crashes
    result = {
        "counts": counts,
        "crashes": len(crashes),
        "failures": failures,
        "exit_code": code,
        "stopped_by_budget": code is None,
        "seconds": round(time.monotonic() - start, 1),
        "log": log_path.name,
    }
    stopped = " (stopped: budget spent)" if code is None else ""
    print(
        f"{name}: {counts}, {len(crashes)} crashes, in {result['seconds']} s{stopped}", flush=True
    )
    for failure in failures[:30]:
        last = failure["message"].strip().splitlines()[-1:] or [""]
        print(f"  {failure['id']}: {last[0][:200]}", flush=True)
    return result


def tests_stage(run: Run) -> dict:
    return _pytest(run, "tests", FOCUSED_TESTS)


def suite_stage(run: Run) -> dict:
    ignore = [f"--ignore={path}" for path in FOCUSED_TESTS]
    return _pytest(run, "suite", ["tests", *ignore])


def bench_stage(run: Run) -> dict:
    json_path = Path(run.args.out) / f"{run.path.stem}-pytest-benchmark.json"
    outcome = _pytest(run, "bench", ["bench", "--benchmark-only", f"--benchmark-json={json_path}"])
    outcome["pytest_benchmark_json"] = json_path.name
    return outcome


def _command(run: Run, name: str, command: list[str]) -> dict:
    """Run `command` in a child process, its output to `<out>/<stem>-<name>.log`, stopped
    when the budget is spent."""
    log_path, env = _log_and_env(run, name)
    start = time.monotonic()
    with open(log_path, "w") as log:
        code, lines = _child(command, env, log, _timeout(run))
    result = {
        "exit_code": code,
        "stopped_by_budget": code is None,
        "seconds": round(time.monotonic() - start, 1),
        "log": log_path.name,
        "tail": lines[-40:],
    }
    stopped = " (stopped: budget spent)" if code is None else ""
    print(f"{name}: exit code {code} in {result['seconds']} s{stopped}", flush=True)
    print("\n".join(lines[-40:]), flush=True)
    return result


# (batch, sequence length) of the overhead stage's runs: issue 17's, then a larger batch.
OVERHEAD_SIZES = ((8, 128), (32, 512))


def overhead_stage(run: Run) -> dict:
    """AoT fused inference against the unpatched model on CUDA (`bench/aot_overhead.py`,
    paired rounds), one child process per size in `OVERHEAD_SIZES`."""
    runs = {}
    for batch, seq in OVERHEAD_SIZES:
        name = f"overhead-b{batch}-s{seq}"
        sizes = ["--batch", str(batch), "--seq", str(seq)]
        command = [sys.executable, "bench/aot_overhead.py", "--device", "cuda", *sizes]
        runs[name] = _command(run, name, [*command, "--rounds", "31"])
        if runs[name]["stopped_by_budget"]:
            break
    codes = [r["exit_code"] for r in runs.values()]
    return {
        "runs": runs,
        "exit_code": next((c for c in codes if c), 0),
        "stopped_by_budget": any(r["stopped_by_budget"] for r in runs.values()),
    }


def main_job_stage(run: Run) -> dict:
    """The main job at the paper's sizes (`python -m dept_kernels.bench --full`): training
    at T5-base dims, inference, serving, and the kernel table at every shape, on CUDA."""
    out = Path(run.args.out) / f"{run.path.stem}-main-job"
    command = [sys.executable, "-m", "dept_kernels.bench", "--device", "cuda", "--full"]
    result = _command(run, "main-job", [*command, "--out", str(out)])
    result["out"] = out.name
    return result


STAGES: dict[str, Stage] = {
    "kernels": Stage(kernels_stage, "each kernel alone: time, bandwidth, the op's overhead", True),
    "overhead": Stage(overhead_stage, "AoT fused inference against the unpatched model", True),
    "tests": Stage(tests_stage, "the focused tests on CUDA tensors", True),
    "suite": Stage(suite_stage, "the rest of the test suite on CUDA tensors", False),
    "bench": Stage(bench_stage, "pytest bench --benchmark-only", False),
    "main-job": Stage(main_job_stage, "python -m dept_kernels.bench --full on CUDA", False),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dept_kernels.gpu_run",
        description=__doc__.split("\n\n")[0],
        epilog="stages, in order: "
        + "; ".join(
            f"{k} ({'default' if s.default else '--' + k}): {s.help}" for k, s in STAGES.items()
        ),
    )
    parser.add_argument("--out", default="bench/results", help="where the JSON and logs go")
    parser.add_argument("--suite", action="store_true", help="also run the suite stage")
    parser.add_argument("--bench", action="store_true", help="also run the bench stage")
    parser.add_argument("--main-job", action="store_true", help="also run the main-job stage")
    parser.add_argument(
        "--stages", default=None, help="comma-separated stages to run instead (e.g. kernels)"
    )
    parser.add_argument("--budget", type=float, default=None, help="seconds for the whole run")
    parser.add_argument("--repeats", type=int, default=50, help="timed launches per kernel row")
    parser.add_argument("--shapes", default="t5-base,gpt2,llama-2-7b")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    return parser


def _chosen(args: argparse.Namespace) -> list[str]:
    if args.stages is not None:
        names = [s for s in args.stages.split(",") if s]
        unknown = [s for s in names if s not in STAGES]
        if unknown:
            raise SystemExit(f"gpu_run: --stages: unknown {unknown}; stages are {list(STAGES)}")
        return [s for s in STAGES if s in names]
    return [k for k, s in STAGES.items() if s.default or getattr(args, k.replace("-", "_"), False)]


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    chosen = _chosen(args)
    if not torch.cuda.is_available():
        print("gpu_run: no CUDA GPU on this machine; nothing to run (the CPU suite is `pytest`).")
        return 0
    if os.environ.pop("TRITON_INTERPRET", None) is not None:
        print("gpu_run: TRITON_INTERPRET unset: Triton kernels are compiled on a GPU machine")
    deadline = None if args.budget is None else time.monotonic() + args.budget
    env = environment()
    print(json.dumps(env, indent=2), flush=True)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", env["device"]).strip("-").lower()
    run = Run(
        args, {"environment": env, "stages": {}}, out_dir / f"{slug}-{env['date']}.json", deadline
    )
    status = 0
    for name in chosen:
        remaining = run.remaining()
        if remaining is not None and remaining < 2 * MARGIN_S:
            run.result["stages"][name] = {"skipped": "budget spent"}
            run.write()
            print(f"gpu_run: {name} skipped: budget spent", flush=True)
            continue
        print(f"gpu_run: stage {name}", flush=True)
        start = time.monotonic()
        try:
            stage = STAGES[name].run(run)
        except Exception:
            stage = {"error": traceback.format_exc()}
            print(stage["error"], flush=True)
        stage["stage_seconds"] = round(time.monotonic() - start, 1)
        failed = (
            "error" in stage
            or stage.get("exit_code") not in (None, 0)
            or stage.get("stopped_by_budget")
            or stage.get("failures")
        )
        status |= bool(failed)
        run.result["stages"][name] = stage
        run.write()
        print(f"gpu_run: {name} done in {stage['stage_seconds']} s; wrote {run.path}", flush=True)
    return 1 if status else 0


if __name__ == "__main__":
    sys.exit(main())
