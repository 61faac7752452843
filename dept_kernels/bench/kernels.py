"""Kernel table: the fused DePT embedding on every backend here against the official formula.

    python -m dept_kernels.bench.kernels [--shape t5-base] [--dtype float32] [--no-compile]

For each backend the op's output and gradients are checked against the formula, then
forward and forward+backward are timed against the official DePT formula (eager and
`torch.compile`) and against copying an output-sized buffer (the memory-bandwidth floor).
All times are medians from one run, printed as ratios.
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
from ._timing import interleaved_medians
from .shapes import SHAPES, Shape
from .suite import with_backend


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
    names = [b for b in backends.available_backends() if b != "cuda" or device == "cuda"]
    names = [b for b in names if device == "cuda" or b != "triton"]
    for name in names:
        with backends.use_backend(name):
            errors[name] = max_error(kw, grad_out)
        impls[f"dept_kernels[{name}]"] = with_backend(dept_embedding, name)

    def no_grad(fn: Callable) -> Callable[[], object]:
        def call():
            with torch.no_grad():
                return fn(**kw)

        return call

    forward = {label: no_grad(fn) for label, fn in impls.items()}
    forward["copy"] = lambda: torch.empty_like(out).copy_(out)
    fwd = interleaved_medians(forward, repeats, device)
    both = interleaved_medians(
        {label: forward_backward(fn, kw, grad_out) for label, fn in impls.items()}, repeats, device
    )
    times = {label: {"forward": fwd[label], "forward+backward": both[label]} for label in impls}
    return {"shape": asdict(shape), "copy_floor": fwd["copy"], "times": times, "errors": errors}


def report(result: dict) -> str:
    times = result["times"]
    base = times["official (eager)"]
    compiled = times.get("official (torch.compile)")
    lines = [
        f"{'implementation':28} {'fwd ms':>8} {'fwd+bwd ms':>11} {'vs eager':>14} "
        f"{'vs compile':>14} {'fwd/copy':>9}"
    ]

    def ratio(baseline: dict[str, float], t: dict[str, float]) -> str:
        fwd, both = "forward", "forward+backward"
        return f"{baseline[fwd] / t[fwd]:.1f}x/{baseline[both] / t[both]:.1f}x"

    for label, t in times.items():
        vs_eager = ratio(base, t)
        vs_comp = ratio(compiled, t) if compiled else "-"
        lines.append(
            f"{label:28} {t['forward'] * 1e3:8.2f} {t['forward+backward'] * 1e3:11.2f} "
            f"{vs_eager:>14} {vs_comp:>14} {t['forward'] / result['copy_floor']:8.2f}x"
        )
    lines.append(
        f"copy of an output-sized buffer (bandwidth floor): {result['copy_floor'] * 1e3:.2f} ms"
    )
    lines.append("speed-ups are forward/forward+backward; fwd/copy is time over the floor")
    for name, (out_err, grad_err) in result["errors"].items():
        lines.append(
            f"agreement with the formula [{name}]: max |out diff| {out_err:.2e}, "
            f"max |grad diff| {grad_err:.2e}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="t5-base", choices=sorted(SHAPES))
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile baseline")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    shape = SHAPES[args.shape]
    dtype = getattr(torch, args.dtype)
    print(
        f"dept_kernels: DePT input embedding at {shape.name} dims "
        f"(B={shape.batch}, s=L={shape.seq}, d={shape.d}, V={shape.vocab}, m={shape.m}, "
        f"r={shape.r}), {args.dtype}, {args.device}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads on {platform.processor() or platform.machine()}"
    )
    result = run(shape, dtype, args.device, args.repeats, not args.no_compile)
    print(report(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
