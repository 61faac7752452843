"""Main job: patch a T5, train prompt methods through the fused kernels, show what it gains.

    python -m dept_kernels.bench [--steps 4] [--batch 8] [--model DIR] [--device cuda]
                                 [--out bench/out] [--full] [--dims t5-base]
                                 [--no-inference] [--no-serving]

1. End to end (`end_to_end`): training steps of PT (l=100), DePT at the equal budget through
   the library, DePT as the official code runs it (inputs padded to max_length), and that
   same official model after one `dept_kernels.patch(model)` call, still fed inputs padded
   to max_length, on a T5 with t5-small dimensions (t5-base with `--full` or
   `--dims t5-base`); then AoT P-tuning inference (fused tables) against the unpatched model.
2. Inference (`inference`, skip with `--no-inference`): samples per second of DePT against
   PT (l=100) at the equal budget through the Hugging Face `Trainer`'s prediction loop, on
   the same T5 (at T5-base and T5-large dims with `--full`), beside the paper's Figure 4.
3. Multi-task serving (`serving`, skip with `--no-serving`): one mixed batch over T tasks
   against T per-task batches, DePT and AoT, T in {2, 8}, forward and `generate`, on a T5
   of `serving.DIMS` dims and a vocabulary of `serving.VOCAB`.
4. Kernels (`kernels`): the fused DePT embedding on every backend against the official
   formula in eager PyTorch and under torch.compile, at T5-base dimensions.

Every part times its candidates round-robin and reports medians with their interquartile
range; it states its ratios as sentences (a gain when a gain, a loss when a loss) only when
the spread is within `verdict.NOISE_LIMIT` and the invariants hold, else it prints a warning
naming the spread and calls the comparison inconclusive. Also prints the training losses and
a legend of the columns; writes `results.json` and `results.png` under `--out`.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

from . import end_to_end, inference, kernels, serving
from ._timing import at_least, kept_freed_memory
from .tables import aot_lines, end_to_end_report

# The models of the paper's inference figure, timed with --full.
PAPER_DIMS = ("t5-base", "t5-large")


def plot(rows: list[dict], kernel: dict, model: str, path: Path) -> bool:
    """Draw the two tables into `path`; False (nothing drawn) without matplotlib, which only
    the `bench` extra installs: the tables and results.json do not need it."""
    try:
        import matplotlib
    except ImportError:
        return False

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    names = [r["setup"] for r in rows]
    left.barh(names, [r["seconds_per_step"] for r in rows], color="tab:blue")
    left.set_xlabel("seconds per training step (lower is better)")
    left.set_title(f"T5 ({model}): one training step")
    left.invert_yaxis()
    labels = list(kernel["times"])
    fwd = [kernel["times"][k]["forward"] * 1e3 for k in labels]
    both = [kernel["times"][k]["forward+backward"] * 1e3 for k in labels]
    y = range(len(labels))
    right.barh([i - 0.2 for i in y], fwd, height=0.4, label="forward")
    right.barh([i + 0.2 for i in y], both, height=0.4, label="forward+backward")
    right.axvline(kernel["copy_floor"] * 1e3, color="gray", linestyle="--", label="copy floor")
    right.set_yticks(list(y), labels)
    right.invert_yaxis()
    right.set_xlabel("milliseconds (lower is better)")
    right.set_title(f"DePT embedding kernel, {kernel['shape']['name']} dims")
    right.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--steps", type=at_least(1), default=4, help="timed training steps per setup"
    )
    parser.add_argument("--warmup", type=at_least(0), default=1)
    parser.add_argument("--batch", type=at_least(1), default=8)
    parser.add_argument("--model", help="a local T5 checkpoint directory (default: random)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="bench/out")
    parser.add_argument(
        "--full",
        action="store_true",
        help="train at t5-base dims (the paper's DePT vs PT claim) and time the kernels at "
        "every model shape",
    )
    parser.add_argument(
        "--dims",
        choices=sorted(end_to_end.T5_DIMS),
        help="random-weight T5 dimensions (default t5-small; t5-base with --full)",
    )
    parser.add_argument("--repeats", type=at_least(1), default=20, help="kernel timing rounds")
    # The first AoT round warms up; the others are timed.
    parser.add_argument("--aot-rounds", type=at_least(2), default=6, help="AoT inference rounds")
    parser.add_argument("--no-inference", action="store_true", help="skip the inference part")
    parser.add_argument(
        "--inference-rounds", type=at_least(3), default=5, help="Trainer.predict rounds"
    )
    parser.add_argument(
        "--inference-samples", type=at_least(1), default=16, help="samples per predict pass"
    )
    parser.add_argument("--no-serving", action="store_true", help="skip multi-task serving")
    parser.add_argument(
        "--serving-rounds", type=at_least(3), default=5, help="serving timing rounds"
    )
    parser.add_argument(
        # One request per task by default: the part's cost grows with T * b, and the main
        # job must stay a few minutes on a small CPU (`python -m dept_kernels.bench.serving`
        # takes more).
        "--serving-per-task",
        type=at_least(1),
        default=1,
        help="serving samples per task",
    )
    args = parser.parse_args(argv)
    with kept_freed_memory() as memory:
        run_job(args, memory)


def run_job(args: argparse.Namespace, memory: str) -> None:
    """The main job's parts in order, printing each report; `memory` says how host memory
    was managed while timing (`_timing.kept_freed_memory`)."""
    from tqdm import tqdm

    torch.manual_seed(0)
    dims = args.dims or ("t5-base" if args.full else "t5-small")
    if args.model:
        from transformers import T5ForConditionalGeneration

        base = T5ForConditionalGeneration.from_pretrained(args.model)
        model_name = Path(args.model).name
    else:
        base = end_to_end.t5_random(dims)
        model_name = f"{dims} dims, random weights"
    base = base.to(args.device).train()
    vocab = base.config.vocab_size
    print(
        f"dept_kernels main job: {args.device}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {platform.machine()}; "
        f"T5 d={base.config.d_model}, {base.config.num_layers} layers, V={vocab} "
        f"({'checkpoint ' + args.model if args.model else 'random weights'}); {memory}"
    )
    batches = end_to_end.make_batches(args.steps + args.warmup, args.batch, vocab, args.device)
    total = 4 * len(batches)
    with tqdm(total=total, desc="training steps", unit="step") as progress:
        rows = end_to_end.run(base, batches, args.warmup, progress)
    print(end_to_end_report(rows, end_to_end.MAX_LENGTH))
    with tqdm(total=args.aot_rounds, desc="AoT inference rounds", unit="round") as progress:
        aot = end_to_end.aot_inference(base, batches, args.aot_rounds, progress)
    print("\n".join(aot_lines(aot)))

    inference_results = []
    skip = inference.unavailable()
    if skip and not args.no_inference:
        print(f"\nInference part skipped: {skip}.")
    if not args.no_inference and not skip:
        if args.full and not args.model:
            # The paper's two models; each built, timed and dropped in turn.
            models = ((d, lambda d=d: end_to_end.t5_random(d).to(args.device)) for d in PAPER_DIMS)
        else:
            label = Path(args.model).name if args.model else dims
            models = iter([(label, lambda: base)])
        for dims, build in models:
            result = inference.run(
                build(),
                dims,
                args.inference_samples,
                args.batch,
                args.inference_rounds,
                args.device,
            )
            inference_results.append(result)
            print()
            print(inference.report(result))
    serving_result = None
    if not args.no_serving:
        served = end_to_end.t5_random(serving.DIMS, serving.VOCAB).to(args.device)
        serving_result = serving.run(
            served, args.serving_per_task, args.serving_rounds, 4, args.device
        )
        print()
        print(serving.report(serving_result))

    shapes = sorted(kernels.SHAPES) if args.full else ["t5-base"]
    kernel_results = []
    for name in shapes:
        result = kernels.run(kernels.SHAPES[name], torch.float32, args.device, args.repeats, True)
        kernel_results.append(result)
        print(f"\nDePT embedding kernel at {name} dims (fp32):")
        print(kernels.report(result))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results.json", "w") as f:
        json.dump(
            {
                "model": model_name,
                "end_to_end": rows,
                "aot_inference": aot,
                "inference": inference_results,
                "serving": serving_result,
                "kernels": kernel_results,
            },
            f,
            indent=2,
        )
    shown = next((k for k in kernel_results if k["shape"]["name"] == "t5-base"), kernel_results[0])
    if plot(rows, shown, model_name, out / "results.png"):
        print(f"\nwrote {out / 'results.json'} and {out / 'results.png'}")
    else:
        print(
            f"\nwrote {out / 'results.json'}; no results.png: matplotlib is not installed "
            "(pip install 'dept-kernels[bench]')"
        )


if __name__ == "__main__":
    main()
