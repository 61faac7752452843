"""The DePT backward against the memory floor (issue 17, part 1), on the CPU.

    python bench/backward_floor.py [--shape t5-base] [--rounds 15] [--dtype float32]

Times, round-robin in one process (each round runs every candidate once, in a rotated order,
so load from other processes falls on all alike; freed host memory kept, `_timing.
kept_freed_memory`, unless --release-memory), the median and interquartile range of:
the copy of an output-sized buffer (the bandwidth floor), `gy.sum(0)` (one read of the output
gradient), the library's forward and forward+backward on the `cpu` backend, and the same for
`torch.compile` of the official formula. Run it with the library of another checkout on
PYTHONPATH to compare before and after.

It also times the parts every implementation of forward+backward does in some form, each
with torch's own kernel: the embedding gather (B, s rows), the delta GEMM A @ B and the two
gradient GEMMs, dA^T = B @ S^T (the faster of the two orders here) and dB = A^T @ S, on the
(s, d) batch sums S. With `gy.sum(0)` they add up to the cost of running the parts one after
another; the report sets the goal's time (compile / 1.25) against that sum, so a reader sees
how far below the parts in series the goal lies.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
from collections.abc import Callable

import torch
import torch.nn.functional as F

import dept_kernels
from dept_kernels import backends
from dept_kernels.bench import verdict
from dept_kernels.bench._timing import interleaved_times, kept_freed_memory, median_iqr
from dept_kernels.bench.kernels import forward_backward, make_problem
from dept_kernels.bench.shapes import SHAPES
from dept_kernels.ops import dept_embedding
from dept_kernels.testing import official_dept_embedding

# The parts' rows; with "gy.sum(0)" they make up the parts in series.
PARTS = ("part: gather", "part: A @ B", "part: B @ S^T", "part: A^T @ S")
UNFUSED = "library fwd+bwd, reduce_lowrank off"
# Issue 17's goal: the library's forward+backward this many times faster than compile's.
GOAL_SPEEDUP = 1.25


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="t5-base", choices=sorted(SHAPES))
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, help="intra-op threads (default: torch's)")
    parser.add_argument(
        "--unfused",
        action="store_true",
        help="also time the library with the cpu backend's reduce_lowrank off (its reduce "
        "and two matmuls instead), in the same rounds",
    )
    parser.add_argument(
        "--release-memory",
        action="store_true",
        help="leave the allocator's default: freed outputs go back to the OS and fault again",
    )
    args = parser.parse_args()
    default = contextlib.nullcontext("host memory: the allocator's default")
    with default if args.release_memory else kept_freed_memory() as memory:
        measure(args, memory)


def measure(args: argparse.Namespace, memory: str) -> None:
    """Times the candidates and prints the table and the findings."""
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = SHAPES[args.shape]
    dtype = getattr(torch, args.dtype)
    kw = make_problem(shape, dtype, "cpu")
    with torch.no_grad():
        out = official_dept_embedding(**kw)
    grad_out = torch.randn_like(out)
    a = kw["lora_a"].detach()[: shape.seq]
    b = kw["lora_b"].detach()
    sums = grad_out[:, shape.m :].sum(0)
    compiled = torch.compile(official_dept_embedding)

    def library(**k):
        with dept_kernels.use_backend("cpu"):
            return dept_embedding(**k)

    def no_grad(fn: Callable) -> Callable[[], object]:
        def call():
            with torch.no_grad():
                return fn(**kw)

        return call

    fns = {
        "copy (floor)": lambda: torch.empty_like(out).copy_(out),
        "gy.sum(0)": lambda: grad_out.sum(0),
        "library fwd": no_grad(library),
        "compile fwd": no_grad(compiled),
        "library fwd+bwd": forward_backward(library, kw, grad_out),
        "compile fwd+bwd": forward_backward(compiled, kw, grad_out),
        # The parts (see the module docstring), each with torch's own kernel.
        PARTS[0]: lambda: F.embedding(kw["input_ids"], kw["weight"]),
        PARTS[1]: lambda: a @ b,
        PARTS[2]: lambda: b @ sums.T,
        PARTS[3]: lambda: a.T @ sums,
    }
    if args.unfused:
        fns[UNFUSED] = unfused(forward_backward(library, kw, grad_out))
    load_before = os.getloadavg()
    faults: dict[str, list[int]] = {}
    times = interleaved_times(fns, args.rounds, "cpu", faults)
    load_after = os.getloadavg()
    stats = {name: median_iqr(t) for name, t in times.items()}
    print(
        f"dept_kernels from {os.path.dirname(dept_kernels.__file__)}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs, {platform.processor() or '?'}"
    )
    print(
        f"shape {shape.name}: B={shape.batch} s=L={shape.seq} d={shape.d} m={shape.m} "
        f"r={shape.r}, {args.dtype}, {args.rounds} interleaved rounds; load average "
        f"{load_before[0]:.2f} before, {load_after[0]:.2f} after; {memory}"
    )
    width = max(len(name) for name in stats)
    print(
        f"{'candidate':{width}} {'median ms':>10} {'IQR ms':>8} {'IQR/median':>11} {'min ms':>8} "
        f"{'faults/call':>12}"
    )
    for name, (med, iqr) in stats.items():
        fastest = min(times[name]) * 1e3
        # Median and largest minor page faults of a call: a fresh output faults once a page.
        per_call = f"{statistics.median(faults[name]):.0f}/{max(faults[name])}"
        print(
            f"{name:{width}} {med * 1e3:10.3f} {iqr * 1e3:8.3f} {iqr / med:10.1%} {fastest:8.3f} "
            f"{per_call:>12}"
        )
    med = {name: s[0] for name, s in stats.items()}
    ratios = ratio_lines(med)
    if UNFUSED in med:
        ratios.append(
            (
                f"library fwd+bwd with reduce_lowrank {med['library fwd+bwd'] * 1e3:.2f} ms, "
                f"without {med[UNFUSED] * 1e3:.2f} ms: "
                f"{verdict.speed_phrase(med[UNFUSED], med['library fwd+bwd'])} with it",
                ("library fwd+bwd", UNFUSED),
            )
        )
    broken = [
        f"{who} fwd+bwd {med[f'{who} fwd+bwd'] * 1e3:.2f} ms is below its fwd "
        f"{med[f'{who} fwd'] * 1e3:.2f} ms"
        for who in ("library", "compile")
        if med[f"{who} fwd+bwd"] < med[f"{who} fwd"]
    ]
    if dtype == torch.float32 and med["copy (floor)"] < med["gy.sum(0)"]:
        # A copy reads and writes what gy.sum(0) only reads. Not in half precision, where
        # torch's CPU sum converts every element and runs slower than a copy of the bytes.
        broken.append("the copy floor is faster than one read of the output gradient")
    spreads = {name: iqr / m for name, (m, iqr) in stats.items()}
    print("\n".join(judged(ratios, spreads, broken)))


def judged(
    lines: list[tuple[str, tuple[str, ...]]], spreads: dict[str, float], broken: list[str]
) -> list[str]:
    """The main job's rule (dept_kernels/bench/verdict.py), line by line: a line is stated
    when every row it is computed from is within the noise limit, else counted as
    inconclusive; a broken invariant (a sign of load) voids every line."""
    if broken:
        return verdict.findings([], {}, broken)
    items = [([line], {name: spreads[name] for name in rows}) for line, rows in lines]
    return verdict.findings_each(items, "lines")


def unfused(step: Callable[[], object]) -> Callable[[], object]:
    """`step` with the cpu backend's optional `reduce_lowrank` off for the call, so the
    backward takes the generic path (`ops/_grads.py`): `reduce`, then two matmuls."""
    kernels = backends.load("cpu")

    def call():
        fused = getattr(kernels, "reduce_lowrank", None)
        kernels.reduce_lowrank = None
        try:
            return step()
        finally:
            kernels.reduce_lowrank = fused

    return call


def ratio_lines(med: dict[str, float]) -> list[tuple[str, tuple[str, ...]]]:
    """The ratios the issue's goals name, and the parts in series, from the rows' medians:
    each line with the rows it is computed from."""
    series_rows = (*PARTS, "gy.sum(0)")
    series = sum(med[name] for name in series_rows)
    goal = med["compile fwd+bwd"] / GOAL_SPEEDUP
    both = ("copy (floor)", "library fwd+bwd", "compile fwd+bwd")
    fwd = ("copy (floor)", "library fwd", "compile fwd")
    return [
        (
            f"fwd+bwd: compile / library = "
            f"{med['compile fwd+bwd'] / med['library fwd+bwd']:.2f}x (goal >= {GOAL_SPEEDUP}x); "
            f"library / copy = {med['library fwd+bwd'] / med['copy (floor)']:.2f}x "
            "(goal <= 1.7x)",
            both,
        ),
        (
            f"fwd: library / copy = {med['library fwd'] / med['copy (floor)']:.2f}x "
            f"(goal <= 1.2x); compile / library = {med['compile fwd'] / med['library fwd']:.2f}x",
            fwd,
        ),
        (
            f"parts in series (gather, A @ B, gy.sum(0), B @ S^T, A^T @ S) = "
            f"{series * 1e3:.2f} ms; library fwd+bwd = {med['library fwd+bwd'] / series:.2f}x "
            f"of it, compile {med['compile fwd+bwd'] / series:.2f}x; the goal's time "
            f"(compile / {GOAL_SPEEDUP}) = {goal * 1e3:.2f} ms = {goal / series:.2f}x of it",
            (*series_rows, "library fwd+bwd", "compile fwd+bwd"),
        ),
    ]


if __name__ == "__main__":
    main()
