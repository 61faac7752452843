"""Stand-ins for PEFT-made models: a PEFT prompt-tuning model with a known prompt, and the
attribute structure and forward of the official DePT fork's model (PROMPT_TUNING_LORA).
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import peft
import torch
from torch import nn

from .models import tiny_config, tiny_model


def peft_prompt_tuning(arch: str, submodules: int | None = 1):
    """A PEFT prompt-tuning model; `submodules=None` keeps PEFT's default (2 for T5)."""
    task = "SEQ_2_SEQ_LM" if arch == "t5" else "CAUSAL_LM"
    config = peft.PromptTuningConfig(task_type=task, num_virtual_tokens=6)
    if arch == "t5" and submodules is not None:
        config.num_transformer_submodules = submodules
    base = tiny_model(arch)
    if arch == "t5":
        # T5's default init makes a 2-layer model emit one token whatever its input (in
        # transformers 4.57); wider weights make generation depend on the prompt.
        wide = tiny_config("t5")
        wide.initializer_factor = 4.0
        torch.manual_seed(0)
        base = type(base)(wide).eval()
    model = peft.get_peft_model(base, config)
    prompt = model.prompt_encoder["default"].embedding.weight
    with torch.no_grad():
        # The same first m rows whatever the number of submodules; other rows differ.
        for k in range(prompt.shape[0] // 6):
            gen = torch.Generator().manual_seed(k)
            prompt[6 * k : 6 * (k + 1)] = 0.5 * torch.randn(6, prompt.shape[1], generator=gen)
    return model


class OfficialPromptEncoder(nn.Module):
    """The attribute structure of the fork's PromptEmbeddingLoRA."""

    def __init__(self, m, d, r, max_length, lora_alpha, submodules=1):
        super().__init__()
        self.embedding = nn.Embedding(m * submodules, d)
        self.lora_embedding_A = nn.Parameter(torch.randn(max_length, r))
        self.lora_embedding_B = nn.Parameter(torch.randn(r, d))
        self.scaling = lora_alpha / math.sqrt(r)


class OfficialDePTStandIn(nn.Module):
    """A minimal PeftModelForSeq2SeqLM of the fork with peft_type PROMPT_TUNING_LORA; its
    forward is the fork's: inputs padded to max_length, the whole A @ B added."""

    def __init__(self, base, m=5, r=4, max_length=12, lora_alpha=8, submodules=1):
        super().__init__()
        self.base_model = base
        d = base.config.d_model
        self.peft_config = {
            "default": SimpleNamespace(
                peft_type="PROMPT_TUNING_LORA", num_virtual_tokens=m, r=r,
                lora_alpha=lora_alpha, max_length=max_length, token_dim=d,
                num_transformer_submodules=submodules,
            )
        }  # fmt: skip
        self.active_adapter = "default"
        self.prompt_encoder = nn.ModuleDict(
            {"default": OfficialPromptEncoder(m, d, r, max_length, lora_alpha, submodules)}
        )
        for p in base.parameters():
            p.requires_grad_(False)

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        config = self.peft_config["default"]
        enc = self.prompt_encoder["default"]
        batch_size = input_ids.shape[0]
        inputs_embeds = self.base_model.get_input_embeddings()(input_ids)
        lora = (enc.lora_embedding_A @ enc.lora_embedding_B).repeat(batch_size, 1, 1)
        inputs_embeds = inputs_embeds + enc.scaling * lora
        prefix = torch.ones(batch_size, config.num_virtual_tokens)
        attention_mask = torch.cat([prefix, attention_mask], dim=1)
        # The fork feeds the first m rows (of m per submodule) to the encoder only.
        prompts = enc.embedding.weight[: config.num_virtual_tokens].repeat(batch_size, 1, 1)
        inputs_embeds = torch.cat([prompts, inputs_embeds], dim=1)
        return self.base_model(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels, **kwargs
        )
