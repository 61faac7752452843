"""DePT on top of a PEFT LoRA model (a combination users try): patching the base model
inside the LoRA wrapper freezes the base weights only; LoRA's factors keep their
requires_grad, train, and the sum equals the LoRA model fed the formula's inputs_embeds."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from helpers.models import batch, make_config, ones_front, randomize, reference_embeds, tiny_model

import dept_kernels as dk


def lora_model(arch: str):
    targets = {"gpt2": ["c_attn"], "llama": ["q_proj", "v_proj"], "t5": ["q", "v"]}[arch]
    model = peft.get_peft_model(tiny_model(arch), peft.LoraConfig(target_modules=targets, r=2))
    with torch.no_grad():  # LoRA's B starts at zero: make its contribution visible
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5, generator=torch.Generator().manual_seed(len(name)))
    return model


@pytest.mark.parametrize("arch", ["gpt2", "llama", "t5"])
def test_dept_on_a_lora_model_keeps_lora_trainable(arch):
    model = lora_model(arch)
    reference = copy.deepcopy(model)
    lora = {n for n, p in model.named_parameters() if p.requires_grad}
    assert lora and all("lora_" in n for n in lora)
    inner = model.get_base_model()
    dk.patch(inner, make_config("dept"))
    randomize(inner.dept_adapter)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == lora | {
        f"base_model.model.dept_adapter.{n}" for n in ("prompt", "lora_a", "lora_b")
    }

    ids, mask, labels = batch()
    mask[0, -2:] = 0
    m = inner.dept_adapter.num_virtual_tokens
    embeds = reference_embeds(inner.dept_adapter, inner.get_input_embeddings().weight, ids)
    kwargs = {"labels": labels} if arch == "t5" else {}
    got = model(input_ids=ids, attention_mask=mask, **kwargs).logits
    base = reference.get_base_model()
    want = base(inputs_embeds=embeds.detach(), attention_mask=ones_front(mask, m), **kwargs).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    got.sum().backward()
    for name, p in model.named_parameters():
        if name in trainable:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    dk.unpatch(inner)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == lora
