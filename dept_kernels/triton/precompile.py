"""Ahead-of-time compilation of every Triton kernel variant the launchers can pick.

`variants()` collects the launches each Triton module lists in `aot_variants()`, next to its
launchers: the dtypes they can pass crossed with the compile-time parameters their tables
give for them, so the list follows the launchers rather than a copy of them. `compile_all`
compiles each variant for CUDA targets with `triton.compile`, which needs no GPU: code that
only the real compiler (MLIR passes, LLVM, ptxas) rejects fails here, and the cubins tell
the registers ptxas assigned.

Kernels defined while `TRITON_INTERPRET=1` are interpreter objects that cannot be
compiled, so in such a process `compile_all` runs the build in a child process without it.

    python -m dept_kernels.triton.precompile [--cc 80 90] [--covering] [--json] [--cubin-dir DIR]

`--cubin-dir` also writes each compiled kernel there as `<variant index>_sm<cc>.cubin` (the
index in `variants()`), for tools that read the machine code (tests/triton/test_sass_facts.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor

import torch

from . import interpreting

__all__ = ["CompileResult", "Variant", "compile_all", "covering", "cubin_name", "variants"]

# The Triton modules of the library; each lists its launches in `aot_variants()`.
MODULES = ("dept_embedding", "aot_bias")
_TYPE = {
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.int32: "i32",
    torch.int64: "i64",
}
# Non-pointer runtime arguments are i32 sizes and strides except these.
_SCALARS = {"scaling": "fp32"}


@dataclasses.dataclass(frozen=True)
class Variant:
    """One compiled form of a kernel: the element dtype of each pointer and the constexprs."""

    module: str
    kernel: str
    pointers: tuple[tuple[str, torch.dtype], ...]
    constexprs: tuple[tuple[str, bool | int], ...]

    @property
    def label(self) -> str:
        parts = [f"{name}={_TYPE[dtype]}" for name, dtype in self.pointers]
        parts += [f"{name}={value}" for name, value in self.constexprs]
        return f"{self.kernel}[{','.join(parts)}]"

    def features(self) -> set[tuple]:
        """Pairs of choices this variant exercises (for `covering`)."""
        choices = [*self.pointers, *self.constexprs]
        return {(self.kernel, *a, *b) for a, b in itertools.combinations(choices, 2)}


@dataclasses.dataclass(frozen=True)
class CompileResult:
    """Outcome of one (variant, compute capability); registers from the cubin when it built.

    `spill_bytes` is the local memory per thread, where ptxas puts spilled registers (these
    kernels have no local arrays).
    """

    kernel: str
    label: str
    cc: int
    ok: bool
    error: str | None = None
    n_regs: int | None = None
    spill_bytes: int | None = None
    seconds: float = 0.0


def variants() -> list[Variant]:
    """Every kernel variant the launchers of `dept_kernels.triton` can launch."""
    return [
        Variant(name, kernel, tuple(pointers.items()), tuple(constexprs.items()))
        for name in MODULES
        for kernel, pointers, constexprs in _module(name).aot_variants()
    ]


def _module(name: str):
    return importlib.import_module(f"{__package__}.{name}")


def covering(items: Sequence[Variant]) -> list[Variant]:
    """A subset exercising every pair of choices (two pointer dtypes, a dtype and a
    constexpr, ...) that `items` exercises: greedy, deterministic, far smaller than the
    cross product."""
    todo = set().union(*(v.features() for v in items))
    chosen = []
    while todo:
        best = max(items, key=lambda v: len(v.features() & todo))
        chosen.append(best)
        todo -= best.features()
    return chosen


def _regs(cubin: bytes) -> tuple[int | None, int | None]:
    """(registers, local bytes) per thread, read with the cuobjdump bundled with triton."""
    from triton import knobs

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        try:
            usage = subprocess.run(
                [knobs.nvidia.cuobjdump.path, "--dump-resource-usage", f.name],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        except (OSError, RuntimeError, subprocess.CalledProcessError):
            return None, None
    regs, local = re.search(r"REG:(\d+)", usage), re.search(r"LOCAL:(\d+)", usage)
    return (int(regs[1]) if regs else None), (int(local[1]) if local else None)


def _compile(job: tuple[Variant, int, str | None]) -> CompileResult:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    variant, cc, cubin_path = job
    module = _module(variant.module)
    fn = getattr(module, variant.kernel)
    pointers, constexprs = dict(variant.pointers), dict(variant.constexprs)
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        if name in pointers:
            signature[name] = "*" + _TYPE[pointers[name]]
        else:
            signature[name] = _SCALARS.get(name, "i32")
        # Compiled as on the common path, whose vectorised code is what runs: aligned
        # pointers (torch allocations), widths and strides that are multiples of 16. Sizes
        # in RUNTIME_SIZES are never specialised on.
        if name in pointers or (name not in module.RUNTIME_SIZES and name not in _SCALARS):
            attrs[(i,)] = [["tt.divisibility", 16]]
    start = time.perf_counter()
    try:
        kernel = triton.compile(
            ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
            target=GPUTarget("cuda", cc, 32),
            options=dict(module.COMPILE_OPTIONS),
        )
    except Exception as exc:  # any compiler failure is a result to report
        return CompileResult(
            variant.kernel,
            variant.label,
            cc,
            ok=False,
            error=f"{type(exc).__name__}: {exc}",
            seconds=time.perf_counter() - start,
        )
    seconds = time.perf_counter() - start
    if cubin_path is not None:
        with open(cubin_path, "wb") as f:
            f.write(kernel.asm["cubin"])
    n_regs, spill = _regs(kernel.asm["cubin"])
    return CompileResult(variant.kernel, variant.label, cc, True, None, n_regs, spill, seconds)


def compile_all(
    ccs: Iterable[int] = (80, 90),
    items: Sequence[Variant] | None = None,
    workers: int | None = None,
    cubin_dir: str | None = None,
) -> list[CompileResult]:
    """Compile `items` (default: every variant) for each compute capability in `ccs`.

    Runs `workers` compiler processes (default: one per CPU). Compiled kernels land in
    triton's cache, so a repeated build with unchanged kernels is quick. With `cubin_dir`
    each cubin is also written there (`cubin_name`).
    """
    ccs = tuple(ccs)
    items = variants() if items is None else list(items)
    if interpreting():
        return _compile_in_child(ccs, items, cubin_dir)
    index = {v: i for i, v in enumerate(variants())}
    jobs = [
        (v, cc, None if cubin_dir is None else os.path.join(cubin_dir, cubin_name(index[v], cc)))
        for cc in ccs
        for v in items
    ]
    workers = workers or os.cpu_count() or 1
    if workers == 1 or len(jobs) == 1:
        return [_compile(job) for job in jobs]
    # Fresh interpreters, not forks of a process that may hold torch threads.
    import multiprocessing

    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(_compile, jobs))


def cubin_name(index: int, cc: int) -> str:
    """File name of variant `variants()[index]` compiled for sm_`cc` in a cubin directory."""
    return f"{index}_sm{cc}.cubin"


def _compile_in_child(
    ccs: tuple[int, ...], items: list[Variant], cubin_dir: str | None
) -> list[CompileResult]:
    index = {v: i for i, v in enumerate(variants())}
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", __name__, "--json", "--cc", *map(str, ccs)]
    if cubin_dir is not None:
        cmd += ["--cubin-dir", cubin_dir]
    cmd += ["--only", *(str(index[v]) for v in items)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    try:
        results = json.loads(done.stdout)
    except json.JSONDecodeError:
        raise RuntimeError(f"ahead-of-time build failed to run:\n{done.stderr[-4000:]}") from None
    return [CompileResult(**r) for r in results]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cc", type=int, nargs="+", default=[80, 90])
    parser.add_argument("--covering", action="store_true", help="only a pairwise cover")
    parser.add_argument("--only", type=int, nargs="*", help=argparse.SUPPRESS)
    parser.add_argument("--json", action="store_true", help="print results as JSON")
    parser.add_argument("--cubin-dir", help="also write the cubins into this directory")
    args = parser.parse_args(argv)
    items = variants()
    if args.only is not None:
        items = [items[i] for i in args.only]
    elif args.covering:
        items = covering(items)
    start = time.perf_counter()
    results = compile_all(args.cc, items, cubin_dir=args.cubin_dir)
    if args.json:
        print(json.dumps([dataclasses.asdict(r) for r in results]))
    else:
        for r in results:
            status = f"ok  regs={r.n_regs} spill={r.spill_bytes}B" if r.ok else "FAIL"
            print(f"sm_{r.cc} {status:<24} {r.seconds:5.2f}s {r.label}")
            if r.error:
                print("    " + r.error.replace("\n", "\n    "))
        failed = sum(not r.ok for r in results)
        print(
            f"{len(results) - failed}/{len(results)} compiled in {time.perf_counter() - start:.1f}s"
        )
    return int(any(not r.ok for r in results))


if __name__ == "__main__":
    # Through the package module, so the worker processes unpickle the same classes.
    from dept_kernels.triton.precompile import main as _main

    sys.exit(_main())
