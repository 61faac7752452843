"""Tiny models with AoT P-tuning (the decoders, T5, BERT, RoBERTa, DeBERTa-v2) and the
reference written from docs/design.md §1 alone: the full (V, d) tables materialised by the
formulas from the adapter's own parameters (`torch.kron` for the Kronecker form), added as
`P_i[ids]` by plain forward pre-hooks on the unpatched model's layers.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    DebertaV2Config,
    DebertaV2ForSequenceClassification,
    DebertaV2Model,
    RobertaConfig,
    RobertaForSequenceClassification,
    RobertaModel,
    T5ForConditionalGeneration,
)

import dept_kernels as dk
from dept_kernels.testing import compare

from .models import ARCH_TABLE, DECODERS, LM_CLASSES, PAD, VOCAB, tiny_config

_ENCODER_DIMS = dict(
    vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
    intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0, num_labels=3, initializer_range=0.2,
)  # fmt: skip
# DeBERTa-v2 as DeBERTa-v2-xlarge (the AoT paper's backbone) configures it: bucketed relative
# attention both ways, normalised relative embeddings, no absolute positions, and the
# convolution after layer 0 (which reads the embedding output again).
_DEBERTA_V2 = dict(
    relative_attention=True, position_buckets=16, norm_rel_ebd="layer_norm",
    pos_att_type=["p2c", "c2p"], position_biased_input=False, share_att_key=True,
    conv_kernel_size=3, conv_act="gelu", type_vocab_size=0, pooler_dropout=0.0,
)  # fmt: skip
ENCODER_CONFIGS = {
    "bert": (BertConfig, {"pad_token_id": PAD, "attn_implementation": "eager"}),
    "roberta": (RobertaConfig, {"pad_token_id": 1, "attn_implementation": "eager"}),
    "deberta-v2": (DebertaV2Config, {"pad_token_id": PAD, **_DEBERTA_V2}),
}
# The encoder-only base models and the attribute their heads keep them in.
ENCODER_BASES = {
    "bert": (BertModel, "bert"),
    "roberta": (RobertaModel, "roberta"),
    "deberta-v2": (DebertaV2Model, "deberta"),
}

ARCHS = (*DECODERS, "t5", *ENCODER_CONFIGS)
REPARAMS = ("kron", "fc")
GENERATORS = (*DECODERS, "t5")


def encoder_config(arch: str, **changes):
    """`arch`'s tiny config, with `changes` to its fields."""
    cls, fields = ENCODER_CONFIGS[arch]
    return cls(**{**_ENCODER_DIMS, **fields, **changes})


CLASSES = {
    **{arch: LM_CLASSES[arch] for arch in DECODERS},
    "t5": T5ForConditionalGeneration,
    "bert": BertForSequenceClassification,
    "roberta": RobertaForSequenceClassification,
    "deberta-v2": DebertaV2ForSequenceClassification,
}


def tiny_model(arch: str, dtype=torch.float32, cls=None, **changes):
    """`arch`'s tiny model (`cls`: another class of it; `changes`: encoder config fields)."""
    torch.manual_seed(0)
    config = encoder_config(arch, **changes) if arch in ENCODER_CONFIGS else tiny_config(arch)
    return (cls or CLASSES[arch])(config).to(dtype).eval()


def sites(model, arch):
    """(module receiving input_ids, the layers the bias goes before): named by hand here."""
    if arch in DECODERS:
        inner = model.base_model
        return inner, getattr(inner, ARCH_TABLE[arch].layers)
    if arch == "t5":
        return model.encoder, model.encoder.block
    base, attribute = ENCODER_BASES[arch]
    inner = model if isinstance(model, base) else getattr(model, attribute)
    return inner, inner.encoder.layer


def randomize(adapter, seed: int = 1) -> None:
    """Non-zero W_R / W_2 / b_2 (they start at zero), so each layer's bias is not zero."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in adapter.named_parameters():
            if name.rsplit(".", 1)[-1] in ("w_r", "w2", "b2", "b1"):
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))


def formula_tables(adapter, embedding) -> list[torch.Tensor]:
    """Each layer's full (V, d) table from docs/design.md §1, in fp32, differentiable."""
    vocab = embedding.shape[0]
    tables = []
    for layer in adapter.layers:
        if adapter.config.reparam == "kron":
            kron = torch.kron(layer.w_l.float(), layer.w_m.float())  # (a*b, r*r)
            tables.append((kron @ layer.w_r.float())[:vocab])
        else:
            h = F.relu(embedding.detach().float() @ layer.w1.float() + layer.b1.float())
            tables.append(h @ layer.w2.float() + layer.b2.float())
    return tables


def hook_reference(model, arch, tables, task_ids=None) -> list:
    """Register `H_i += P_i[ids]` (or `P_i[task, ids]`) on an unpatched model's layers."""
    inner, layers = sites(model, arch)
    seen = {}

    def record(module, args, kwargs):
        seen["ids"] = kwargs["input_ids"] if kwargs.get("input_ids") is not None else args[0]

    def add(i):
        def hook(module, args, kwargs):
            hidden = args[0]
            ids = seen["ids"]
            table = tables[i] if task_ids is None else tables[i][task_ids[:, None], ids]
            bias = table[ids] if task_ids is None else table
            return ((hidden.float() + bias.float()).to(hidden.dtype), *args[1:]), kwargs

        return hook

    handles = [inner.register_forward_pre_hook(record, with_kwargs=True)]
    handles += [
        layer.register_forward_pre_hook(add(i), with_kwargs=True) for i, layer in enumerate(layers)
    ]
    return handles


def patched_pair(arch, reparam, dtype=torch.float32, cls=None, seed=1):
    base = tiny_model(arch, dtype, cls)
    model = dk.patch(copy.deepcopy(base), dk.AoTConfig(reparam, r=4))
    randomize(model.dept_adapter, seed)
    for p in base.parameters():
        p.requires_grad_(False)
    return base, model


def batch(seed=0, b=3, s=9):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(2, VOCAB, (b, s), generator=gen)


def run(arch, model, ids):
    """Logits of one forward (T5 with decoder labels)."""
    if arch == "t5":
        return model(input_ids=ids, labels=ids[:, :5].contiguous()).logits
    return model(input_ids=ids).logits


def scalar(logits):
    gen = torch.Generator().manual_seed(7)
    return (logits.float() * torch.randn(logits.shape, generator=gen)).sum()


def assert_close(actual, expected, dtype, scale_tol=2.0):
    """Two units of the dtype's tolerance: a half-precision table rounds each bias row once
    more than the fp32 formula does before the fp32 add."""
    compare.assert_close(actual, expected, dtype, slack=scale_tol)


def check_dropout_per_distinct_id(op) -> None:
    """`op()`: an AoT op with dropout on the ids `[[1, 2, 1, 3, 1, 2, 0, 4]] * 2`. The same
    output under the same seed and another under another; one mask per distinct id (every
    occurrence of id 1 gets the same bias, id 2 another)."""
    torch.manual_seed(123)
    first = op()
    torch.manual_seed(123)
    second = op()
    torch.manual_seed(7)
    third = op()
    assert torch.equal(first, second) and not torch.equal(first, third)
    assert torch.equal(first[0, 0], first[0, 2]) and torch.equal(first[0, 0], first[1, 4])
    assert not torch.equal(first[0, 0], first[0, 1])
