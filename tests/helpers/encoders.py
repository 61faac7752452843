"""Tiny BERT, RoBERTa and DeBERTa-v2 models with the prompt methods (DePT, prompt tuning,
EPT), and the reference written from docs/design.md §1 and PEFT's prompt tuning: the
unpatched model fed the formula's `inputs_embeds`, the mask with m ones in front and the
token types with m zeros in front, no position ids (the model numbers the m + s rows).
"""

from __future__ import annotations

import copy

import torch
from transformers import (
    BertForSequenceClassification,
    DebertaV2ForSequenceClassification,
    RobertaForSequenceClassification,
)

import dept_kernels as dk

from .aot import ENCODER_BASES, tiny_model
from .models import VOCAB, make_config, ones_front, randomize, reference_embeds

ENCODERS = ("bert", "roberta", "deberta-v2")
CLS_CLASSES = {
    "bert": BertForSequenceClassification,
    "roberta": RobertaForSequenceClassification,
    "deberta-v2": DebertaV2ForSequenceClassification,
}
BASE_CLASSES = {arch: cls for arch, (cls, _) in ENCODER_BASES.items()}
NUM_LABELS = 3


def encoder_model(arch: str, dtype=torch.float32, cls=None, **changes):
    """`arch`'s tiny model (`cls`: another class of it; default the seq-cls head)."""
    return tiny_model(arch, dtype, cls or CLS_CLASSES[arch], **changes)


def patched_pair(arch: str, method: str, dtype=torch.float32, cls=None, seed=1, **changes):
    """(unpatched reference model, patched copy with randomized adapter values)."""
    base = encoder_model(arch, dtype, cls, **changes)
    model = dk.patch(copy.deepcopy(base), make_config(method))
    randomize(model.dept_adapter, seed)
    for p in base.parameters():
        p.requires_grad_(False)
    return base, model


def pad_id(model) -> int:
    return model.config.pad_token_id


def padded_batch(model, seed=0, b=3, s=9):
    """(ids, mask, token_type_ids, labels): right padding in two rows, two segments."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (b, s), generator=gen)
    mask = torch.ones(b, s, dtype=torch.long)
    ids[0, -3:], mask[0, -3:] = pad_id(model), 0
    ids[2, -1:], mask[2, -1:] = pad_id(model), 0
    types = torch.zeros(b, s, dtype=torch.long)
    types[:, s // 2 :] = 1
    labels = torch.randint(0, NUM_LABELS, (b,), generator=gen)
    return ids, mask, types, labels


def reference_forward(base, adapter, ids, mask=None, token_type_ids=None, **kwargs):
    """The unpatched model on `[P; E[ids] + delta]`, `cat([1_m, mask])`, `cat([0_m, types])`."""
    m = adapter.num_virtual_tokens
    embeds = reference_embeds(adapter, base.get_input_embeddings(), ids)
    if mask is not None:
        kwargs["attention_mask"] = ones_front(mask, m)
    if token_type_ids is not None:
        zeros = torch.zeros(ids.shape[0], m, dtype=token_type_ids.dtype)
        kwargs["token_type_ids"] = torch.cat([zeros, token_type_ids], dim=1)
    return base(inputs_embeds=embeds, **kwargs)
