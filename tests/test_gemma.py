"""Gemma scales its input embeddings by sqrt(d) inside the model; a patched Gemma scales the
prompt, the tokens and the delta exactly as PEFT's prompt tuning does: the formula's rows
are built from the embedding module's output and passed as `inputs_embeds`.

Where the scale sits depends on the transformers release: 4.x multiplies `inputs_embeds`
in `GemmaModel.forward` (prompt, tokens and delta all scaled), 5.x multiplies the lookup in
the embedding module (`embed_scale`: the tokens' E[ids] only). The tests below write the
first layer's input out by hand for the release installed, and compare with PEFT.
"""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from helpers.models import (
    PAD,
    VOCAB,
    batch,
    grads,
    ignore_front,
    ones_front,
    patched_pair,
    tiny_model,
    tol,
)

import dept_kernels as dk

D = 32  # the tiny Gemma's hidden size
SCALE = D**0.5


def _scaled_lookup(model) -> bool:
    """Whether this release's Gemma scales in the embedding module (5.x) rather than in
    the model's forward (4.x)."""
    return hasattr(model.get_input_embeddings(), "embed_scale")


def _first_layer_input(model, **kwargs) -> torch.Tensor:
    """The hidden states entering Gemma's first decoder layer, (B, m + s, d)."""
    seen = []
    layer = model.model.layers[0]
    handle = layer.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    try:
        model(**kwargs)
    finally:
        handle.remove()
    return seen[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_first_layer_input_is_the_scaled_formula(dtype):
    """DePT: [P; E[ids] + delta] with sqrt(d) where this release's Gemma puts it."""
    base, model = patched_pair("gemma", "dept", dtype=dtype)
    adapter = model.dept_adapter
    ids, mask, _ = batch()
    got = _first_layer_input(model, input_ids=ids, attention_mask=mask)
    weight = base.get_input_embeddings().weight
    cfg = adapter.config
    low_rank = adapter.lora_a.float()[: ids.shape[1]] @ adapter.lora_b.float()
    delta = cfg.lora_alpha / cfg.r**0.5 * low_rank
    prompt = adapter.prompt.float().expand(len(ids), -1, -1)
    s = torch.tensor(SCALE, dtype=dtype)  # both releases cast sqrt(d) to the model's dtype
    if _scaled_lookup(base):
        tokens = (weight[ids] * s).float() + delta
        want = torch.cat([prompt, tokens], 1).to(dtype)
    else:
        want = torch.cat([prompt, weight.float()[ids] + delta], 1).to(dtype) * s
    torch.testing.assert_close(got, want, **tol(dtype))
    if dtype == torch.float32:
        # The tokens' rows differ from the prompt's by the scale: sqrt(d) is not applied twice
        # nor skipped.
        plain = torch.cat([prompt, weight[ids] + delta], 1)
        assert not torch.allclose(got, plain, atol=1e-3)


def _peft_gemma(m: int = 5):
    base = tiny_model("gemma")
    config = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=m)
    model = peft.get_peft_model(base, config)
    prompt = model.prompt_encoder["default"].embedding.weight
    with torch.no_grad():
        prompt.copy_(0.5 * torch.randn(prompt.shape, generator=torch.Generator().manual_seed(3)))
    return model


def test_prompt_tuning_equals_peft_on_gemma():
    """A model patched with PromptTuningConfig holding PEFT's prompt gives PEFT's logits,
    loss and prompt gradient."""
    theirs = _peft_gemma()
    prompt = theirs.prompt_encoder["default"].embedding.weight
    ours = dk.patch(tiny_model("gemma"), dk.PromptTuningConfig(num_virtual_tokens=5))
    with torch.no_grad():
        ours.dept_adapter.prompt.copy_(prompt)
    ids, mask, _ = batch()
    mask[0, -2:] = 0
    want = theirs(input_ids=ids, attention_mask=mask, labels=ids)
    want.loss.backward()
    got = ours(input_ids=ids, attention_mask=mask, labels=ids)
    got.loss.backward()
    torch.testing.assert_close(got.logits, want.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.loss, want.loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.dept_adapter.prompt.grad, prompt.grad, atol=1e-5, rtol=1e-5)


def test_dept_on_gemma_equals_the_formula_with_gradients():
    """DePT with left padding: the unpatched Gemma fed [P; module(ids) + delta] (rows by each
    token's rank among real tokens), forward and the adapter's gradients."""
    base, model = patched_pair("gemma", "dept")
    adapter = model.dept_adapter
    ids, mask, _ = batch()
    ids[1, :2], mask[1, :2] = PAD, 0
    rows = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=rows, labels=ids)
    out.loss.backward()
    got = grads(adapter)
    adapter.zero_grad()
    m = adapter.num_virtual_tokens
    cfg = adapter.config
    tokens = base.get_input_embeddings()(ids) + cfg.lora_alpha / cfg.r**0.5 * (
        adapter.lora_a[rows] @ adapter.lora_b
    )
    embeds = torch.cat([adapter.prompt.expand(len(ids), -1, -1), tokens], 1)
    positions = torch.cat([torch.arange(m).expand(len(ids), m), rows + m], 1)
    ref = base(
        inputs_embeds=embeds,
        attention_mask=ones_front(mask, m),
        position_ids=positions,
        labels=ignore_front(ids, m),
    )
    ref.loss.backward()
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=1e-5)
    for name, grad in grads(adapter).items():
        torch.testing.assert_close(got[name], grad, atol=1e-5, rtol=1e-5)


def test_token_indexed_delta_on_gemma():
    """DePT with index="token" (the delta's rows are token ids) on the same rows."""
    torch.manual_seed(0)
    base = tiny_model("gemma")
    config = dk.DePTConfig(num_virtual_tokens=4, r=3, lora_alpha=8, index="token")
    model = dk.patch(copy.deepcopy(base), config)
    adapter = model.dept_adapter
    with torch.no_grad():
        for p in adapter.parameters():
            p.normal_(0, 0.5)
    ids = torch.randint(2, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))
    tokens = base.get_input_embeddings()(ids) + 8 / 3**0.5 * (adapter.lora_a[ids] @ adapter.lora_b)
    embeds = torch.cat([adapter.prompt.expand(2, -1, -1), tokens], 1)
    want = base(inputs_embeds=embeds).logits
    got = model(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_out_of_range_ids_on_gemma():
    """The ids are checked before the lookup, whichever release scales where."""
    _, model = patched_pair("gemma", "dept")
    ids = torch.full((2, 5), VOCAB)
    with pytest.raises(IndexError, match=rf"input_ids holds id {VOCAB}, out of range"):
        model(input_ids=ids)
