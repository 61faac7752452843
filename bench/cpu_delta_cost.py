"""What the low-rank delta costs the cpu forward: prompt tuning (no delta) against DePT in
position mode (row t for token t) and in rows mode (per-sample `position_ids`, as with left
padding), on one thread, rotated every round in one process.

    python bench/cpu_delta_cost.py [--rounds 30] [--shapes t5-base,llama-2-7b]

Run it with the library of another checkout on PYTHONPATH to compare before and after.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

import dept_kernels
from dept_kernels.bench._timing import median_iqr, rotation
from dept_kernels.bench.kernels import make_problem
from dept_kernels.bench.shapes import SHAPES
from dept_kernels.ops import dept_embedding


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--shapes", default="t5-base,llama-2-7b")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"dept_kernels from {os.path.dirname(dept_kernels.__file__)}; torch {torch.__version__}")
    for name in args.shapes.split(","):
        shape = SHAPES[name]
        kw = make_problem(shape, torch.float32, "cpu")
        plain = {k: v for k, v in kw.items() if k not in ("lora_a", "lora_b", "scaling")}
        # Every sample's rows reversed: per-sample rows, none repeated within a sample.
        rows = torch.arange(shape.seq).flip(0).expand(shape.batch, -1).contiguous()
        calls = {"PT": plain, "DePT position": kw, "DePT rows": dict(kw, position_ids=rows)}
        times: dict[str, list[float]] = {k: [] for k in calls}
        with torch.no_grad(), dept_kernels.use_backend("cpu"):
            for call in calls.values():
                dept_embedding(**call)
                dept_embedding(**call)
            for i in range(args.rounds):
                for k in rotation(list(calls), i):
                    start = time.perf_counter()
                    dept_embedding(**calls[k])
                    times[k].append(time.perf_counter() - start)
        for k, t in times.items():
            med, iqr = median_iqr(t)
            print(
                f"{name:10} {k:14} median {med * 1e3:8.2f} ms  IQR {iqr * 1e3:6.2f}  "
                f"min {min(t) * 1e3:8.2f}"
            )


if __name__ == "__main__":
    main()
