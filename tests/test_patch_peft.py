"""patch(peft_model) with no config: PEFT prompt tuning and the official DePT (PEFT fork)."""

from __future__ import annotations

import copy
import inspect

import peft
import pytest
import torch
from helpers.models import DECODERS, PAD, batch, tiny_model
from helpers.peft_models import OfficialDePTStandIn, peft_prompt_tuning

import dept_kernels as dk


def _call(arch, model, ids, mask, labels):
    kwargs = {"labels": labels if arch == "t5" else ids}
    return model(input_ids=ids, attention_mask=mask, **kwargs)


PEFT_CASES = [*[(arch, 1) for arch in DECODERS], ("t5", 1), ("t5", None)]
PEFT_IDS = [*DECODERS, "t5-1-submodule", "t5-peft-default"]


@pytest.mark.parametrize(("arch", "submodules"), PEFT_CASES, ids=PEFT_IDS)
def test_peft_prompt_tuning_same_logits_grads_and_parameters(arch, submodules):
    model = peft_prompt_tuning(arch, submodules)
    reference = copy.deepcopy(model)
    ids, mask, labels = batch()
    mask[0, -2:] = 0
    want = _call(arch, reference, ids, mask, labels)
    want.loss.backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert dk.patch(model) is model
    assert [p for p in model.parameters() if p.requires_grad] == trainable
    prompt = model.prompt_encoder["default"].embedding.weight
    assert dk.adapter(model).prompt is prompt
    got = _call(arch, model, ids, mask, labels)
    torch.testing.assert_close(got.logits, want.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.loss, want.loss, atol=1e-5, rtol=1e-5)
    got.loss.backward()
    # PEFT's own gradient, rows PEFT does not feed (a second submodule's) included: zeros.
    theirs = reference.prompt_encoder["default"].embedding.weight.grad
    torch.testing.assert_close(prompt.grad, theirs, atol=1e-5, rtol=1e-5)
    assert prompt.grad[:6].abs().sum() > 0
    # The user's optimizer, built on PEFT's parameter, still trains it through the fused path.
    opt = torch.optim.SGD([prompt], lr=1.0)
    before = prompt.detach().clone()
    opt.step()
    assert not torch.equal(prompt, before)
    dk.unpatch(model)
    assert "forward" not in model.__dict__
    assert not hasattr(model.base_model, "dept_adapter")
    # Unpatched again, it is PEFT's own model: the same as the untouched copy.
    with torch.no_grad():
        reference.prompt_encoder["default"].embedding.weight.copy_(prompt)
    torch.testing.assert_close(
        _call(arch, model, ids, mask, labels).logits,
        _call(arch, reference, ids, mask, labels).logits,
    )


def _peft_rereads_prompt_with_cache() -> bool:
    """PEFT (<= 0.21.2) looks for the KV cache under `past_key_values`; where the forward
    names it `cache` (transformers >= 5.24), its generate re-inserts the prompt at every
    decoding step, so its tokens leave the formula after the first one."""
    from transformers import GPT2LMHeadModel

    return "cache" in inspect.signature(GPT2LMHeadModel.forward).parameters


def formula_generate(arch, peft_model, ids, mask, **kwargs):
    """The unpatched base model fed PEFT's inputs: [P[:m]; E[ids]] and the extended mask;
    E[ids] as the embedding module gives it (Gemma's scales its lookup in transformers 5)."""
    base = peft_model.get_base_model()
    prompt = peft_model.prompt_encoder["default"].embedding.weight.detach()[:6]
    with torch.no_grad():
        tokens = base.get_input_embeddings()(ids)
    embeds = torch.cat([prompt.expand(len(ids), -1, -1), tokens], 1)
    ext = torch.cat([torch.ones(len(ids), 6, dtype=mask.dtype), mask], 1)
    out = base.generate(inputs_embeds=embeds, attention_mask=ext, **kwargs)
    return out if arch == "t5" else torch.cat([ids, out], 1)


@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no_cache"])
@pytest.mark.parametrize(("arch", "submodules"), PEFT_CASES, ids=PEFT_IDS)
def test_peft_prompt_tuning_generate(arch, submodules, use_cache):
    model = peft_prompt_tuning(arch, submodules)
    ids, mask, _ = batch(s=6)
    kwargs = {"max_new_tokens": 5, "do_sample": False, "use_cache": use_cache}
    theirs = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    formula = formula_generate(arch, model, ids, mask, **kwargs)
    dk.patch(model)
    got = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    assert torch.equal(got, formula)
    assert len(set(got[:, -5:].flatten().tolist())) > 1
    if arch != "t5" and use_cache and _peft_rereads_prompt_with_cache():
        assert not torch.equal(theirs, formula)  # PEFT's bug; when fixed, compare with it
    else:
        assert torch.equal(got, theirs)


def test_peft_rejects_other_methods_and_decoder_side_prompts():
    lora = peft.get_peft_model(tiny_model("gpt2"), peft.LoraConfig(target_modules=["c_attn"], r=2))
    with pytest.raises(TypeError, match="PROMPT_TUNING"):
        dk.patch(lora)
    config = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    config.num_transformer_submodules = 2
    two = peft.get_peft_model(tiny_model("gpt2"), config)
    with pytest.raises(ValueError, match="num_transformer_submodules=2 is supported"):
        dk.patch(two)


# --------------------------------------------------------------------------- official DePT


@pytest.mark.parametrize("submodules", [1, 2])
def test_official_dept_model_accelerated(submodules):
    model = OfficialDePTStandIn(tiny_model("t5"), submodules=submodules)
    ids, mask, labels = batch(s=12)  # the official code pads every input to max_length
    ids[1, 8:], mask[1, 8:] = PAD, 0
    want = model(input_ids=ids, attention_mask=mask, labels=labels)
    params = {p: p.requires_grad for p in model.parameters()}
    reference = copy.deepcopy(model)
    dk.patch(model)
    adapter = dk.adapter(model)
    enc = model.prompt_encoder["default"]
    assert adapter.prompt is enc.embedding.weight
    assert adapter.lora_a is enc.lora_embedding_A and adapter.lora_b is enc.lora_embedding_B
    assert adapter.config.scaling == enc.scaling
    assert {p: p.requires_grad for p in model.parameters()} == params
    got = model(input_ids=ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(got.logits, want.logits, atol=1e-5, rtol=1e-5)
    got.loss.backward()
    reference(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    ref_enc = reference.prompt_encoder["default"]
    for name in ("embedding", "lora_embedding_A", "lora_embedding_B"):
        mine, theirs = getattr(enc, name), getattr(ref_enc, name)
        mine, theirs = getattr(mine, "weight", mine), getattr(theirs, "weight", theirs)
        torch.testing.assert_close(mine.grad, theirs.grad, atol=1e-5, rtol=1e-5, msg=name)
    # The fused path also takes batches shorter than max_length.
    short = model(input_ids=ids[:, :8], attention_mask=mask[:, :8], labels=labels)
    assert short.logits.shape == want.logits.shape


def test_official_dept_shape_checks():
    model = OfficialDePTStandIn(tiny_model("t5"))
    model.peft_config["default"].max_length = 10
    with pytest.raises(ValueError, match="lora_embedding_A has shape"):
        dk.patch(model)
    model.peft_config["default"].max_length = 12
    model.prompt_encoder["default"].scaling = 1.0
    with pytest.raises(ValueError, match="scaling"):
        dk.patch(model)
    assert not hasattr(model.base_model, "dept_adapter")
