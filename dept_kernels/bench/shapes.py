"""The problems the benchmarks time: sizes named after the models they come from, and the
id distribution of the AoT suites."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

ZIPF_EXPONENT = 1.0


@dataclass(frozen=True)
class Shape:
    """A (batch, seq, d) input over a vocabulary of V ids, named after the model whose dims
    it takes; the DePT problems add the prompt length m, the rank r and max_length L."""

    name: str
    batch: int
    seq: int
    d: int
    vocab: int
    m: int | None = None
    r: int | None = None
    max_length: int | None = None


def _by_name(*shapes: Shape) -> dict[str, Shape]:
    return {s.name: s for s in shapes}


# DePT: m, r are the paper's equal-budget choice for a 100-token prompt at max_length L.
SHAPES = _by_name(
    Shape("t5-small", 16, 256, 512, 32128, 40, 45, 256),
    Shape("t5-base", 16, 256, 768, 32128, 40, 45, 256),
    Shape("t5-large", 16, 256, 1024, 32128, 40, 45, 256),
    Shape("gpt2", 8, 512, 768, 50257, 60, 40, 512),
    Shape("llama-2-7b", 8, 512, 4096, 32000, 60, 40, 512),
)

# AoT: a hidden state and a vocabulary; the rank is the suite's own.
AOT_SHAPES = _by_name(
    Shape("t5-small", 16, 256, 512, 32128),
    Shape("t5-base", 16, 256, 768, 32128),
    Shape("t5-large", 16, 256, 1024, 32128),
    Shape("gpt2", 8, 512, 768, 50257),
    Shape("gpt2-medium", 8, 512, 1024, 50257),
    Shape("gpt2-large", 8, 512, 1280, 50257),
    Shape("llama-2-7b", 8, 512, 4096, 32000),
)


def zipf_ids(batch: int, seq: int, vocab: int, seed: int = 0) -> Tensor:
    """(batch, seq) ids with P(rank k) ∝ k^-ZIPF_EXPONENT, ranks shuffled over the vocabulary."""
    gen = torch.Generator().manual_seed(seed)
    weights = torch.arange(1, vocab + 1, dtype=torch.float64) ** -ZIPF_EXPONENT
    ranks = torch.multinomial(weights, batch * seq, replacement=True, generator=gen)
    return torch.randperm(vocab, generator=gen)[ranks].reshape(batch, seq)
