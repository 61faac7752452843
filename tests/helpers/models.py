"""Tiny random-weight models of every architecture the tests run (`ARCH_TABLE`: T5, GPT-2,
LLaMA, Mistral, Qwen2, Gemma) with DePT, prompt tuning and EPT, their batches, and the
reference forward written from docs/design.md §1.

The reference builds `inputs_embeds` from the formulas with plain torch ops on the adapter's
own parameters and runs an unpatched copy of the model with the mask, labels and positions
shifted by hand.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import transformers
from transformers import (
    GemmaConfig,
    GemmaForCausalLM,
    GemmaForSequenceClassification,
    GemmaModel,
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    GPT2Model,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    LlamaModel,
    MistralConfig,
    MistralForCausalLM,
    MistralForSequenceClassification,
    MistralModel,
    PretrainedConfig,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2ForSequenceClassification,
    Qwen2Model,
    T5Config,
    T5ForConditionalGeneration,
    T5ForSequenceClassification,
)

import dept_kernels as dk
from dept_kernels.testing.compare import MODEL_TOLERANCES

transformers.logging.set_verbosity_error()

VOCAB = 128
PAD, EOS = 0, 1
METHODS = ("dept", "pt", "ept")


@dataclass(frozen=True)
class Arch:
    """One architecture the tests run: its tiny config and its classes.

    `base` is the decoder-only base model (None for T5); `layers` names the base model's
    list of blocks, where the AoT reference adds its bias (written here by hand, not read
    from the library's table)."""

    config: PretrainedConfig
    lm: type
    cls: type
    base: type | None = None
    layers: str = "layers"


_LLAMA_DIMS = dict(
    vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    pad_token_id=PAD, bos_token_id=EOS, eos_token_id=EOS, attn_implementation="eager",
    initializer_range=0.2,
)  # fmt: skip

# Every test that runs over architectures reads this table: a new one is one row.
ARCH_TABLE = {
    "t5": Arch(
        T5Config(
            vocab_size=VOCAB, d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=2,
            dropout_rate=0.0, decoder_start_token_id=PAD, pad_token_id=PAD, eos_token_id=EOS,
            attn_implementation="eager",
        ),
        T5ForConditionalGeneration,
        T5ForSequenceClassification,
    ),
    "gpt2": Arch(
        GPT2Config(
            vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0,
            embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=PAD, bos_token_id=EOS,
            eos_token_id=EOS, attn_implementation="eager", initializer_range=0.2,
        ),
        GPT2LMHeadModel, GPT2ForSequenceClassification, GPT2Model, layers="h",
    ),
    "llama": Arch(
        LlamaConfig(**_LLAMA_DIMS), LlamaForCausalLM, LlamaForSequenceClassification, LlamaModel
    ),
    # The window spans every test's batch; test_models_table narrows it.
    "mistral": Arch(
        MistralConfig(**_LLAMA_DIMS, sliding_window=64),
        MistralForCausalLM, MistralForSequenceClassification, MistralModel,
    ),
    "qwen2": Arch(
        Qwen2Config(**_LLAMA_DIMS), Qwen2ForCausalLM, Qwen2ForSequenceClassification, Qwen2Model
    ),
    # Gemma scales its input embeddings by sqrt(d) inside the model (test_gemma.py). With
    # transformers 4.x that scales the prompt and the delta too: wider weights keep the
    # layers' share of the residual stream, so generation depends on the input.
    "gemma": Arch(
        GemmaConfig(**{**_LLAMA_DIMS, "initializer_range": 0.3}, head_dim=8),
        GemmaForCausalLM, GemmaForSequenceClassification, GemmaModel,
    ),
}  # fmt: skip
ARCHS = tuple(ARCH_TABLE)
DECODERS = tuple(a for a, t in ARCH_TABLE.items() if t.base is not None)
LM_CLASSES = {a: t.lm for a, t in ARCH_TABLE.items()}
CLS_CLASSES = {a: t.cls for a, t in ARCH_TABLE.items()}
BASE_CLASSES = {a: ARCH_TABLE[a].base for a in DECODERS}


def tiny_config(arch: str) -> PretrainedConfig:
    """A fresh copy of `arch`'s tiny config (a test may edit its own)."""
    return copy.deepcopy(ARCH_TABLE[arch].config)


def tiny_model(arch: str, cls=None, dtype=torch.float32, seed: int = 0):
    torch.manual_seed(seed)
    model = (cls or LM_CLASSES[arch])(tiny_config(arch))
    return model.to(dtype).eval()


def make_config(method: str, max_length: int = 16):
    if method == "dept":
        return dk.DePTConfig(num_virtual_tokens=4, r=3, lora_alpha=8, max_length=max_length)
    if method == "pt":
        return dk.PromptTuningConfig(num_virtual_tokens=5)
    return dk.EPTConfig(num_virtual_tokens=3, hidden=2)


def randomize(adapter: torch.nn.Module, seed: int = 1) -> None:
    """Non-zero values everywhere (B and W_up start at zero)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=gen))


def patched_pair(arch: str, method: str, cls=None, dtype=torch.float32, max_length: int = 16):
    """(unpatched reference model, patched copy with randomized adapter values)."""
    base = tiny_model(arch, cls, dtype)
    model = dk.patch(copy.deepcopy(base), make_config(method, max_length))
    randomize(model.dept_adapter)
    for p in base.parameters():
        p.requires_grad_(False)
    return base, model


def reference_embeds(adapter, embedding, ids, position_ids=None):
    """inputs_embeds (B, m + s, d) from the formulas, fp32 math, cast to the table dtype.

    `embedding`: the model's input embedding module, whose output is `E[ids]` (Gemma's
    scales its lookup under transformers 5), or a plain (V, d) table."""
    batch, seq = ids.shape
    if isinstance(embedding, torch.nn.Module):
        with torch.no_grad():
            tokens = embedding(ids).float()
        weight = embedding.weight
    else:
        weight = embedding
        tokens = weight.float()[ids]
    if hasattr(adapter, "lora_a"):
        rows = torch.arange(seq).expand(batch, seq) if position_ids is None else position_ids
        tokens = tokens + adapter.config.lora_alpha / adapter.config.r**0.5 * (
            adapter.lora_a.float()[rows] @ adapter.lora_b.float()
        )
        prompt = adapter.prompt.float()
    elif hasattr(adapter, "w_down"):
        p = adapter.prompt.float()
        p = p + (p @ adapter.w_down.float()) @ adapter.w_up.float()
        prompt = p.expand(adapter.num_virtual_tokens, -1)
    else:
        prompt = adapter.prompt.float()
    prompts = prompt.unsqueeze(0).expand(batch, -1, -1)
    return torch.cat([prompts, tokens], dim=1).to(weight.dtype)


def ones_front(mask, m):
    return torch.cat([torch.ones(mask.shape[0], m, dtype=mask.dtype), mask], dim=1)


def ignore_front(labels, m):
    return torch.cat([torch.full((labels.shape[0], m), -100), labels], dim=1)


def batch(seed=0, b=3, s=9, t=5):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (b, s), generator=gen)
    mask = torch.ones(b, s, dtype=torch.long)
    labels = torch.randint(2, VOCAB, (b, t), generator=gen)
    return ids, mask, labels


def reference_forward(arch, base, adapter, ids, mask, labels, position_ids=None):
    """The unpatched model fed the formula's inputs_embeds, the mask with m ones in front, and
    (decoder-only) the prompt at positions 0..m-1 and the tokens' positions shifted by m."""
    m = adapter.num_virtual_tokens
    embeds = reference_embeds(adapter, base.get_input_embeddings(), ids, position_ids)
    if arch == "t5":
        return base(inputs_embeds=embeds, attention_mask=ones_front(mask, m), labels=labels)
    extra = {}
    if position_ids is not None:
        prompt_pos = torch.arange(m).expand(ids.shape[0], m)
        extra["position_ids"] = torch.cat([prompt_pos, position_ids + m], dim=1)
    return base(
        inputs_embeds=embeds,
        attention_mask=ones_front(mask, m),
        labels=ignore_front(ids, m),
        **extra,
    )


