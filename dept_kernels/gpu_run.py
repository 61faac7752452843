"""One command for a machine with a CUDA GPU: the whole test suite, then the benchmarks.

    python -m dept_kernels.gpu_run [--out bench/results] [--skip-tests]

1. `pytest tests` on CUDA tensors: the triton backend compiled (not interpreted) and the
   cuda backend built just in time, each against the torch reference.
2. The DePT forward and backward at model-named shapes on every GPU backend, with achieved
   bandwidth as a fraction of the device's peak (the minimum bytes each kernel must move,
   over its median time).
3. `pytest bench --benchmark-only`, saved as pytest-benchmark JSON.

Everything lands in `<out>/<gpu>-<date>.json` with the device name, driver, torch, triton
and CUDA versions. Without a GPU it says so and exits 0.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from . import backends
from .bench import SHAPES, Shape, make_problem, median_time
from .ops import dept_embedding

# Peak HBM bandwidth (bytes/s) by device name, from the vendors' data sheets; the measured
# device-to-device copy rate is reported beside it as the practical ceiling.
PEAK_BANDWIDTH = {
    "H200": 4.8e12,
    "H100 SXM": 3.35e12,
    "H100 80GB HBM3": 3.35e12,
    "H100 NVL": 3.9e12,
    "H100 PCIe": 2.0e12,
    "A100-SXM4-80GB": 2.039e12,
    "A100 80GB PCIe": 1.935e12,
    "A100-SXM4-40GB": 1.555e12,
    "A100-PCIE-40GB": 1.555e12,
}


def peak_bandwidth(name: str) -> float | None:
    """Data-sheet peak for the device `name`, longest matching key first."""
    for key in sorted(PEAK_BANDWIDTH, key=len, reverse=True):
        if key in name:
            return PEAK_BANDWIDTH[key]
    return None


def forward_min_bytes(shape: Shape, dtype: torch.dtype) -> int:
    """Bytes the DePT forward must move at least: ids, the gathered rows, the output."""
    elem = torch.finfo(dtype).bits // 8
    tokens = shape.batch * shape.seq
    return (
        tokens * 8 + tokens * shape.d * elem + shape.batch * (shape.m + shape.seq) * shape.d * elem
    )


def reduce_min_bytes(shape: Shape, dtype: torch.dtype) -> int:
    """Bytes the backward reduction must move at least: the token gradients, fp32 sums out."""
    elem = torch.finfo(dtype).bits // 8
    return shape.batch * shape.seq * shape.d * elem + shape.seq * shape.d * 4


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
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": props.name,
        "compute_capability": f"{props.major}.{props.minor}",
        "multiprocessors": props.multi_processor_count,
        "memory_gib": round(props.total_memory / 2**30, 1),
        "driver": driver,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "python": platform.python_version(),
        "date": datetime.date.today().isoformat(),
    }


def _time_backend(
    backend: str, kw: dict, grad: torch.Tensor, m: int, repeats: int
) -> tuple[float, float]:
    """Median seconds of the forward and of the backward reduction on `backend`."""
    with backends.use_backend(backend), torch.no_grad():
        fwd = median_time(lambda: dept_embedding(**kw), repeats, "cuda")
    impl = backends.load(backend)
    red = median_time(lambda: impl.reduce(grad, m, None, None), repeats, "cuda")
    return fwd, red


def bandwidth_table(shapes: list[str], dtypes: list[torch.dtype], repeats: int) -> list[dict]:
    """Forward and backward reduction of every GPU backend, time and fraction of peak."""
    name = torch.cuda.get_device_properties(0).name
    peak = peak_bandwidth(name)
    rows = []
    for shape_name in shapes:
        shape = SHAPES[shape_name]
        for dtype in dtypes:
            kw = make_problem(shape, dtype, "cuda")
            with torch.no_grad():
                out = dept_embedding(**kw)
            copy = median_time(lambda out=out: torch.empty_like(out).copy_(out), repeats, "cuda")
            fwd_bytes = forward_min_bytes(shape, dtype)
            red_bytes = reduce_min_bytes(shape, dtype)
            grad = torch.randn_like(out)
            for backend in ("triton", "cuda"):
                if backend not in backends.available_backends():
                    continue
                fwd, red = _time_backend(backend, kw, grad, shape.m, repeats)
                rows.append(
                    {
                        "shape": shape_name,
                        "dtype": str(dtype).removeprefix("torch."),
                        "backend": backend,
                        "forward_ms": fwd * 1e3,
                        "forward_min_bytes": fwd_bytes,
                        "forward_GBps": fwd_bytes / fwd / 1e9,
                        "forward_fraction_of_peak": None
                        if peak is None
                        else fwd_bytes / fwd / peak,
                        "reduce_ms": red * 1e3,
                        "reduce_GBps": red_bytes / red / 1e9,
                        "reduce_fraction_of_peak": None if peak is None else red_bytes / red / peak,
                        "copy_GBps": 2 * out.numel() * out.element_size() / copy / 1e9,
                    }
                )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_run: no CUDA GPU on this machine; nothing to run (the CPU suite is `pytest`).")
        return 0
    if os.environ.pop("TRITON_INTERPRET", None) is not None:
        print("gpu_run: TRITON_INTERPRET unset: Triton kernels are compiled on a GPU machine")
    env = environment()
    print(json.dumps(env, indent=2))
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", env["device"]).strip("-").lower()
    result_path = out_dir / f"{slug}-{env['date']}.json"
    result: dict = {"environment": env}
    status = 0
    if not args.skip_tests:
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "tests", "-q", "-p", "no:cacheprovider"]
        )
        result["tests_exit_code"] = done.returncode
        status |= done.returncode
    result["bandwidth"] = bandwidth_table(
        ["t5-base", "gpt2", "llama-2-7b"], [torch.float32, torch.bfloat16], args.repeats
    )
    for row in result["bandwidth"]:
        frac = row["forward_fraction_of_peak"]
        print(
            f"{row['shape']:11} {row['dtype']:8} {row['backend']:6} fwd {row['forward_ms']:.3f} ms "
            f"{row['forward_GBps']:.0f} GB/s"
            + ("" if frac is None else f" ({frac:.0%} of peak)")
            + f"  reduce {row['reduce_ms']:.3f} ms {row['reduce_GBps']:.0f} GB/s"
        )
    bench_json = out_dir / f"{slug}-{env['date']}-pytest-benchmark.json"
    bench = ["bench", "--benchmark-only", f"--benchmark-json={bench_json}"]
    done = subprocess.run([sys.executable, "-m", "pytest", *bench, "-q", "-p", "no:cacheprovider"])
    result["bench_exit_code"] = done.returncode
    result["pytest_benchmark_json"] = bench_json.name
    status |= done.returncode
    result_path.write_text(json.dumps(result, indent=2))
    print(f"gpu_run: wrote {result_path}")
    return 1 if status else 0


if __name__ == "__main__":
    sys.exit(main())
