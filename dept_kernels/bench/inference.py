"""Inference speed, the paper's Figure 4: samples per second of DePT against prompt tuning
(l = 100) at the equal trainable budget, evaluated through the Hugging Face `Trainer`'s
prediction loop.

    python -m dept_kernels.bench.inference [--dims t5-base] [--samples 16] [--batch 8]

Both models are copies of one random-weight T5 (no download), patched with
`PromptTuningConfig(100)` and with `DePTConfig(m=40, r)`, r from `equal_budget` at this
width. Each has its own `Trainer` (`report_to=[]`, no progress bar) over the same synthetic
dataset (GLUE-like input lengths, `end_to_end.glue_like_lengths`; 2 target tokens and </s>),
each batch padded to its longest input. A round is one `Trainer.predict` over the whole
dataset per model (loss and logits gathered, as an evaluation does), the two models in a
rotated order (`_timing.interleaved_times`); samples per second is the dataset's size over
the median round. DePT's encoder input is l - m = 60 tokens shorter than PT's, which is
where its gain comes from. The paper's own figures (`PAPER_GAIN`, an RTX 3090) are printed
beside ours, labelled as the paper's.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from collections.abc import Callable

import torch
from torch import Tensor, nn

from .. import patch
from ..methods import DePTConfig, PromptTuningConfig, equal_budget
from . import end_to_end
from ._timing import at_least, interleaved_times, kept_freed_memory, median_iqr
from .end_to_end import EOS, MAX_LENGTH, PAD, T5_DIMS, glue_like_lengths, t5_random
from .verdict import findings, noisy_rows, percent_phrase, relative_spread

PROMPT_LENGTH = 100
# DePT's inference speed-up over PT (l=100) the paper reports (Figure 4, RTX 3090).
PAPER_GAIN = {"t5-base": 0.065, "t5-large": 0.181}
PAPER = "the DePT paper (Figure 4, RTX 3090)"


def unavailable() -> str | None:
    """Why the Trainer cannot run here (it needs accelerate), or None."""
    import importlib.util

    if importlib.util.find_spec("accelerate") is None:
        return "the Hugging Face Trainer needs accelerate (pip install -e '.[bench]')"
    return None


def make_dataset(n: int, vocab: int, seed: int = 0) -> list[dict[str, Tensor]]:
    """`n` samples: input_ids (s_i,) of GLUE-like lengths, labels (3,) ending in </s>."""
    gen = torch.Generator().manual_seed(seed)
    lengths = glue_like_lengths(n, gen)
    out = []
    for s in lengths.tolist():
        ids = torch.randint(2, vocab, (s,), generator=gen)
        labels = torch.cat([torch.randint(2, vocab, (2,), generator=gen), torch.tensor([EOS])])
        out.append({"input_ids": ids, "labels": labels})
    return out


def collate(samples: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Right-pad a batch's inputs to its longest: input_ids, attention_mask (B, s), labels."""
    s = max(x["input_ids"].numel() for x in samples)
    ids = torch.full((len(samples), s), PAD, dtype=torch.long)
    mask = torch.zeros((len(samples), s), dtype=torch.long)
    for i, x in enumerate(samples):
        n = x["input_ids"].numel()
        ids[i, :n] = x["input_ids"]
        mask[i, :n] = 1
    labels = torch.stack([x["labels"] for x in samples])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def predictor(model: nn.Module, dataset: list, batch: int, device: str, out_dir: str) -> Callable:
    """One `Trainer.predict` over `dataset` (a call of the returned function)."""
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=out_dir,
        per_device_eval_batch_size=batch,
        report_to=[],
        disable_tqdm=True,
        use_cpu=torch.device(device).type == "cpu",
        dataloader_num_workers=0,
        # The collator builds the model's arguments itself; the patched forward's signature
        # is not the one the Trainer would filter columns by.
        remove_unused_columns=False,
    )
    trainer = Trainer(model=model, args=args, data_collator=collate)
    return lambda: trainer.predict(dataset)


