"""End to end: training steps of the prompt methods on a T5 with t5-small (or t5-base) dims.

Three setups train the same frozen random-weight T5 (or a local checkpoint) on the same
batches, with AdamW over the adapter:

- PT: prompt tuning with l = 100 virtual tokens, batches padded to their longest input;
- DePT (fused): m = 40 and r from the equal-budget rule `l*d = m*d + (L + d)*r` at L = 256
  (r = 45 on T5-base, 40 at t5-small's width), through `dept_kernels.patch`, batches padded
  to their longest input;
- DePT (official path): the official code's formula in eager PyTorch
  (`official_dept_embedding`), every batch padded to max_length as that code does.

Then AoT P-tuning inference: the same T5 with a fused AoT adapter (a gather-add before every
encoder layer) against the unpatched model, eval and no_grad, forwards alternated.

Input lengths follow a GLUE-like distribution (stated in `glue_like_lengths`); targets are
two tokens and </s>. Time per step is the median over the timed steps; memory is the mean
over those steps of the bytes autograd saves for backward (and the CUDA peak on a GPU).
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .. import fuse, patch
from ..methods import AoTConfig, DePTConfig, PromptTuningConfig, equal_budget
from ..ops import official_dept_embedding

MAX_LENGTH = 256
PAD, EOS = 0, 1


# (d_model, d_kv, d_ff, layers, heads) of the public T5 checkpoints the runs are named after.
T5_DIMS = {
    "t5-small": (512, 64, 2048, 6, 8),
    "t5-base": (768, 64, 3072, 12, 12),
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


class OfficialDePT(nn.Module):
    """DePT as the official code runs it: the eager formula on inputs padded to max_length."""

    def __init__(self, base: nn.Module, config: DePTConfig) -> None:
        super().__init__()
        self.base = base
        d = base.config.d_model
        ref = base.get_input_embeddings().weight
        self.prompt = nn.Parameter(torch.empty(config.num_virtual_tokens, d).uniform_(-0.5, 0.5))
        self.lora_a = nn.Parameter(torch.empty(config.max_length, config.r))
        nn.init.kaiming_uniform_(self.lora_a, a=5**0.5)
        self.lora_b = nn.Parameter(torch.zeros(config.r, d))
        self.scaling = config.scaling
        self.max_length = config.max_length
        self.to(ref.device)

    def forward(self, batch: Batch) -> Tensor:
        full = batch.padded_to(self.max_length)
        embeds = official_dept_embedding(
            full.input_ids,
            self.base.get_input_embeddings().weight,
            self.prompt,
            self.lora_a,
            self.lora_b,
            scaling=self.scaling,
        )
        m = self.prompt.shape[0]
        mask = torch.cat(
            [full.attention_mask.new_ones(full.input_ids.shape[0], m), full.attention_mask], 1
        )
        return self.base(inputs_embeds=embeds, attention_mask=mask, labels=batch.labels).loss


def saved_bytes(fn: Callable[[], Tensor]) -> tuple[Tensor, int]:
    total = 0

    def pack(t: Tensor) -> Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, total


def train_setup(
    name: str,
    loss_fn: Callable[[Batch], Tensor],
    params: list[nn.Parameter],
    batches: list[Batch],
    warmup: int,
    progress,
) -> dict:
    """Time AdamW steps of `loss_fn` over `batches` (the first `warmup` untimed)."""
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    cuda = batches[0].input_ids.is_cuda
    times, losses, memory = [], [], []
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for i, batch in enumerate(batches):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss, saved = saved_bytes(lambda batch=batch: loss_fn(batch))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
            memory.append(saved)
        losses.append(loss.item())
        progress.update(1)
    step = statistics.median(times)
    tokens = statistics.mean(b.real_tokens for b in batches[warmup:])
    return {
        "setup": name,
        "seconds_per_step": step,
        "real_tokens_per_second": tokens / step,
        "saved_for_backward_MiB": statistics.mean(memory) / 2**20,
        "cuda_peak_MiB": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        "trainable_parameters": sum(p.numel() for p in params),
        "losses": losses,
    }


def run(
    base: nn.Module, batches: list[Batch], warmup: int, progress, prompt_length: int = 100
) -> list[dict]:
    """Train each setup on its own copy of `base`; returns one result row per setup."""
    # m = 40 as in the paper; r from the equal-budget rule at this model's width (45 at
    # T5-base's d = 768, 40 at t5-small's d = 512), so DePT trains as many parameters as PT.
    m, r = equal_budget(prompt_length, base.config.d_model, MAX_LENGTH, num_virtual_tokens=40)
    dept = DePTConfig(num_virtual_tokens=m, r=r, max_length=MAX_LENGTH)

    def patched(name: str, config: object) -> dict:
        model = patch(copy.deepcopy(base), config)
        params = list(model.dept_adapter.parameters())
        return train_setup(name, lambda b: model(**vars(b)).loss, params, batches, warmup, progress)

    results = [
        patched(f"PT (l={prompt_length})", PromptTuningConfig(prompt_length)),
        patched(f"DePT (m={m}, r={r}), fused", dept),
    ]
    frozen = copy.deepcopy(base).requires_grad_(False)
    official = OfficialDePT(frozen, dept)
    results.append(
        train_setup(
            f"DePT (m={m}, r={r}), official path",
            official,
            [official.prompt, official.lora_a, official.lora_b],
            batches,
            warmup,
            progress,
        )
    )
    return results


@torch.no_grad()
def aot_inference(base: nn.Module, batches: list[Batch], rounds: int, progress) -> dict:
    """Median time of the unpatched forward and of the fused-AoT forward, alternated."""
    plain = copy.deepcopy(base).eval()
    aot = patch(copy.deepcopy(base), AoTConfig(reparam="fc", r=64)).eval()
    for layer in aot.dept_adapter.layers:
        # Non-zero tables, so the gather-add does real work (W_2 starts at zero).
        layer.w2.normal_(0.0, 0.02, generator=torch.Generator().manual_seed(0))
    fuse(aot)
    times: dict[str, list[float]] = {"unpatched": [], "AoT fused": []}
    cuda = batches[0].input_ids.is_cuda
    for i in range(rounds):
        batch = batches[i % len(batches)]
        order = [("unpatched", plain), ("AoT fused", aot)]
        for name, model in order if i % 2 else order[::-1]:
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            model(**vars(batch))
            if cuda:
                torch.cuda.synchronize()
            if i:  # the first round warms up
                times[name].append(time.perf_counter() - start)
        progress.update(1)
    plain_s, aot_s = (statistics.median(times[k]) for k in ("unpatched", "AoT fused"))
    return {"unpatched_s": plain_s, "aot_fused_s": aot_s, "overhead": aot_s / plain_s - 1}
