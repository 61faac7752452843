"""Tiny random models of architectures with no table entry (OPT, BLOOM, Phi; BART, an
encoder-decoder), which the generic path serves, and the references of their tests.

What the reference knows of each architecture is written here by hand, not read from the
library: where the heads keep the base model and the classification head, and whether the
forward takes `position_ids` (BLOOM's ALiBi reads the mask instead).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    BartForSequenceClassification,
    BartModel,
    BloomConfig,
    BloomForCausalLM,
    BloomForSequenceClassification,
    BloomModel,
    OPTConfig,
    OPTForCausalLM,
    OPTForSequenceClassification,
    OPTModel,
    PhiConfig,
    PhiForCausalLM,
    PhiForSequenceClassification,
    PhiModel,
    PretrainedConfig,
)

import dept_kernels as dk

from .models import EOS, PAD, VOCAB, make_config, ones_front, randomize, reference_embeds


@dataclass(frozen=True)
class Generic:
    """One architecture without a table entry: its tiny config and classes; `inner`: the
    attribute of the heads holding the base model; `positions`: whether its forward takes
    position_ids (generate then passes each token's rank among the real ones)."""

    config: PretrainedConfig
    lm: type
    cls: type
    base: type
    inner: str
    positions: bool = True

    def classes(self) -> dict[str, type]:
        return {"lm": self.lm, "cls": self.cls, "base": self.base}


# BART's sequence-classification head pools at its <eos> tokens, which its tests place.
BART_EOS = 2
_SPECIAL = dict(pad_token_id=PAD, bos_token_id=EOS, eos_token_id=EOS, attn_implementation="eager")

GENERIC_TABLE = {
    # OPT numbers its learned positions from the mask (max_position_embeddings rows usable).
    "opt": Generic(
        OPTConfig(
            vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32,
            dropout=0.0, attention_dropout=0.0, init_std=0.2, **_SPECIAL,
        ),
        OPTForCausalLM, OPTForSequenceClassification, OPTModel, inner="model",
    ),
    "bloom": Generic(
        BloomConfig(
            vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4, hidden_dropout=0.0,
            attention_dropout=0.0, initializer_range=0.5, **_SPECIAL,
        ),
        BloomForCausalLM, BloomForSequenceClassification, BloomModel, inner="transformer",
        positions=False,
    ),
    "phi": Generic(
        PhiConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=64, resid_pdrop=0.0,
            embd_pdrop=0.0, initializer_range=0.2, **_SPECIAL,
        ),
        PhiForCausalLM, PhiForSequenceClassification, PhiModel, inner="model",
    ),
    # An encoder-decoder; its embedding scales its lookup (embed_scale = sqrt(d)).
    "bart": Generic(
        BartConfig(
            vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2,
            encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
            decoder_ffn_dim=64, max_position_embeddings=64, dropout=0.0,
            attention_dropout=0.0, activation_dropout=0.0, init_std=0.5, scale_embedding=True,
            decoder_start_token_id=BART_EOS, forced_eos_token_id=None,
            **{**_SPECIAL, "eos_token_id": BART_EOS},
        ),
        BartForConditionalGeneration, BartForSequenceClassification, BartModel, inner="model",
        positions=False,
    ),
}  # fmt: skip
DECODER_ARCHS = ("opt", "bloom", "phi")
SEQ2SEQ_ARCHS = ("bart",)


def generic_config(arch: str) -> PretrainedConfig:
    """A fresh copy of `arch`'s tiny config."""
    return copy.deepcopy(GENERIC_TABLE[arch].config)


def generic_model(arch: str, kind: str = "lm", dtype=torch.float32, seed: int = 0):
    """A tiny random `arch` model with head `kind` ("lm", "cls" or "base"), in eval mode."""
    torch.manual_seed(seed)
    model = GENERIC_TABLE[arch].classes()[kind](generic_config(arch))
    return model.to(dtype).eval()


def generic_pair(arch: str, kind: str = "lm", method: str = "dept", dtype=torch.float32):
    """(unpatched frozen reference model, patched copy with randomized adapter values)."""
    base = generic_model(arch, kind, dtype)
    model = dk.patch(copy.deepcopy(base), make_config(method))
    randomize(model.dept_adapter)
    for p in base.parameters():
        p.requires_grad_(False)
    return base, model


def generic_embeds(arch: str, base, row_adapters, ids, mask, generating: bool = False):
    """Row b: [P; E[ids] + delta] of row b's adapter. Under generate, a decoder-only model
    taking position_ids gets each token's rank among the real ones, which picks the low-rank
    row; otherwise the row is the column."""
    rank = generating and mask is not None and GENERIC_TABLE[arch].positions
    rows = (mask.cumsum(-1) - 1).clamp(min=0) if rank else None
    embedding = base.get_input_embeddings()
    out = []
    for b, adapter in enumerate(row_adapters):
        pos = None if rows is None else rows[b : b + 1]
        out.append(reference_embeds(adapter, embedding, ids[b : b + 1], pos))
    return torch.cat(out)


def generic_generate(arch: str, base, row_adapters, ids, mask, **kwargs):
    """The unpatched model's generate from each row's formula embeds, m ones before the mask:
    the generated tokens (an encoder-decoder's start with the decoder's start token)."""
    m = row_adapters[0].num_virtual_tokens
    embeds = generic_embeds(arch, base, row_adapters, ids, mask, generating=True)
    if mask is None:
        mask = torch.ones_like(ids)
    return base.generate(inputs_embeds=embeds, attention_mask=ones_front(mask, m), **kwargs)
