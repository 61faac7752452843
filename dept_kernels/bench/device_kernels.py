"""Each kernel alone on a GPU: its time, the bytes it must move, and the op's overhead.

The first stage of `python -m dept_kernels.gpu_run`. Per kernel, shape, dtype and backend:

- `kernel_ms`: the backend's launcher called directly (no validation, no autograd), timed
  with device events around one launch, median of `repeats`. Before each launch the L2 cache
  is flushed (a buffer of twice its size is overwritten) and the GPU is kept busy for about
  a millisecond (`torch.cuda._sleep`), so that the host's launch cost falls inside that wait
  and not inside the timed region.
- `GBps`, `of_peak`, `of_copy`: the fewest bytes the kernel must move (each input read once,
  each output written once, counted below per kernel) over `kernel_ms`, and that rate as a
  fraction of the data-sheet peak and of the device-to-device copy rate measured here.
- `op_ms`: the public op (validation, dispatch and, for `+backward` rows, autograd) called
  back to back with no flush, per call: what a model sees. `op_ms - kernel_ms` is the
  Python overhead, host syncs included. `op_custom_ops_ms`: the same with every call
  through the custom ops (`ops._eager.custom_ops_only`), as before the eager path. The
  `dept_forward+backward` rows time the op's
  training step (forward, then backward through autograd) in both columns: it has no single
  kernel.

On the CPU (the tests) the same code runs with host timers and no flush.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from .. import backends
from ..ops import aot_bias_add, dept_embedding, fc_rows, kron_rows
from ..ops._eager import custom_ops_only
from ._timing import median_iqr, sync
from .kernels import make_problem
from .shapes import AOT_SHAPES, SHAPES, Shape, zipf_ids

__all__ = [
    "BACKEND_FAMILIES",
    "CASE_FAMILIES",
    "PEAK_BANDWIDTH",
    "KernelCase",
    "cases",
    "copy_bandwidth",
    "forward_min_bytes",
    "peak_bandwidth",
    "reduce_min_bytes",
    "table",
]

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

# The AoT suites' ranks (bench/test_bench_aot_ops.py): Kronecker r = 32, FC r = 64, factors
# in fp32 as `methods.AoTLayer` keeps them.
KRON_RANK = 32
FC_RANK = 64
# Cycles the GPU spins before each timed launch (about 1 ms at 2 GHz): longer than any
# launcher's host cost, so the launch is queued before the start event fires.
SPIN_CYCLES = 2_000_000


def peak_bandwidth(name: str) -> float | None:
    """Data-sheet peak for the device `name`, longest matching key first."""
    for key in sorted(PEAK_BANDWIDTH, key=len, reverse=True):
        if key in name:
            return PEAK_BANDWIDTH[key]
    return None


def _size(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits // 8


def forward_min_bytes(shape: Shape, dtype: torch.dtype) -> int:
    """Bytes the DePT forward must move at least: ids, the gathered rows, the output (the
    prompt and low-rank factors, a few hundred KB, are left out)."""
    elem = _size(dtype)
    tokens = shape.batch * shape.seq
    return (
        tokens * 8 + tokens * shape.d * elem + shape.batch * (shape.m + shape.seq) * shape.d * elem
    )


def reduce_min_bytes(shape: Shape, dtype: torch.dtype) -> int:
    """Bytes the backward reduction must move at least: the token gradients, fp32 sums out."""
    return shape.batch * shape.seq * shape.d * _size(dtype) + shape.seq * shape.d * 4


@dataclasses.dataclass
class KernelCase:
    """One row: `launch` calls the kernel alone, `op` the public op (None: same as launch)."""

    kernel: str
    backend: str
    shape: str
    dtype: torch.dtype
    min_bytes: int
    launch: Callable[[], object]
    op: Callable[[], object] | None = None


def _dept_cases(
    shape: Shape, dtype: torch.dtype, names: list[str], device: str
) -> Iterator[KernelCase]:
    kw = make_problem(shape, dtype, device)
    params = [kw["prompt"], kw["lora_a"], kw["lora_b"]]
    with torch.no_grad():
        out = dept_embedding(**kw)
    grad = torch.randn_like(out)
    detached = {k: v.detach() if isinstance(v, Tensor) else v for k, v in kw.items()}
    fwd_bytes = forward_min_bytes(shape, dtype)
    for name in names:
        impl = backends.load(name)

        def forward(impl=impl):
            return impl.forward(
                detached["input_ids"],
                detached["weight"],
                detached["prompt"],
                detached["lora_a"],
                detached["lora_b"],
                None,
                detached["scaling"],
            )

        def op_forward(name=name):
            with backends.use_backend(name), torch.no_grad():
                return dept_embedding(**kw)

        def op_step(name=name):
            with backends.use_backend(name):
                return torch.autograd.grad(dept_embedding(**kw), params, grad)

        def reduce(impl=impl):
            return impl.reduce(grad, shape.m, None, None)

        common = {"backend": name, "shape": shape.name, "dtype": dtype}
        yield KernelCase(
            "dept_forward", min_bytes=fwd_bytes, launch=forward, op=op_forward, **common
        )
        yield KernelCase(
            "dept_reduce", min_bytes=reduce_min_bytes(shape, dtype), launch=reduce, **common
        )
        # The op's forward and backward: what a training step pays for the embedding.
        step_bytes = fwd_bytes + grad.numel() * grad.element_size()
        yield KernelCase("dept_forward+backward", min_bytes=step_bytes, launch=op_step, **common)


def _zipf_batch(shape: Shape, device: str) -> tuple[Tensor, Tensor]:
    """Zipf ids over the vocabulary (about 45% distinct at these sizes) and the batch's
    distinct ids."""
    ids = zipf_ids(shape.batch, shape.seq, shape.vocab).to(device)
    return ids, torch.unique(ids)


def _aot_cases(
    shape: Shape, dtype: torch.dtype, names: list[str], device: str
) -> Iterator[KernelCase]:
    g = torch.Generator().manual_seed(0)
    ids, used = _zipf_batch(shape, device)
    hidden = torch.randn(shape.batch, shape.seq, shape.d, generator=g).to(device, dtype)
    table_ = torch.randn(shape.vocab, shape.d, generator=g).to(device, dtype)
    out = torch.empty_like(hidden)
    elem = _size(dtype)
    # hidden read, out written, the ids, each distinct table row read once.
    nbytes = 2 * hidden.numel() * elem + ids.numel() * 8 + used.numel() * shape.d * elem
    for name in names:
        impl = backends.load(name)

        def gather(impl=impl):
            return impl.gather_add(hidden, ids, table_, out)

        def op(name=name):
            with backends.use_backend(name), torch.no_grad():
                return aot_bias_add(hidden, ids, table_)

        yield KernelCase("aot_gather_add", name, shape.name, dtype, nbytes, launch=gather, op=op)


def _aot_rows_cases(
    shape: Shape, dtype: torch.dtype, names: list[str], device: str
) -> Iterator[KernelCase]:
    """The rows of the batch's distinct ids, formed by torch ops whatever the backend (the
    factors in fp32; `dtype` is the FC embedding's)."""
    del names
    g = torch.Generator().manual_seed(0)
    _, used = _zipf_batch(shape, device)
    b = math.isqrt(shape.vocab - 1) + 1
    a = -(-shape.vocab // b)
    w_l = torch.randn(a, KRON_RANK, generator=g).to(device)
    w_m = torch.randn(b, KRON_RANK, generator=g).to(device)
    w_r = (torch.randn(KRON_RANK**2, shape.d, generator=g) / KRON_RANK).to(device)
    emb = torch.randn(shape.vocab, shape.d, generator=g).to(device, dtype)
    w1 = (torch.randn(shape.d, FC_RANK, generator=g) / shape.d**0.5).to(device)
    b1 = torch.zeros(FC_RANK, device=device)
    w2 = (torch.randn(FC_RANK, shape.d, generator=g) / FC_RANK**0.5).to(device)
    b2 = torch.zeros(shape.d, device=device)
    rows_out = used.numel() * shape.d * 4
    common = {"backend": "torch", "shape": shape.name, "dtype": dtype}

    def kron():
        with torch.no_grad():
            return kron_rows(used, w_l, w_m, w_r)

    def fc():
        with torch.no_grad():
            return fc_rows(used, emb, w1, b1, w2, b2)

    yield KernelCase("aot_kron_rows", min_bytes=rows_out + w_r.numel() * 4, launch=kron, **common)
    fc_bytes = used.numel() * shape.d * _size(dtype) + rows_out + 2 * w1.numel() * 4
    yield KernelCase("aot_fc_rows", min_bytes=fc_bytes, launch=fc, **common)


Family = Callable[[Shape, torch.dtype, list[str], str], Iterator[KernelCase]]
# family: (its shapes, its cases); the cases of BACKEND_FAMILIES run once per backend.
CASE_FAMILIES: dict[str, tuple[dict[str, Shape], Family]] = {
    "dept": (SHAPES, _dept_cases),
    "aot": (AOT_SHAPES, _aot_cases),
    "aot_rows": (AOT_SHAPES, _aot_rows_cases),
}
BACKEND_FAMILIES = ("dept", "aot")


def cases(
    shapes: list[str],
    dtypes: list[torch.dtype],
    names: list[str],
    device: str,
    families: list[str] | None = None,
) -> Iterator[KernelCase]:
    """Every kernel case of `families` (default: all) at `shapes` x `dtypes` on the backends
    `names`; each (family, shape, dtype) problem lives only while its cases are timed."""
    for family in families or list(CASE_FAMILIES):
        table_, make = CASE_FAMILIES[family]
        for shape_name in shapes:
            if shape_name not in table_:
                raise ValueError(
                    f"shapes: {shape_name!r} is not a {family} shape ({sorted(table_)})"
                )
            for dtype in dtypes:
                yield from make(table_[shape_name], dtype, names, device)


class _Flush:
    """Overwrites a buffer of twice the device's L2 size (at least 64 MiB)."""

    def __init__(self, device: str) -> None:
        l2 = 0
        if device == "cuda":
            l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 0)
        self.buffer = torch.empty(max(2 * l2, 64 << 20), dtype=torch.uint8, device=device)

    def __call__(self) -> None:
        self.buffer.zero_()


