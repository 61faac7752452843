"""Kernel table: the fused DePT embedding on every backend here against the official formula.

    python -m dept_kernels.bench.kernels [--shape t5-base] [--dtype float32] [--no-compile]

For each backend the op's output and gradients are checked against the formula, then
forward and forward+backward are timed against the official DePT formula (eager and
`torch.compile`) and against copying an output-sized buffer (the memory-bandwidth floor),
all in one round-robin (every candidate and pass once per round, in a rotated order). Each
row has its median and interquartile range; the ratios are stated as sentences only when
every row's spread is within `verdict.NOISE_LIMIT` and the invariants hold
(`verdict.kernel_violations`), else the table ends with a warning naming the spread.
"""

from __future__ import annotations

import argparse
import json
import platform
from collections.abc import Callable
from dataclasses import asdict

import torch

from .. import backends
from ..ops import dept_embedding
from ..testing import official_dept_embedding, reference_dept_embedding
from ._timing import at_least, interleaved_times, kept_freed_memory, median_iqr
from .shapes import SHAPES, Shape
from .suite import library_backends, with_backend
from .verdict import (
    BOTH,
    FWD,
    findings,
    kernel_violations,
    noisy_rows,
    relative_spread,
    speed_phrase,
)

COPY = "copy"


def make_problem(shape: Shape, dtype: torch.dtype, device: str, seed: int = 0) -> dict:
    """Inputs at full length (s = L), where the official formula is defined."""
    g = torch.Generator(device=device).manual_seed(seed)
    kw = {
        "input_ids": torch.randint(
            0, shape.vocab, (shape.batch, shape.seq), generator=g, device=device
        ),
        "weight": torch.randn(shape.vocab, shape.d, generator=g, device=device).to(dtype),
        "prompt": torch.randn(shape.m, shape.d, generator=g, device=device),
        "lora_a": torch.randn(shape.max_length, shape.r, generator=g, device=device),
        "lora_b": torch.randn(shape.r, shape.d, generator=g, device=device) * 0.1,
        "scaling": 8 / shape.r**0.5,
    }
    for name in ("prompt", "lora_a", "lora_b"):
        kw[name] = kw[name].to(dtype).requires_grad_()
    return kw


def forward_backward(fn: Callable, kw: dict, grad_out: torch.Tensor) -> Callable[[], object]:
    params = [kw["prompt"], kw["lora_a"], kw["lora_b"]]

    def step():
        return torch.autograd.grad(fn(**kw), params, grad_out)

    return step


def max_error(kw: dict, grad_out: torch.Tensor) -> tuple[float, float]:
    """Largest absolute difference from the reference formula: output, then gradients."""
    params = [kw["prompt"], kw["lora_a"], kw["lora_b"]]
    out = dept_embedding(**kw)
    ref = reference_dept_embedding(**kw)
    grads = torch.autograd.grad(out, params, grad_out)
    ref_grads = torch.autograd.grad(ref, params, grad_out)
    out_err = (out.float() - ref.float()).abs().max().item()
    grad_err = max(
        (g.float() - r.float()).abs().max().item() for g, r in zip(grads, ref_grads, strict=True)
    )
    return out_err, grad_err


def run(shape: Shape, dtype: torch.dtype, device: str, repeats: int, compile_: bool) -> dict:
    kw = make_problem(shape, dtype, device)
    with torch.no_grad():
        out = official_dept_embedding(**kw)
    grad_out = torch.randn_like(out)
    impls: dict[str, Callable] = {"official (eager)": official_dept_embedding}
    if compile_:
        impls["official (torch.compile)"] = torch.compile(official_dept_embedding)
    errors = {}
    for name in library_backends(device):
        with backends.use_backend(name):
            errors[name] = max_error(kw, grad_out)
        impls[f"dept_kernels[{name}]"] = with_backend(dept_embedding, name)

    def no_grad(fn: Callable) -> Callable[[], object]:
        def call():
            with torch.no_grad():
                return fn(**kw)

        return call

    # Every candidate's forward and forward+backward, and the copy, in one round-robin, so
    # that load falls on all of them alike and the invariants compare like with like.
    fns = {(label, FWD): no_grad(fn) for label, fn in impls.items()}
    fns |= {(label, BOTH): forward_backward(fn, kw, grad_out) for label, fn in impls.items()}
    fns[COPY, FWD] = lambda: torch.empty_like(out).copy_(out)
    rounds = interleaved_times(fns, repeats, device)
    stats = {key: median_iqr(t) for key, t in rounds.items()}
    times = {label: {p: stats[label, p][0] for p in (FWD, BOTH)} for label in impls}
    spreads = {label: {p: stats[label, p][1] for p in (FWD, BOTH)} for label in impls}
    return {
        "shape": asdict(shape),
        "copy_floor": stats[COPY, FWD][0],
        "copy_iqr": stats[COPY, FWD][1],
        "times": times,
        "iqr": spreads,
        "relative_spread": {f"{label} {p}": relative_spread(t) for (label, p), t in rounds.items()},
        "rounds": repeats,
        "errors": errors,
    }


