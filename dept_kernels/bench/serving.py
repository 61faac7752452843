"""Multi-task serving: one mixed batch over T tasks against T per-task batches.

    python -m dept_kernels.bench.serving [--per-task 2] [--rounds 5] [--new-tokens 4]

For DePT (m=40, r from the equal budget) and AoT P-tuning (FC, r=64, fused tables), T in
{2, 8}: T adapters with different random weights are saved (`save_adapter`) and stacked onto
a copy of one random-weight T5 (`stack_adapters`; t5-small dims with a vocabulary of
`VOCAB` by default: AoT serves T tables of V x d per encoder layer, whose memory grows with
V, while the gather-add reads only B*s*d). Candidates, on the same T * b samples
(GLUE-like lengths, `end_to_end.glue_like_lengths`):

- mixed: one batch of the T * b samples, task_ids = sample index mod T, padded to its
  longest input;
- per task: T batches of the b samples of one task each, each padded to its own longest
  input, through the same stacked model with task_ids all t (what T single-task servers
  would run: the same code path, so the difference is the batching).

Two passes: forward (with 2 target tokens and </s> as labels) and greedy `generate` of
`--new-tokens` tokens. Each (method, T, pass) times its two candidates round-robin
(`_timing.interleaved_times`), reporting median and IQR. A comparison's ratio is stated only
when both of its rows' spreads are within `verdict.NOISE_LIMIT`: each is timed on its own,
so load during one does not bear on another; the others are named as inconclusive.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from .. import patch, save_adapter, stack_adapters
from ..methods import AoTConfig, DePTConfig, equal_budget
from . import end_to_end
from ._timing import at_least, interleaved_times, kept_freed_memory, median_iqr
from .end_to_end import EOS, MAX_LENGTH, PAD, T5_DIMS, glue_like_lengths, t5_random
from .verdict import findings_each, relative_spread, speed_phrase

TASKS = (2, 8)
# The served T5's size in the main job: t5-small dims, a reduced vocabulary (see above).
DIMS, VOCAB = "t5-small", 8192
MIXED, PER_TASK = "mixed batch", "per-task batches"


def configs(d: int) -> dict[str, object]:
    """The served methods: DePT at the equal budget of PT (l=100), AoT with fused tables."""
    m, r = equal_budget(100, d, MAX_LENGTH, num_virtual_tokens=40)
    return {
        f"DePT (m={m}, r={r})": DePTConfig(num_virtual_tokens=m, r=r, max_length=MAX_LENGTH),
        "AoT (FC, r=64, fused)": AoTConfig("fc", r=64),
    }


def served_model(base: nn.Module, config: object, tasks: int, seed: int = 0) -> nn.Module:
    """A copy of `base` serving `tasks` adapters of `config` with different random weights,
    stacked from saved adapter directories (only one patched copy lives at a time)."""
    source = patch(copy.deepcopy(base), config)
    params = list(source.dept_adapter.parameters())
    with tempfile.TemporaryDirectory() as tmp:
        dirs = []
        for t in range(tasks):
            # Every weight non-zero (DePT's B and AoT's W_2 start at zero).
            end_to_end.fill_normal_(params, 0.02, torch.Generator().manual_seed(seed + t))
            dirs.append(Path(tmp) / f"task{t}")
            save_adapter(source, dirs[-1])
        del source
        return stack_adapters(dirs, model=copy.deepcopy(base)).eval()


def make_requests(tasks: int, per_task: int, vocab: int, seed: int = 0) -> dict[str, Tensor]:
    """T * b requests: input_ids, attention_mask (B, s) padded to the longest, labels (B, 3),
    task_ids (B,) = sample index mod T."""
    gen = torch.Generator().manual_seed(seed)
    n = tasks * per_task
    lengths = glue_like_lengths(n, gen)
    s = int(lengths.max())
    mask = (torch.arange(s)[None, :] < lengths[:, None]).long()
    ids = torch.randint(2, vocab, (n, s), generator=gen) * mask
    labels = torch.cat([torch.randint(2, vocab, (n, 2), generator=gen), torch.full((n, 1), EOS)], 1)
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "labels": labels,
        "task_ids": torch.arange(n) % tasks,
    }


def split_by_task(batch: dict[str, Tensor], tasks: int) -> list[dict[str, Tensor]]:
    """One batch per task: its rows, cut to their longest input."""
    out = []
    for t in range(tasks):
        rows = batch["task_ids"] == t
        part = {k: v[rows] for k, v in batch.items()}
        s = int(part["attention_mask"].sum(1).max())
        part["input_ids"] = part["input_ids"][:, :s]
        part["attention_mask"] = part["attention_mask"][:, :s]
        out.append(part)
    return out


def passes(new_tokens: int) -> dict[str, Callable[[nn.Module, dict], object]]:
    """How each pass runs a model on one batch."""

    def forward(model: nn.Module, b: dict) -> object:
        return model(**b)

    def generate(model: nn.Module, b: dict) -> object:
        return model.generate(
            input_ids=b["input_ids"],
            attention_mask=b["attention_mask"],
            task_ids=b["task_ids"],
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            num_beams=1,
            pad_token_id=PAD,
            eos_token_id=EOS,
            decoder_start_token_id=PAD,
        )

    return {"forward": forward, f"generate ({new_tokens} new tokens)": generate}


def time_candidates(
    fn: Callable[[nn.Module, dict], object],
    model: nn.Module,
    batch: dict[str, Tensor],
    parts: list[dict[str, Tensor]],
    rounds: int,
    device: str,
) -> dict[str, list[float]]:
    """Seconds per round of the mixed batch and of the per-task batches, round-robin."""
    fns = {MIXED: lambda: fn(model, batch), PER_TASK: lambda: [fn(model, p) for p in parts]}
    return interleaved_times(fns, rounds, device)


@torch.no_grad()
def run(
    base: nn.Module,
    per_task: int,
    rounds: int,
    new_tokens: int,
    device: str,
    tasks: tuple[int, ...] | None = None,
) -> dict:
    """Time mixed against per-task batches for every method, T (default `TASKS`) and pass;
    returns the rows."""
    rows = []
    for method, config in configs(base.config.d_model).items():
        for t in tasks or TASKS:
            model = served_model(base, config, t).to(device)
            batch = {
                k: v.to(device)
                for k, v in make_requests(t, per_task, base.config.vocab_size).items()
            }
            parts = split_by_task(batch, t)
            for pass_name, fn in passes(new_tokens).items():
                times = time_candidates(fn, model, batch, parts, rounds, device)
                for candidate, ts in times.items():
                    median, iqr = median_iqr(ts)
                    rows.append(
                        {
                            "method": method,
                            "tasks": t,
                            "pass": pass_name,
                            "candidate": candidate,
                            "samples": t * per_task,
                            "seconds": median,
                            "iqr_seconds": iqr,
                            "samples_per_second": t * per_task / median,
                            "relative_spread": relative_spread(ts),
                        }
                    )
    return {"per_task": per_task, "rounds": rounds, "new_tokens": new_tokens, "rows": rows}


def _key(r: dict) -> str:
    return f"{r['method']}, T={r['tasks']}, {r['pass']}"


def sentences(rows: list[dict], per_task: int) -> list[str]:
    """One sentence per (method, T, pass): the mixed batch's throughput against T batches."""
    groups: dict[str, dict[str, dict]] = {}
    for r in rows:
        groups.setdefault(_key(r), {})[r["candidate"]] = r
    out = []
    for key, g in groups.items():
        mixed, split = g[MIXED], g[PER_TASK]
        t = mixed["tasks"]
        out.append(
            f"{key}: one mixed batch of {mixed['samples']} samples serves them "
            f"{speed_phrase(split['seconds'], mixed['seconds'])} than {t} per-task batches of "
            f"{per_task} ({mixed['samples_per_second']:.1f} vs "
            f"{split['samples_per_second']:.1f} samples/s)."
        )
    return out