def kernel_times(fn: Callable[[], object], repeats: int, device: str) -> list[float]:
    """Seconds of each of `repeats` calls of `fn`, each after an L2 flush (CUDA: device
    events around the call, the GPU spinning before it; CPU: host clock)."""
    fn()
    fn()
    sync(device)
    times = []
    if device != "cuda":
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return times
    flush = _Flush(device)
    events = [
        (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        for _ in range(repeats)
    ]
    for start, end in events:
        flush()
        torch.cuda._sleep(SPIN_CYCLES)
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) / 1e3 for start, end in events]


def per_call_seconds(fn: Callable[[], object], calls: int, device: str) -> float:
    """Wall seconds per call of `fn` called `calls` times back to back: the host's cost
    where it exceeds the device's."""
    fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    sync(device)
    return (time.perf_counter() - start) / calls


def copy_bandwidth(device: str, nbytes: int | None = None, repeats: int = 20) -> float:
    """Bytes/s of a device-to-device copy of `nbytes` (read plus written; default 1 GiB on a
    GPU, 16 MiB on the CPU), median."""
    if nbytes is None:
        nbytes = 1 << 30 if device == "cuda" else 1 << 24
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    seconds = statistics.median(kernel_times(lambda: dst.copy_(src), repeats, device))
    return 2 * nbytes / seconds