def run(base: nn.Module, dims: str, samples: int, batch: int, rounds: int, device: str) -> dict:
    """Time `Trainer.predict` of PT (l=100) and DePT (equal budget) round-robin.

    Returns the setups' rows (name, samples/s, median and IQR seconds per pass over the
    dataset, relative spread, trainable parameters) and the paper's figure for `dims`.
    """
    d = base.config.d_model
    m, r = equal_budget(PROMPT_LENGTH, d, MAX_LENGTH, num_virtual_tokens=40)
    configs = {
        f"PT (l={PROMPT_LENGTH})": PromptTuningConfig(PROMPT_LENGTH),
        f"DePT (m={m}, r={r})": DePTConfig(num_virtual_tokens=m, r=r, max_length=MAX_LENGTH),
    }
    dataset = make_dataset(samples, base.config.vocab_size)
    models = {name: patch(copy.deepcopy(base), c).eval() for name, c in configs.items()}
    for model in models.values():
        # Non-zero low-rank update, so DePT's B does real work (it starts at zero).
        zeros = [p for p in model.dept_adapter.parameters() if not p.any()]
        end_to_end.fill_normal_(zeros, 0.02, torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as tmp:
        fns = {n: predictor(mdl, dataset, batch, device, tmp) for n, mdl in models.items()}
        times = interleaved_times(fns, rounds, device)
    rows = []
    for name, t in times.items():
        median, iqr = median_iqr(t)
        adapter = models[name].dept_adapter
        rows.append(
            {
                "setup": name,
                "samples_per_second": samples / median,
                "seconds_per_pass": median,
                "iqr_seconds": iqr,
                "relative_spread": relative_spread(t),
                "trainable_parameters": sum(p.numel() for p in adapter.parameters()),
            }
        )
    return {
        "dims": dims,
        "d_model": d,
        "samples": samples,
        "batch": batch,
        "rounds": rounds,
        "rows": rows,
        "paper_gain": PAPER_GAIN.get(dims),
    }


def model_label(dims: str) -> str:
    """'T5 at t5-base dims' for a named size, else the checkpoint's name as given."""
    return f"T5 at {dims} dims" if dims in T5_DIMS else dims


def report(result: dict) -> str:
    """Table, legend, the paper's figure and the finding (or the warning)."""
    pt, dept = result["rows"]
    model = model_label(result["dims"])
    lines = [
        f"Inference (Trainer.predict, {result['samples']} samples, batch {result['batch']}, "
        f"{model}, {result['rounds']} rounds):",
        f"{'setup':22} {'samples/s':>10} {'s/pass':>8} {'IQR':>7} {'spread':>7} {'params':>8}",
    ]
    for r in result["rows"]:
        lines.append(
            f"{r['setup']:22} {r['samples_per_second']:10.1f} {r['seconds_per_pass']:8.3f} "
            f"{r['iqr_seconds']:7.3f} {r['relative_spread']:7.1%} {r['trainable_parameters']:8d}"
        )
    lines.append(
        "Columns: samples/s, the dataset's size over the median seconds of one Trainer.predict "
        "pass over it (s/pass); IQR, the interquartile range of those pass times; spread, "
        "IQR / median; params, trainable parameters."
    )
    paper = result["paper_gain"]
    lines.append(
        f"Paper's figure, not measured here: {PAPER} reports DePT +{paper:.1%} samples/s over "
        f"PT at {model}."
        if paper is not None
        else f"Paper's figures, not measured here: {PAPER} reports DePT +6.5% (T5-base) and "
        f"+18.1% (T5-large) samples/s over PT; none at these dims."
    )
    budget = (
        "at equal trainable parameters"
        if dept["trainable_parameters"] == pt["trainable_parameters"]
        else f"at about equal trainable parameters "
        f"({dept['trainable_parameters']} vs {pt['trainable_parameters']})"
    )
    sentence = (
        f"{dept['setup']} evaluates "
        f"{percent_phrase(pt['seconds_per_pass'], dept['seconds_per_pass'])} than "
        f"{pt['setup']} {budget}: {dept['samples_per_second']:.1f} vs "
        f"{pt['samples_per_second']:.1f} samples/s, {model}."
    )
    spreads = {f"{r['setup']} pass time": r["relative_spread"] for r in result["rows"]}
    return "\n".join(lines + findings([sentence], noisy_rows(spreads)))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dims", choices=sorted(T5_DIMS), default="t5-small", help="random-weight T5 dims"
    )
    parser.add_argument("--samples", type=at_least(1), default=16)
    parser.add_argument("--batch", type=at_least(1), default=8)
    parser.add_argument("--rounds", type=at_least(3), default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    base = t5_random(args.dims).to(args.device)
    with kept_freed_memory() as memory:
        print(memory)
        print(report(run(base, args.dims, args.samples, args.batch, args.rounds, args.device)))


if __name__ == "__main__":
    main()
