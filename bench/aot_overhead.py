"""AoT P-tuning's fused inference against the unpatched model (issue 17, part 6).

    python bench/aot_overhead.py [--models t5-base,bert-base,gpt2] [--batch 8] [--seq 128]
                                 [--rounds 21] [--threads 1] [--device cpu]

For each model (random weights at the named dimensions), under `torch.no_grad()` and in
eval mode, as inference runs: the unpatched forward and the fused-AoT forward (FC
reparameterisation merged into one (V, d) table per layer, added in place before each layer)
on the same batch, alternated round by round, the first round untimed. It prints

- the paired ratio fused/unpatched: the median of the per-round ratios and their spread
  (IQR over median); a ratio is stated as a finding only when that spread is within
  `verdict.NOISE_LIMIT`, else the run says it is inconclusive;
- where the fused forward's time goes, from one profiled forward of each: the library's
  gather-add ops' CPU time as a share of the forward's, and the op calls the fused forward
  adds. Neither depends on the machine's load the way a ratio of wall times does.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from torch.profiler import ProfilerActivity, profile

import dept_kernels as dk
from dept_kernels.bench import verdict
from dept_kernels.bench._timing import kept_freed_memory, median_iqr, rotation, sync
from dept_kernels.bench.end_to_end import t5_random
from dept_kernels.ops import _eager

LIBRARY_PREFIX = "dept_kernels::"


def bert_base(vocab: int = 30522) -> torch.nn.Module:
    from transformers import BertConfig, BertModel

    return BertModel(BertConfig(vocab_size=vocab, hidden_dropout_prob=0.0))


def gpt2(vocab: int = 50257) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, resid_pdrop=0.0, embd_pdrop=0.0))


# name: (the model, its vocabulary, whether it takes decoder inputs)
MODELS = {
    "t5-base": (lambda: t5_random("t5-base"), 32128, True),
    "bert-base": (bert_base, 30522, False),
    "gpt2": (gpt2, 50257, False),
}


def fused(base: torch.nn.Module) -> torch.nn.Module:
    model = dk.patch(copy.deepcopy(base), dk.AoTConfig(reparam="fc", r=64))
    with torch.no_grad():
        for layer in model.dept_adapter.layers:
            # W_2 starts at zero: non-zero tables, so the gather-add does real work.
            layer.w2.normal_(0.0, 0.02, generator=torch.Generator().manual_seed(0))
    return dk.merge(model).eval()


def inputs(vocab: int, batch: int, seq: int, decoder: bool, device: str = "cpu") -> dict:
    # Drawn on the CPU, then moved: the same ids whatever the device.
    gen = torch.Generator().manual_seed(0)
    kw = {
        "input_ids": torch.randint(0, vocab, (batch, seq), generator=gen),
        "attention_mask": torch.ones(batch, seq, dtype=torch.long),
    }
    if decoder:
        kw["decoder_input_ids"] = torch.randint(0, vocab, (batch, 8), generator=gen)
    return {k: v.to(device) for k, v in kw.items()}


def paired_ratios(plain, aot, kw: dict, rounds: int, device: str = "cpu") -> list[float]:
    """fused / unpatched time per round, the order alternating, the first round untimed;
    on a GPU each forward is timed to the end of its queued work."""
    ratios = []
    models = [("aot", aot), ("plain", plain)]
    for i in range(rounds + 1):
        seconds = {}
        for name, model in rotation(models, i):
            sync(device)
            start = time.perf_counter()
            model(**kw)
            sync(device)
            seconds[name] = time.perf_counter() - start
        if i:
            ratios.append(seconds["aot"] / seconds["plain"])
    return ratios


def op_profile(model, kw: dict) -> tuple[dict[str, float], dict[str, int]]:
    """(self CPU microseconds, calls) per op name over one profiled forward. The library's
    ops go through their custom ops here (its eager path calls the kernels directly, where
    the profiler does not see them), so their share is an upper bound: dispatch included."""
    with _eager.custom_ops_only(), profile(activities=[ProfilerActivity.CPU]) as prof:
        model(**kw)
    events = prof.key_averages()
    return {e.key: e.self_cpu_time_total for e in events}, {e.key: e.count for e in events}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    with kept_freed_memory() as memory:
        measure(args, memory)


def measure(args: argparse.Namespace, memory: str) -> None:
    """Prints each model's paired ratio, its profile and its per-round ratios."""
    print(
        f"AoT fused inference overhead: torch {torch.__version__}, {args.threads} thread(s), "
        f"B={args.batch} s={args.seq}, {args.rounds} paired rounds, no_grad, eval, "
        f"{args.device}; {memory}"
    )
    for name in args.models.split(","):
        make, vocab, decoder = MODELS[name]
        base = make().eval()
        # Fused on the CPU (its tables drawn from a CPU generator), then both moved.
        aot = fused(base).to(args.device)
        plain = base.to(args.device)
        kw = inputs(vocab, args.batch, args.seq, decoder, args.device)
        with torch.no_grad():
            ratios = paired_ratios(plain, aot, kw, args.rounds, args.device)
            (a, a_calls), (_, p_calls) = op_profile(aot, kw), op_profile(plain, kw)
        median, iqr = median_iqr(ratios)
        spread = iqr / median
        library = sum(t for k, t in a.items() if k.startswith(LIBRARY_PREFIX))
        share = library / sum(a.values())
        # Call counts do not depend on the load: they say what work the fused forward adds.
        extra = {k: a_calls.get(k, 0) - p_calls.get(k, 0) for k in set(a_calls) | set(p_calls)}
        top = ", ".join(f"{k} {n:+d}" for k, n in sorted(extra.items()) if n) or "none"
        if spread <= verdict.NOISE_LIMIT:
            claim = f"fused/unpatched {median:.3f} (overhead {median - 1:+.1%}, IQR {spread:.1%})"
        else:
            claim = f"inconclusive: paired ratios' IQR is {spread:.1%} of their median {median:.3f}"
        print(f"{name}: {claim}")
        print(
            f"  profiled: the library's ops take {library / 1e3:.2f} ms, "
            f"{share:.2%} of the fused forward's CPU time ({sum(a.values()) / 1e3:.0f} ms); "
            f"op calls it adds to the unpatched forward: {top}"
        )
        print(f"  per-round ratios: {', '.join(f'{r:.3f}' for r in ratios)}")
        del plain, aot, base


if __name__ == "__main__":
    main()