def table(
    shapes: list[str],
    dtypes: list[torch.dtype],
    names: list[str],
    device: str,
    repeats: int,
    peak: float | None,
    copy_rate: float,
    families: list[str] | None = None,
) -> Iterator[dict]:
    """One row per kernel case (see the module docstring for the columns), as each is timed."""
    for case in cases(shapes, dtypes, names, device, families):
        median, iqr = median_iqr(kernel_times(case.launch, repeats, device))
        op = per_call_seconds(case.op or case.launch, repeats, device)
        with custom_ops_only():
            dispatched = per_call_seconds(case.op or case.launch, repeats, device)
        rate = case.min_bytes / median
        yield {
            "kernel": case.kernel,
            "backend": case.backend,
            "shape": case.shape,
            "dtype": str(case.dtype).removeprefix("torch."),
            "kernel_ms": median * 1e3,
            "kernel_iqr_ms": iqr * 1e3,
            "min_bytes": case.min_bytes,
            "GBps": rate / 1e9,
            "of_peak": None if peak is None else rate / peak,
            "of_copy": rate / copy_rate,
            "op_ms": op * 1e3,
            "op_custom_ops_ms": dispatched * 1e3,
        }


def format_row(row: dict) -> str:
    """One line of the printed table."""
    peak = "" if row["of_peak"] is None else f" {row['of_peak']:5.0%} of peak"
    return (
        f"{row['kernel']:22} {row['backend']:6} {row['shape']:10} {row['dtype']:8} "
        f"{row['kernel_ms']:8.4f} ms (IQR {row['kernel_iqr_ms']:.4f}) {row['GBps']:7.0f} GB/s"
        f"{peak} {row['of_copy']:5.0%} of copy | op {row['op_ms']:8.4f} ms/call "
        f"({row['op_custom_ops_ms']:.4f} through the custom ops)"
    )