def report(result: dict) -> str:
    """Table, legend and the findings (or the warning)."""
    lines = [
        f"Multi-task serving ({result['per_task']} samples per task, {result['rounds']} rounds):",
        f"{'method, T, pass':52} {'candidate':17} {'samples/s':>10} {'ms':>9} {'IQR ms':>8} "
        f"{'spread':>7}",
    ]
    for r in result["rows"]:
        lines.append(
            f"{_key(r):52} {r['candidate']:17} {r['samples_per_second']:10.1f} "
            f"{r['seconds'] * 1e3:9.2f} {r['iqr_seconds'] * 1e3:8.2f} "
            f"{r['relative_spread']:7.1%}"
        )
    lines.append(
        "Columns: samples/s, the T * b samples over the median time (ms) to serve them all: "
        "one stacked-model call on the mixed batch, or T calls, one per task's batch; IQR, "
        "the interquartile range of those times; spread, IQR / median."
    )
    groups: dict[str, list[dict]] = {}
    for r in result["rows"]:
        groups.setdefault(_key(r), []).append(r)
    stated = findings_each(
        [
            (
                sentences(group, result["per_task"]),
                {f"{key}, {r['candidate']}": r["relative_spread"] for r in group},
            )
            for key, group in groups.items()
        ],
        "comparisons (each timed on its own)",
    )
    return "\n".join(lines + stated)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dims", choices=sorted(T5_DIMS), default=DIMS, help="random-weight T5 dims"
    )
    parser.add_argument("--vocab", type=at_least(2), default=VOCAB)
    parser.add_argument("--per-task", type=at_least(1), default=2, help="samples per task")
    parser.add_argument("--rounds", type=at_least(3), default=5)
    parser.add_argument("--new-tokens", type=at_least(1), default=4)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    base = t5_random(args.dims, args.vocab).to(args.device)
    with kept_freed_memory() as memory:
        print(memory)
        print(report(run(base, args.per_task, args.rounds, args.new_tokens, args.device)))


if __name__ == "__main__":
    main()
