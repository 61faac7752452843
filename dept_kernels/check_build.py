"""Compile every GPU kernel of the library for sm_80 and sm_90, without a GPU.

    python -m dept_kernels.check_build [--cc 80 90] [--covering] [--skip-missing]

1. Triton: every kernel variant the launchers can pick, through
   `dept_kernels.triton.precompile.compile_all` (`--covering`: a pairwise cover of the variants).
2. CUDA: every `csrc/cuda/*.cu` with `nvcc -c` and the flags of the JIT build, one
   `-gencode` per target, parsing `-Xptxas -v` for registers and spills per kernel.
3. `csrc/cuda/bindings.cpp`, the one torch-aware file, is syntax-checked with the host
   compiler against torch's headers: the CPU wheel lacks only CUDA torch's generated
   `c10/cuda/impl/cuda_cmake_macros.h`, which an empty stand-in replaces for the check
   (it only sets build macros). Linking it needs CUDA torch and happens in `backends._cuda` on GPUs.

Prints one line per kernel and target (name, target, registers, spill bytes, ok/FAILED) and
a summary; exits non-zero on any failure, or when nvcc or triton is missing unless
`--skip-missing` is given.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from . import _build

__all__ = [
    "KernelResult",
    "compile_cuda",
    "compile_triton",
    "cuda_sources",
    "demangle",
    "main",
    "nvcc_command",
]


_ENTRY = re.compile(r"Compiling entry function '(\S+)' for 'sm_(\d+)'")
_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")


@dataclasses.dataclass
class KernelResult:
    """One kernel (or Triton variant) compiled for one target."""

    source: str  # "triton" or the .cu file name
    name: str
    cc: int
    ok: bool
    registers: int | None = None
    spill_stores: int | None = None  # bytes; Triton reports its local memory here
    spill_loads: int | None = None
    error: str | None = None

    def line(self) -> str:
        regs = "-" if self.registers is None else str(self.registers)
        if self.spill_stores is None:
            spills = "-"
        elif self.spill_loads is None:
            spills = f"{self.spill_stores}B"
        else:
            spills = f"{self.spill_stores}B/{self.spill_loads}B"
        status = "ok" if self.ok else "FAILED"
        target = f"sm_{self.cc}" if self.cc else "host"
        return f"{self.name:<72} {target:<6} regs={regs:>3} spills={spills:<9} {status}"


def compile_triton(ccs: Sequence[int], covering: bool) -> list[KernelResult]:
    """Every Triton kernel variant (or a pairwise cover of them) for each target."""
    from .triton import precompile

    items = precompile.covering(precompile.variants()) if covering else None
    return [
        KernelResult("triton", r.label, r.cc, r.ok, r.n_regs, r.spill_bytes, None, r.error)
        for r in precompile.compile_all(ccs, items)
    ]


def cuda_sources() -> list[Path]:
    csrc = _build.csrc_dir()
    return [] if csrc is None else sorted((csrc / "cuda").glob("*.cu"))


def demangle(names: list[str]) -> dict[str, str]:
    """Readable kernel names: the kernel struct with its template arguments."""
    cxxfilt = shutil.which("c++filt")
    if cxxfilt is None or not names:
        return {n: n for n in names}
    done = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True)
    out = {}
    for mangled, plain in zip(names, done.stdout.splitlines(), strict=False):
        inner = re.search(r"kernel_entry<(.*)>\(", plain)
        text = inner[1] if inner else plain
        text = text.replace("(anonymous namespace)::", "").replace("dept_kernels::", "")
        out[mangled] = re.sub(r"\s*>$", ">", text.strip())
    return out


def _parse_ptxas(log: str, source: str) -> list[KernelResult]:
    """Per-kernel registers and spills from `-Xptxas -v` output."""
    results: list[KernelResult] = []
    current: KernelResult | None = None
    for line in log.splitlines():
        if entry := _ENTRY.search(line):
            current = KernelResult(source, entry[1], int(entry[2]), True)
            results.append(current)
        elif current is not None and (spills := _SPILLS.search(line)):
            current.spill_stores, current.spill_loads = int(spills[1]), int(spills[2])
        elif current is not None and (regs := _REGS.search(line)):
            current.registers = int(regs[1])
    names = demangle([r.name for r in results])
    for r in results:
        r.name = names[r.name]
    return results


def nvcc_command(nvcc: str, source: Path, cc: int, output: Path, cubin: bool = False) -> list[str]:
    """nvcc compiling `source` for sm_`cc` with the JIT build's flags, reporting registers
    and spills (`-Xptxas -v`); `cubin`: the device code alone, for disassemblers."""
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS

    from .backends._cuda import NVCC_FLAGS

    # The JIT build's flags: torch's (no implicit half / bfloat16 operators) plus ours.
    cmd = [nvcc, "-cubin" if cubin else "-c", *COMMON_NVCC_FLAGS, *NVCC_FLAGS, "-Xptxas", "-v"]
    cmd += ["-gencode", f"arch=compute_{cc},code=sm_{cc}", str(source)]
    return [*cmd, "-o", str(output)]


def _nvcc_one(nvcc: str, source: Path, cc: int, workdir: Path) -> list[KernelResult]:
    cmd = nvcc_command(nvcc, source, cc, workdir / f"{source.stem}_sm{cc}.o")
    done = subprocess.run(cmd, capture_output=True, text=True)
    results = _parse_ptxas(done.stderr, source.name)
    if done.returncode != 0:
        tail = "\n".join((done.stderr + done.stdout).strip().splitlines()[-30:])
        return [*results, KernelResult(source.name, f"{source.name} (nvcc)", cc, False, error=tail)]
    if not results:
        return [KernelResult(source.name, source.name, cc, False, error="no kernel compiled")]
    return results


def compile_cuda(nvcc: str, ccs: Sequence[int]) -> list[KernelResult]:
    """Every kernel of every `csrc/cuda/*.cu` for each target, nvcc jobs run in parallel."""
    jobs = [(source, cc) for source in cuda_sources() for cc in ccs]
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        batches = pool.map(lambda job: _nvcc_one(nvcc, job[0], job[1], Path(tmp)), jobs)
        return [r for batch in batches for r in batch]


def check_bindings(nvcc: str) -> KernelResult:
    """`g++ -fsyntax-only` of csrc/cuda/bindings.cpp against torch's and CUDA's headers."""
    import sysconfig

    from torch.utils.cpp_extension import include_paths

    source = _build.csrc_dir() / "cuda" / "bindings.cpp"
    cuda_include = Path(nvcc).resolve().parent.parent / "include"
    if not (cuda_include / "cuda_runtime.h").is_file():
        # /usr/local/bin/nvcc may be a wrapper script: ask nvcc where the toolkit is.
        done = subprocess.run([nvcc, "--dryrun", "-c", "x.cu"], capture_output=True, text=True)
        match = re.search(r"INCLUDES=\"-I(\S+?)\"", done.stderr)
        cuda_include = Path(match[1]) if match else cuda_include
    with tempfile.TemporaryDirectory() as tmp:
        stub = Path(tmp) / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
        stub.parent.mkdir(parents=True)
        stub.write_text("#pragma once\n")
        cmd = [os.environ.get("CXX", "c++"), "-std=c++20", "-fsyntax-only", f"-I{tmp}"]
        cmd += [f"-I{path}" for path in include_paths()]
        cmd += [f"-I{cuda_include}", f"-I{sysconfig.get_paths()['include']}"]
        cmd += ["-DTORCH_EXTENSION_NAME=dept_kernels_cuda", str(source)]
        done = subprocess.run(cmd, capture_output=True, text=True)
    error = None if done.returncode == 0 else "\n".join(done.stderr.splitlines()[-30:])
    # cc 0: a host-compiler check, not a GPU target.
    return KernelResult("bindings.cpp", "syntax check", 0, done.returncode == 0, error=error)


def main(argv: Sequence[str] | None = None) -> int:
    # Triton kernels defined under its interpreter cannot be compiled, so the interpreter is
    # switched off before they are imported (if they already were, compile_all builds them in
    # a child process without it). The caller's setting comes back on return.
    interpret = os.environ.get("TRITON_INTERPRET")
    if "dept_kernels.triton.dept_embedding" not in sys.modules:
        os.environ.pop("TRITON_INTERPRET", None)
    try:
        return _run(argv)
    finally:
        if interpret is not None:
            os.environ["TRITON_INTERPRET"] = interpret


def _run(argv: Sequence[str] | None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cc", type=int, nargs="+", default=[80, 90], help="targets")
    parser.add_argument(
        "--covering", action="store_true", help="Triton: a pairwise cover of the variants only"
    )
    parser.add_argument(
        "--skip-missing", action="store_true", help="skip, not fail, when nvcc or triton is absent"
    )
    args = parser.parse_args(argv)
    start = time.perf_counter()
    failed = False
    results: list[KernelResult] = []

    try:
        import triton  # noqa: F401
    except ImportError:
        print("triton is not installed: Triton kernels not compiled")
        failed |= not args.skip_missing
    else:
        results += compile_triton(args.cc, args.covering)

    nvcc = shutil.which("nvcc")
    if nvcc is None:
        print("nvcc not found: CUDA kernels (csrc/cuda/*.cu) not compiled")
        failed |= not args.skip_missing
    elif not cuda_sources():
        print("no CUDA sources (csrc/cuda/*.cu) found")
        failed = True
    else:
        results += compile_cuda(nvcc, args.cc)
    if nvcc is not None and cuda_sources():
        results.append(check_bindings(nvcc))

    for r in results:
        print(f"{r.source:<18} {r.line()}")
        if r.error:
            print("    " + r.error.replace("\n", "\n    "))
    bad = [r for r in results if not r.ok]
    spilling = [r for r in results if r.spill_stores]
    failed |= bool(bad)
    print(
        f"check_build: {len(results) - len(bad)}/{len(results)} kernel builds ok "
        f"({sum(r.source == 'triton' for r in results)} triton, "
        f"{sum(r.source != 'triton' for r in results)} cuda), {len(spilling)} spilling, "
        f"{'FAILED' if failed else 'ok'} in {time.perf_counter() - start:.1f}s"
    )
    return int(failed)


if __name__ == "__main__":
    sys.exit(main())
