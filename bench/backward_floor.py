"""The DePT backward against the memory floor (issue 17, part 1), on the CPU.

    python bench/backward_floor.py [--shape t5-base] [--rounds 15] [--dtype float32]

Times, round-robin in one process (each round runs every candidate once, in a rotated order,
so load from other processes falls on all alike), the median and interquartile range of:
the copy of an output-sized buffer (the bandwidth floor), `gy.sum(0)` (one read of the output
gradient), the library's forward and forward+backward on the `cpu` backend, and the same for
`torch.compile` of the official formula. Run it with the library of another checkout on
PYTHONPATH to compare before and after.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Callable

import torch

import dept_kernels
from dept_kernels.bench import verdict
from dept_kernels.bench._timing import median_iqr, rotation
from dept_kernels.bench.kernels import forward_backward, make_problem
from dept_kernels.bench.shapes import SHAPES
from dept_kernels.ops import dept_embedding
from dept_kernels.testing import official_dept_embedding


def round_robin(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, list[float]]:
    """Seconds of each function per round, in rotated orders, after two warm-up calls each."""
    for fn in fns.values():
        fn()
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(rounds):
        for name in rotation(list(fns), i):
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="t5-base", choices=sorted(SHAPES))
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, help="intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = SHAPES[args.shape]
    dtype = getattr(torch, args.dtype)
    kw = make_problem(shape, dtype, "cpu")
    with torch.no_grad():
        out = official_dept_embedding(**kw)
    grad_out = torch.randn_like(out)
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
    }
    load_before = os.getloadavg()
    times = round_robin(fns, args.rounds)
    load_after = os.getloadavg()
    stats = {name: median_iqr(t) for name, t in times.items()}
    print(
        f"dept_kernels from {os.path.dirname(dept_kernels.__file__)}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs, {platform.processor() or '?'}"
    )
    print(
        f"shape {shape.name}: B={shape.batch} s=L={shape.seq} d={shape.d} m={shape.m} "
        f"r={shape.r}, {args.dtype}, {args.rounds} interleaved rounds; load average "
        f"{load_before[0]:.2f} before, {load_after[0]:.2f} after"
    )
    print(f"{'candidate':18} {'median ms':>10} {'IQR ms':>8} {'IQR/median':>11} {'min ms':>8}")
    for name, (med, iqr) in stats.items():
        fastest = min(times[name]) * 1e3
        print(f"{name:18} {med * 1e3:10.3f} {iqr * 1e3:8.3f} {iqr / med:10.1%} {fastest:8.3f}")
    med = {name: s[0] for name, s in stats.items()}
    ratios = [
        f"fwd+bwd: compile / library = {med['compile fwd+bwd'] / med['library fwd+bwd']:.2f}x "
        f"(goal >= 1.25x); library / copy = {med['library fwd+bwd'] / med['copy (floor)']:.2f}x "
        f"(goal <= 1.7x)",
        f"fwd: library / copy = {med['library fwd'] / med['copy (floor)']:.2f}x (goal <= 1.2x); "
        f"compile / library = {med['compile fwd'] / med['library fwd']:.2f}x",
    ]
    # The main job's rule (dept_kernels/bench/verdict.py): ratios only from a quiet run whose
    # invariants hold; otherwise the warning and "inconclusive".
    noisy = verdict.noisy_rows({name: iqr / m for name, (m, iqr) in stats.items()})
    broken = [
        f"{who} fwd+bwd {med[f'{who} fwd+bwd'] * 1e3:.2f} ms is below its fwd "
        f"{med[f'{who} fwd'] * 1e3:.2f} ms"
        for who in ("library", "compile")
        if med[f"{who} fwd+bwd"] < med[f"{who} fwd"]
    ]
    if med["copy (floor)"] < med["gy.sum(0)"]:
        # A copy reads and writes what gy.sum(0) only reads.
        broken.append("the copy floor is faster than one read of the output gradient")
    print("\n".join(verdict.findings(ratios, noisy, broken)))


if __name__ == "__main__":
    main()
