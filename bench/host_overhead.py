"""The ops' host time per call: the eager path against the custom ops (on the CPU).

    python bench/host_overhead.py [--rounds 25] [--calls 50] [--forwards 20]

At a size where the kernels take a few microseconds (B=2, s=5, d=8), a call's time is the
host's work: argument checks, dispatch, autograd. On a GPU that work, not the kernel, is
what a model pays per call (`bench/results/README.md`, the H200 run). Each op is timed both
ways in one process, round-robin: the eager path (`dept_kernels/ops/_eager.py`: the custom
op's body called directly on plain tensors) and every call through the custom ops (the
eager path switched off). Median and IQR of the per-call time over the rounds; a ratio is
stated only when both rows' spread is within `verdict.NOISE_LIMIT`.

Then the fused AoT inference forward of a tiny T5 (12 encoder layers, d=16, B=2, s=8), where
the model's own ops take microseconds too: the unpatched model, the fused model with its
per-forward plan (`dept_kernels.ops.aot.FusedAdds`), and the same model with each layer's own
`aot_bias_add` call (the plan switched off), round-robin. The library's host time per
forward is the fused model's time less the unpatched one's.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import platform
import time
from collections.abc import Callable

import torch

import dept_kernels as dk
from dept_kernels.bench import verdict
from dept_kernels.bench._timing import median_iqr, rotation
from dept_kernels.models import _aot as aot_hooks
from dept_kernels.ops import _eager, aot_bias_add, dept_embedding


def problems() -> dict[str, Callable[[], object]]:
    gen = torch.Generator().manual_seed(0)
    v, d, m, r, length, b, s = 50, 8, 3, 2, 5, 2, 5
    kw = {
        "input_ids": torch.randint(0, v, (b, s), generator=gen),
        "weight": torch.randn(v, d, generator=gen),
        "prompt": torch.randn(m, d, generator=gen).requires_grad_(),
        "lora_a": torch.randn(length, r, generator=gen).requires_grad_(),
        "lora_b": torch.randn(r, d, generator=gen).requires_grad_(),
        "scaling": 0.5,
    }
    params = [kw["prompt"], kw["lora_a"], kw["lora_b"]]
    grad = torch.randn(b, m + s, d, generator=gen)
    hidden = torch.randn(b, s, d, generator=gen).requires_grad_()
    table = torch.randn(v, d, generator=gen).requires_grad_()

    def dept_forward():
        with torch.no_grad():
            return dept_embedding(**kw)

    def dept_step():
        return torch.autograd.grad(dept_embedding(**kw), params, grad)

    def aot_forward():
        with torch.no_grad():
            return aot_bias_add(hidden, kw["input_ids"], table)

    def aot_step():
        out = aot_bias_add(hidden, kw["input_ids"], table)
        return torch.autograd.grad(out, (hidden, table), torch.ones_like(out))

    return {
        "dept_embedding forward": dept_forward,
        "dept_embedding forward+backward": dept_step,
        "aot_bias_add forward": aot_forward,
        "aot_bias_add forward+backward": aot_step,
    }


def fused_forwards() -> dict[str, Callable[[], object]]:
    """No-grad forwards of a tiny T5: unpatched, and fused AoT with and without the plan."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    config = T5Config(
        vocab_size=128, d_model=16, d_kv=4, d_ff=32, num_layers=12, num_decoder_layers=1,
        num_heads=4, dropout_rate=0.0,
    )  # fmt: skip
    base = T5ForConditionalGeneration(config).eval()
    fused = dk.patch(copy.deepcopy(base), dk.AoTConfig(reparam="fc", r=4))
    with torch.no_grad():
        for layer in fused.dept_adapter.layers:
            layer.w2.normal_(0.0, 0.02)  # W_2 starts at zero: non-zero tables
    fused = dk.merge(fused).eval()
    kw = {
        "input_ids": torch.randint(0, 128, (2, 8)),
        "decoder_input_ids": torch.zeros(2, 1, dtype=torch.long),
    }

    def forward(model, plan=aot_hooks.fused_adds):
        def call():
            planned, aot_hooks.fused_adds = aot_hooks.fused_adds, plan
            try:
                with torch.no_grad():
                    return model(**kw)
            finally:
                aot_hooks.fused_adds = planned

        return call

    return {
        "unpatched": forward(base),
        "fused, plan": forward(fused),
        "fused, each layer's own call": forward(fused, lambda *args: None),
    }


def report_fused(rounds: int, calls: int) -> None:
    fns = fused_forwards()
    times: dict[str, list[float]] = {}
    for i in range(rounds + 1):
        for name in rotation(list(fns), i):
            fns[name]()
            start = time.perf_counter()
            for _ in range(calls):
                fns[name]()
            if i:
                times.setdefault(name, []).append((time.perf_counter() - start) / calls)
    stats = {name: median_iqr(t) for name, t in times.items()}
    print(f"fused AoT forward of a tiny T5 (12 layers), {rounds} rounds of {calls} forwards:")
    for name in fns:
        med, iqr = stats[name]
        print(f"  {name}: {med * 1e6:.0f} µs per forward (IQR {iqr * 1e6:.0f})")
    spreads = {name: verdict.relative_spread(t) for name, t in times.items()}
    plain = stats["unpatched"][0]
    plan, own = stats["fused, plan"][0] - plain, stats["fused, each layer's own call"][0] - plain
    if verdict.noisy_rows(spreads):
        print(f"  inconclusive (spread {max(spreads.values()):.0%})")
    else:
        print(
            f"  the library's host time per forward: {plan * 1e6:.0f} µs with the plan, "
            f"{own * 1e6:.0f} µs with each layer's own call ({plan / own:.2f}x)"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--forwards", type=int, default=20, help="forwards per fused round")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    modes = {"eager path": contextlib.nullcontext, "custom ops": _eager.custom_ops_only}
    fns = problems()
    times: dict[tuple[str, str], list[float]] = {}
    for i in range(args.rounds + 1):
        for mode in rotation(list(modes), i):
            with modes[mode]():
                for name, fn in fns.items():
                    fn()
                    start = time.perf_counter()
                    for _ in range(args.calls):
                        fn()
                    if i:  # the first round warms up
                        per_call = (time.perf_counter() - start) / args.calls
                        times.setdefault((name, mode), []).append(per_call)
    print(
        f"host time per call, {platform.processor() or platform.machine()}, torch "
        f"{torch.__version__}, 1 thread, {args.rounds} rounds of {args.calls} calls"
    )
    for name in fns:
        rows = {mode: times[(name, mode)] for mode in modes}
        stats = {mode: median_iqr(t) for mode, t in rows.items()}
        cells = [
            f"{mode} {med * 1e6:.1f} µs (IQR {iqr * 1e6:.1f})" for mode, (med, iqr) in stats.items()
        ]
        spreads = {mode: verdict.relative_spread(t) for mode, t in rows.items()}
        noisy = verdict.noisy_rows(spreads)
        fast, slow = stats["eager path"][0], stats["custom ops"][0]
        claim = (
            f"inconclusive (spread {max(spreads.values()):.0%})"
            if noisy
            else f"the eager path takes {fast / slow:.2f}x the custom ops' time"
        )
        print(f"{name}: {'; '.join(cells)}: {claim}")
    report_fused(args.rounds, args.forwards)


if __name__ == "__main__":
    main()