def grads(adapter):
    return {n: p.grad.clone() for n, p in adapter.named_parameters()}


def tol(dtype: torch.dtype) -> dict[str, float]:
    """`atol` and `rtol` for a whole model's outputs in `dtype`."""
    return MODEL_TOLERANCES[dtype]


# The models here live on the CPU: the backends that take CPU tensors.
BACKENDS = [
    b
    for b in dk.available_backends()
    if b in ("torch", "cpu") or (b == "triton" and dk.backends.triton_interpreting())
]


def formula_embeds(arch, base, row_adapters, ids, mask):
    """Row b: [P; E[ids] + delta] of row b's adapter. Decoder-only models give left-padded
    tokens their rank among real tokens as position, which picks the low-rank row."""
    embedding = base.get_input_embeddings()
    rows = None
    if arch != "t5" and mask is not None:
        rows = (mask.cumsum(-1) - 1).clamp(min=0)
    out = []
    for b, adapter in enumerate(row_adapters):
        pos = None if rows is None else rows[b : b + 1]
        out.append(reference_embeds(adapter, embedding, ids[b : b + 1], pos))
    return torch.cat(out)


def reference_generate(arch, base, row_adapters, ids, mask, **kwargs):
    """`generate` of the unpatched model fed each row's formula embeds and the mask with m
    ones in front."""
    m = row_adapters[0].num_virtual_tokens
    embeds = formula_embeds(arch, base, row_adapters, ids, mask)
    ext = None if mask is None else ones_front(mask, m)
    return base.generate(inputs_embeds=embeds, attention_mask=ext, **kwargs)