def kernel_sentences(result: dict) -> list[str]:
    """One sentence per library backend: its speed against each official baseline."""
    times = result["times"]
    baselines = [
        (label, name)
        for label, name in (
            ("official (torch.compile)", "the official formula under torch.compile"),
            ("official (eager)", "the official formula in eager PyTorch"),
        )
        if label in times
    ]
    out = []
    for label, t in times.items():
        if not label.startswith("dept_kernels"):
            continue
        parts = []
        for p in (FWD, BOTH):
            against = ", ".join(
                f"{speed_phrase(times[b][p], t[p])} than {name}" for b, name in baselines
            )
            parts.append(f"its {p} is {against}")
        floor = t[FWD] / result["copy_floor"]
        out.append(f"{label}: {'; '.join(parts)}; its forward takes {floor:.2f}x the copy floor.")
    return out


def report(result: dict) -> str:
    times, spreads = result["times"], result["iqr"]
    base = times["official (eager)"]
    compiled = times.get("official (torch.compile)")
    lines = [
        f"{'implementation':28} {'fwd ms':>8} {'IQR':>6} {'fwd+bwd ms':>11} {'IQR':>6} "
        f"{'vs eager':>12} {'vs compile':>12} {'fwd/copy':>9}"
    ]

    def ratio(baseline: dict[str, float], t: dict[str, float]) -> str:
        return f"{baseline[FWD] / t[FWD]:.2f}x/{baseline[BOTH] / t[BOTH]:.2f}x"

    for label, t in times.items():
        vs_eager = ratio(base, t)
        vs_comp = ratio(compiled, t) if compiled else "-"
        iqr = spreads[label]
        lines.append(
            f"{label:28} {t[FWD] * 1e3:8.2f} {iqr[FWD] * 1e3:6.2f} {t[BOTH] * 1e3:11.2f} "
            f"{iqr[BOTH] * 1e3:6.2f} {vs_eager:>12} {vs_comp:>12} "
            f"{t[FWD] / result['copy_floor']:8.2f}x"
        )
    lines.append(
        f"{'copy (bandwidth floor)':28} {result['copy_floor'] * 1e3:8.2f} "
        f"{result['copy_iqr'] * 1e3:6.2f}"
    )
    lines.append(
        f"Columns: medians of {result['rounds']} rounds, every row timed in each round in a "
        "rotated order; IQR: interquartile range of the rounds (ms); vs eager / vs compile: "
        "speed-ups over the official formula, forward/forward+backward (its time over this "
        "row's: above 1x faster, below 1x slower); fwd/copy: forward time over copying an "
        "output-sized buffer."
    )
    for name, (out_err, grad_err) in result["errors"].items():
        lines.append(
            f"agreement with the formula [{name}]: max |out diff| {out_err:.2e}, "
            f"max |grad diff| {grad_err:.2e}"
        )
    violations = kernel_violations(times, spreads, result["copy_floor"], result["copy_iqr"])
    lines += findings(kernel_sentences(result), noisy_rows(result["relative_spread"]), violations)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="t5-base", choices=sorted(SHAPES))
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=at_least(1), default=20)
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile baseline")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    with kept_freed_memory() as memory:
        _main(args, memory)


def _main(args: argparse.Namespace, memory: str) -> None:
    shape = SHAPES[args.shape]
    dtype = getattr(torch, args.dtype)
    print(
        f"dept_kernels: DePT input embedding at {shape.name} dims "
        f"(B={shape.batch}, s=L={shape.seq}, d={shape.d}, V={shape.vocab}, m={shape.m}, "
        f"r={shape.r}), {args.dtype}, {args.device}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads on {platform.processor() or platform.machine()}; "
        f"{memory}"
    )
    result = run(shape, dtype, args.device, args.repeats, not args.no_compile)
    print(report(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
