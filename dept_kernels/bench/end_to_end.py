"""End to end: training steps of the prompt methods on a T5 with t5-small (or t5-base) dims.

Four setups train the same frozen random-weight T5 (or a local checkpoint) on the same
batches, with AdamW over the adapter, one step of each in turn (rotated order) per batch:

- PT: prompt tuning with l = 100 virtual tokens, batches padded to their longest input;
- DePT (fused): m = 40 and r from the equal-budget rule `l*d = m*d + (L + d)*r` at L = 256
  (r = 45 on T5-base, 40 at t5-small's width), through `dept_kernels.patch`, batches padded
  to their longest input;
- DePT (official path): the official code's model (`OfficialDePT`, shaped like its PEFT
  fork's), its formula in eager PyTorch (`official_dept_embedding`), every batch padded to
  max_length as that code's tokenizer does;
- DePT (official path, patched in place): a copy of that model after one call to
  `dept_kernels.patch(model)`, fed the same batches padded to max_length: the patched
  forward cuts the all-padding columns itself and runs the fused op.

Then AoT P-tuning inference: the same T5 with a fused AoT adapter (a gather-add before every
encoder layer) against the unpatched model, eval and no_grad, forwards alternated.

Input lengths follow a GLUE-like distribution (stated in `glue_like_lengths`); targets are
two tokens and </s>. Time per step is the median over the timed steps, with the
interquartile range as its spread; memory is the mean over those steps of the bytes
autograd saves for backward (and the CUDA peak on a GPU).
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from torch import Tensor, nn

from .. import merge, patch
from ..methods import AoTConfig, DePTConfig, PromptTuningConfig, equal_budget
from ..testing import official_dept_embedding
from ._timing import median_iqr, rotation, sync
from .memory import saved_bytes
from .verdict import relative_spread

MAX_LENGTH = 256
PAD, EOS = 0, 1


# (d_model, d_kv, d_ff, layers, heads) of the public T5 checkpoints the runs are named after.
T5_DIMS = {
    "t5-small": (512, 64, 2048, 6, 8),
    "t5-base": (768, 64, 3072, 12, 12),
    "t5-large": (1024, 64, 4096, 24, 16),
}


def t5_random(dims: str = "t5-small", vocab: int = 32128):
    """A T5ForConditionalGeneration with the dimensions of `dims` and random weights."""
    from transformers import T5Config, T5ForConditionalGeneration

    d_model, d_kv, d_ff, layers, heads = T5_DIMS[dims]
    config = T5Config(
        vocab_size=vocab,
        d_model=d_model,
        d_kv=d_kv,
        d_ff=d_ff,
        num_layers=layers,
        num_heads=heads,
        dropout_rate=0.0,
        decoder_start_token_id=PAD,
        pad_token_id=PAD,
        eos_token_id=EOS,
    )
    return T5ForConditionalGeneration(config)


def glue_like_lengths(n: int, gen: torch.Generator) -> Tensor:
    """Input lengths in tokens: exp(N(3.6, 0.6)) clipped to [4, 256].

    Median about 37 and mean about 44 tokens, a long right tail: single-sentence GLUE tasks
    sit at the short end, sentence-pair tasks (RTE, MNLI) in the tail. This is a stated
    model of the distribution, not measured from tokenized GLUE.
    """
    lengths = torch.exp(3.6 + 0.6 * torch.randn(n, generator=gen))
    return lengths.round().clamp(4, MAX_LENGTH).long()


@dataclass
class Batch:
    input_ids: Tensor  # (B, s) right-padded to the batch's longest input
    attention_mask: Tensor
    labels: Tensor  # (B, 3)

    def padded_to(self, length: int) -> Batch:
        extra = length - self.input_ids.shape[1]
        ids = torch.nn.functional.pad(self.input_ids, (0, extra), value=PAD)
        mask = torch.nn.functional.pad(self.attention_mask, (0, extra), value=0)
        return Batch(ids, mask, self.labels)

    @property
    def real_tokens(self) -> int:
        return int(self.attention_mask.sum())


def make_batches(steps: int, batch: int, vocab: int, device: str, seed: int = 0) -> list[Batch]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        lengths = glue_like_lengths(batch, gen)
        s = int(lengths.max())
        ids = torch.randint(2, vocab, (batch, s), generator=gen)
        mask = (torch.arange(s)[None, :] < lengths[:, None]).long()
        ids = ids * mask
        labels = torch.cat(
            [torch.randint(2, vocab, (batch, 2), generator=gen), torch.full((batch, 1), EOS)], 1
        )
        out.append(Batch(ids.to(device), mask.to(device), labels.to(device)))
    return out


class _PromptEncoderLoRA(nn.Module):
    """The attributes of the official code's prompt encoder (its fork's PromptEmbeddingLoRA)."""

    def __init__(self, config: DePTConfig, d: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(config.num_virtual_tokens, d)
        nn.init.uniform_(self.embedding.weight, -0.5, 0.5)
        self.lora_embedding_A = nn.Parameter(torch.empty(config.max_length, config.r))
        nn.init.kaiming_uniform_(self.lora_embedding_A, a=5**0.5)
        self.lora_embedding_B = nn.Parameter(torch.zeros(config.r, d))
        self.scaling = config.scaling


class OfficialDePT(nn.Module):
    """DePT as the official code runs it: a model shaped like its PEFT fork's
    (`peft_config`, `prompt_encoder`, `base_model`; peft_type PROMPT_TUNING_LORA) whose
    forward is the eager formula on inputs padded to max_length. Being shaped so,
    `dept_kernels.patch(model)` accelerates it in place, keeping its Parameters."""

    def __init__(self, base: nn.Module, config: DePTConfig) -> None:
        super().__init__()
        self.base_model = base
        d = base.config.d_model
        self.peft_config = {
            "default": SimpleNamespace(
                peft_type="PROMPT_TUNING_LORA",
                num_virtual_tokens=config.num_virtual_tokens,
                r=config.r,
                lora_alpha=config.lora_alpha,
                max_length=config.max_length,
                token_dim=d,
                num_transformer_submodules=1,
            )
        }
        self.active_adapter = "default"
        self.prompt_encoder = nn.ModuleDict({"default": _PromptEncoderLoRA(config, d)})
        self.to(base.get_input_embeddings().weight.device)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor | None = None):
        enc = self.prompt_encoder["default"]
        embeds = official_dept_embedding(
            input_ids,
            self.base_model.get_input_embeddings().weight,
            enc.embedding.weight,
            enc.lora_embedding_A,
            enc.lora_embedding_B,
            scaling=enc.scaling,
        )
        m = enc.embedding.weight.shape[0]
        mask = torch.cat([attention_mask.new_ones(input_ids.shape[0], m), attention_mask], 1)
        return self.base_model(inputs_embeds=embeds, attention_mask=mask, labels=labels)


@dataclass
class Setup:
    """One row of the table: a loss per batch and the parameters AdamW trains."""

    name: str
    loss_fn: Callable[[Batch], Tensor]
    params: list[nn.Parameter]


def train_setups(setups: list[Setup], batches: list[Batch], warmup: int, progress) -> list[dict]:
    """Time AdamW steps of every setup over `batches` (the first `warmup` untimed), one step
    of each per batch in a rotated order, so that load from other processes falls on all
    of them alike."""
    optimizers = [torch.optim.AdamW(setup.params, lr=1e-3) for setup in setups]
    cuda = batches[0].input_ids.is_cuda
    times: list[list[float]] = [[] for _ in setups]
    losses: list[list[float]] = [[] for _ in setups]
    memory: list[list[int]] = [[] for _ in setups]
    peaks = [0] * len(setups)
    for i, batch in enumerate(batches):
        for k in rotation(range(len(setups)), i):
            setup, optimizer = setups[k], optimizers[k]
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            loss, saved = saved_bytes(lambda batch=batch, setup=setup: setup.loss_fn(batch))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize()
                peaks[k] = max(peaks[k], torch.cuda.max_memory_allocated())
            if i >= warmup:
                times[k].append(time.perf_counter() - start)
                memory[k].append(saved)
            losses[k].append(loss.item())
            progress.update(1)
    tokens = statistics.mean(b.real_tokens for b in batches[warmup:])
    rows = []
    for k, setup in enumerate(setups):
        step, iqr = median_iqr(times[k])
        rows.append(
            {
                "setup": setup.name,
                "seconds_per_step": step,
                "iqr_seconds": iqr,
                "real_tokens_per_second": tokens / step,
                "saved_for_backward_MiB": statistics.mean(memory[k]) / 2**20,
                "cuda_peak_MiB": peaks[k] / 2**20 if cuda else None,
                "trainable_parameters": sum(p.numel() for p in setup.params),
                "losses": losses[k],
                "relative_spread": relative_spread(times[k]),
            }
        )
    return rows


def padding_fraction(batches: list[Batch], length: int = MAX_LENGTH) -> float:
    """The share of the columns of batches padded to `length` that are padding in every row
    (what a patched model cuts): 1 - longest input / length, averaged over the batches."""
    return 1 - statistics.mean(b.input_ids.shape[1] for b in batches) / length


def run(
    base: nn.Module, batches: list[Batch], warmup: int, progress, prompt_length: int = 100
) -> list[dict]:
    """Train each setup on its own copy of `base`; returns one result row per setup."""
    # m = 40 as in the paper; r from the equal-budget rule at this model's width (45 at
    # T5-base's d = 768, 40 at t5-small's d = 512), so DePT trains as many parameters as PT.
    m, r = equal_budget(prompt_length, base.config.d_model, MAX_LENGTH, num_virtual_tokens=40)
    dept = DePTConfig(num_virtual_tokens=m, r=r, max_length=MAX_LENGTH)

    def patched(name: str, config: object) -> Setup:
        model = patch(copy.deepcopy(base), config)
        params = list(model.dept_adapter.parameters())
        return Setup(name, lambda b: model(**vars(b)).loss, params)

    def padded(model: nn.Module) -> Callable[[Batch], Tensor]:
        # The official code's tokenizer pads every input to max_length.
        return lambda b: model(**vars(b.padded_to(MAX_LENGTH))).loss

    official = OfficialDePT(copy.deepcopy(base).requires_grad_(False), dept)
    in_place = patch(copy.deepcopy(official))
    setups = [
        patched(f"PT (l={prompt_length})", PromptTuningConfig(prompt_length)),
        patched(f"DePT (m={m}, r={r}), fused", dept),
        Setup(f"DePT (m={m}, r={r}), official path", padded(official), _trainable(official)),
        Setup("official path, dk.patch in place", padded(in_place), _trainable(in_place)),
    ]
    rows = train_setups(setups, batches, warmup, progress)
    rows[-1]["padding_fraction"] = padding_fraction(batches[warmup:])
    return rows


@torch.no_grad()
def fill_normal_(params, std: float, generator: torch.Generator) -> None:
    """Fill each of `params` with N(0, std^2) drawn on the CPU from `generator`, then copied
    to the parameter's device: the same values on every device (a CPU generator cannot
    draw into CUDA memory)."""
    for p in params:
        p.copy_(torch.randn(p.shape, generator=generator) * std)


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


@torch.no_grad()
def aot_inference(base: nn.Module, batches: list[Batch], rounds: int, progress) -> dict:
    """Median time of the unpatched forward and of the fused-AoT forward, alternated, both
    under `torch.no_grad()` as inference runs (the fused tables are then added in place)."""
    plain = copy.deepcopy(base).eval()
    aot = patch(copy.deepcopy(base), AoTConfig(reparam="fc", r=64)).eval()
    # Non-zero tables, so the gather-add does real work (W_2 starts at zero).
    gen = torch.Generator().manual_seed(0)
    fill_normal_([layer.w2 for layer in aot.dept_adapter.layers], 0.02, gen)
    merge(aot)
    times: dict[str, list[float]] = {"unpatched": [], "AoT fused": []}
    device = batches[0].input_ids.device
    # Alternated, the fused forward first in the first round.
    models = [("AoT fused", aot), ("unpatched", plain)]
    for i in range(rounds):
        batch = batches[i % len(batches)]
        for name, model in rotation(models, i):
            sync(device)
            start = time.perf_counter()
            with torch.no_grad():
                model(**vars(batch))
            sync(device)
            if i:  # the first round warms up
                times[name].append(time.perf_counter() - start)
        progress.update(1)
    plain_s, aot_s = (statistics.median(times[k]) for k in ("unpatched", "AoT fused"))
    # Both forwards of a round run the same batch, so the per-round ratio is free of the
    # batches' differing lengths: its spread is the machine's noise.
    ratios = [a / u for a, u in zip(times["AoT fused"], times["unpatched"], strict=True)]
    return {
        "unpatched_s": plain_s,
        "aot_fused_s": aot_s,
        "overhead": aot_s / plain_s - 1,
        "paired_ratio_median": statistics.median(ratios) if ratios else None,
        "paired_ratio_relative_spread": relative_spread(ratios),
        "rounds_timed": len(ratios),
    }
