"""The cpu backward of the DePT embedding (the low-rank and prompt gradients) in position
mode and in rows mode (per-sample position ids, each sample's rows reversed), rotated every
round in one process.

    T=1 python bench/cpu_reduce_cost.py      (T: intra-op threads, default 1)

Run it with the library of another checkout on PYTHONPATH to compare before and after.
"""

from __future__ import annotations

import os
import statistics
import time

import torch

import dept_kernels
from dept_kernels.bench.kernels import make_problem
from dept_kernels.bench.shapes import SHAPES
from dept_kernels.ops import dept_embedding


def main() -> None:
    torch.set_num_threads(int(os.environ.get("T", "1")))
    where = os.path.dirname(dept_kernels.__file__)
    print(f"dept_kernels from {where}; {torch.get_num_threads()} threads")
    for name in ("t5-base", "llama-2-7b"):
        shape = SHAPES[name]
        kw = make_problem(shape, torch.float32, "cpu")
        rows = torch.arange(shape.seq).flip(0).expand(shape.batch, -1).contiguous()
        params = [kw["lora_a"], kw["lora_b"], kw["prompt"]]
        with dept_kernels.use_backend("cpu"):
            outs = {
                "position": dept_embedding(**kw),
                "rows": dept_embedding(**kw, position_ids=rows),
            }
            grad = torch.randn_like(outs["position"])
            times: dict[str, list[float]] = {k: [] for k in outs}
            for i in range(22):
                items = list(outs.items())
                for k, y in items if i % 2 else items[::-1]:
                    start = time.perf_counter()
                    torch.autograd.grad(y, params, grad, retain_graph=True)
                    times[k].append(time.perf_counter() - start)
        for k, t in times.items():
            t = t[2:]  # the first round of each warms up
            print(
                f"{name:10} {k:9} backward median {statistics.median(t) * 1e3:7.2f} ms  "
                f"min {min(t) * 1e3:7.2f}"
            )


if __name__ == "__main__":
    main()
