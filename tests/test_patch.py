"""patch / unpatch on small random-weight T5, GPT-2 and LLaMA models.

The reference (helpers.models) builds `inputs_embeds` from the formulas in docs/design.md §1
with plain torch ops on the adapter's own parameters and runs an unpatched copy of the model
with the mask, labels and positions shifted by hand.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from helpers.models import (
    ARCHS,
    BACKENDS,
    CLS_CLASSES,
    DECODERS,
    EOS,
    METHODS,
    PAD,
    VOCAB,
    batch,
    grads,
    make_config,
    ones_front,
    patched_pair,
    reference_embeds,
    reference_forward,
    tiny_config,
    tiny_model,
    tol,
)
from transformers import T5EncoderModel

import dept_kernels as dk

# The triton interpreter is slow: fp32 DePT only.
CASES = [
    pytest.param(arch, method, dtype, backend, id=f"{arch}-{method}-{str(dtype)[6:]}-{backend}")
    for arch in ARCHS
    for method in METHODS
    for dtype in (torch.float32, torch.bfloat16)
    for backend in BACKENDS
    if backend != "triton" or (method == "dept" and dtype == torch.float32)
]


def padded_batch(arch: str):
    """A batch with padding: right padding for T5 (an encoder input), left padding with each
    token's rank among the real tokens as `position_ids` for the decoder-only models."""
    ids, mask, labels = batch()
    if arch == "t5":
        ids[0, -3:], mask[0, -3:] = PAD, 0
        return ids, mask, labels, None
    ids[1, :2], mask[1, :2] = PAD, 0
    return ids, mask, labels, (mask.cumsum(-1) - 1).clamp(min=0)


@pytest.mark.parametrize(("arch", "method", "dtype", "backend"), CASES)
def test_matches_reference(arch, method, dtype, backend):
    base, model = patched_pair(arch, method, dtype=dtype)
    adapter = model.dept_adapter
    ids, mask, labels, positions = padded_batch(arch)
    extra = {} if positions is None else {"position_ids": positions}
    with dk.use_backend(backend):
        out = model(
            input_ids=ids, attention_mask=mask, labels=labels if arch == "t5" else ids, **extra
        )
        out.loss.backward()
    got = grads(adapter)
    adapter.zero_grad()
    ref = reference_forward(arch, base, adapter, ids, mask, labels, positions)
    ref.loss.backward()
    want = grads(adapter)
    m = adapter.num_virtual_tokens
    expected_len = labels.shape[1] if arch == "t5" else m + ids.shape[1]
    assert out.logits.shape[1] == expected_len
    torch.testing.assert_close(out.logits, ref.logits, **tol(dtype))
    torch.testing.assert_close(out.loss, ref.loss, **tol(dtype))
    assert set(got) == set(want)
    for name in want:
        assert want[name].abs().sum() > 0, name
        torch.testing.assert_close(got[name], want[name], **tol(dtype), msg=name)


def test_base_weights_frozen_and_adapter_trainable():
    _, model = patched_pair("llama", "dept")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"dept_adapter.prompt", "dept_adapter.lora_a", "dept_adapter.lora_b"}
    adapter = model.dept_adapter
    d = model.config.hidden_size
    assert adapter.prompt.shape == (4, d)
    assert adapter.lora_a.shape == (16, 3)
    assert adapter.lora_b.shape == (3, d)


@pytest.mark.parametrize("arch", ARCHS)
def test_sequence_classification_heads(arch):
    base, model = patched_pair(arch, "dept", cls=CLS_CLASSES[arch])
    adapter = model.dept_adapter
    m = adapter.num_virtual_tokens
    ids, mask, _ = batch(s=8)
    if arch == "t5":
        ids[:, -1] = EOS  # T5 pools the decoder state at the last <eos>
    else:
        ids[0, 5:], mask[0, 5:] = PAD, 0  # right padding: the head pools token 4 of row 0
    labels = torch.tensor([0, 1, 0])
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    embeds = reference_embeds(adapter, base.get_input_embeddings(), ids)
    ext = ones_front(mask, m)
    if arch == "t5":
        enc = base.transformer.encoder(inputs_embeds=embeds, attention_mask=ext)
        ref = base(input_ids=ids, attention_mask=ext, encoder_outputs=enc).logits
    else:
        inner = base.transformer if arch == "gpt2" else base.model
        hidden = inner(inputs_embeds=embeds, attention_mask=ext).last_hidden_state[:, m:]
        last = (mask * torch.arange(ids.shape[1])).argmax(-1)
        ref = base.score(hidden)[torch.arange(3), last]
    torch.testing.assert_close(out.logits, ref, atol=1e-5, rtol=1e-5)
    out.loss.backward()
    assert adapter.lora_b.grad.abs().sum() > 0


def test_t5_encoder_model():
    base, model = patched_pair("t5", "dept", cls=T5EncoderModel)
    adapter = model.dept_adapter
    ids, mask, _ = batch()
    out = model(input_ids=ids, attention_mask=mask).last_hidden_state
    embeds = reference_embeds(adapter, base.get_input_embeddings(), ids)
    ref = base(inputs_embeds=embeds, attention_mask=ones_front(mask, 4)).last_hidden_state
    assert out.shape == (3, 4 + ids.shape[1], 32)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="needs input_ids"):
        model(inputs_embeds=embeds[:, 4:], attention_mask=mask)


def test_t5_right_padding_longest_equals_max_length():
    """Padding to the batch's longest sequence matches the official padding to max_length."""
    _, model = patched_pair("t5", "dept", max_length=16)
    lengths = [9, 5, 7]
    ids = torch.full((3, 16), PAD)
    mask = torch.zeros(3, 16, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(2, VOCAB, (n,), generator=torch.Generator().manual_seed(i))
        mask[i, :n] = 1
    encoder = model.get_encoder()
    full = encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    short = encoder(input_ids=ids[:, :9], attention_mask=mask[:, :9]).last_hidden_state
    m = model.dept_adapter.num_virtual_tokens
    for i, n in enumerate(lengths):
        torch.testing.assert_close(short[i, : m + n], full[i, : m + n], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", DECODERS)
def test_left_padding_through_position_ids(arch):
    """A left-padded row with position_ids = rank among real tokens equals the row alone."""
    _, model = patched_pair(arch, "dept")
    m = model.dept_adapter.num_virtual_tokens
    ids, mask, _ = batch(s=8)
    ids[1, :3], mask[1, :3] = PAD, 0
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    padded = model(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits
    alone = model(input_ids=ids[1:2, 3:]).logits
    torch.testing.assert_close(padded[1, m + 3 :], alone[0, m:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(padded[1, :m], alone[0, :m], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_unpatch_restores_model(arch):
    model = tiny_model(arch)
    model.lm_head.weight.requires_grad_(True)
    list(model.parameters())[-1].requires_grad_(False)
    flags = [p.requires_grad for p in model.parameters()]
    modules = list(model.modules())
    ids, mask, labels = batch()
    kwargs = {"labels": labels} if arch == "t5" else {}
    before = model(input_ids=ids, attention_mask=mask, **kwargs).logits
    dk.patch(model, make_config("dept"))
    assert not any(p.requires_grad for n, p in model.named_parameters() if "dept" not in n)
    assert dk.unpatch(model) is model
    assert list(model.modules()) == modules
    assert not hasattr(model, "dept_adapter")
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(not mod._forward_pre_hooks and not mod._forward_hooks for mod in modules)
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask, **kwargs).logits, before)


def test_ept_merge_gives_same_outputs():
    _, model = patched_pair("gpt2", "ept")
    ids, mask, _ = batch()
    before = model(input_ids=ids, attention_mask=mask).logits
    merged = dk.merge(model).dept_adapter
    assert isinstance(merged, dk.methods.PromptTuningAdapter)
    assert merged.prompt.shape == (3, 32)
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, before)
    assert dk.merge(model).dept_adapter is merged  # prompt tuning is its own inference form


def test_ept_prompt_is_a_stride0_broadcast():
    _, model = patched_pair("gpt2", "ept")
    prompt = model.dept_adapter.op_args()["prompt"]
    assert prompt.shape == (3, 32) and prompt.stride(0) == 0


def test_param_groups_for_adamw():
    _, model = patched_pair("t5", "dept")
    groups = dk.param_groups(model, prompt_lr=0.3, lowrank_lr=1e-4, weight_decay=0.01)
    adapter = model.dept_adapter
    assert [g["lr"] for g in groups] == [0.3, 1e-4]
    assert groups[0]["params"] == [adapter.prompt]
    assert groups[1]["params"] == [adapter.lora_a, adapter.lora_b]
    assert all(g["weight_decay"] == 0.01 for g in groups)
    opt = torch.optim.AdamW(groups)
    ids, mask, labels = batch()
    before = {n: p.detach().clone() for n, p in adapter.named_parameters()}
    model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    opt.step()
    for name, p in adapter.named_parameters():
        assert not torch.equal(p, before[name]), name
    ept = dk.param_groups(patched_pair("gpt2", "ept")[1], 0.3, 1e-3)
    assert [len(g["params"]) for g in ept] == [1, 2]
    assert len(dk.param_groups(patched_pair("gpt2", "pt")[1], 0.3, 1e-3)) == 1


def test_errors_are_clear():
    model = tiny_model("gpt2")
    with pytest.raises(TypeError, match="config must be one of"):
        dk.patch(model, {"num_virtual_tokens": 4})
    dk.patch(model, make_config("dept", max_length=8))
    with pytest.raises(ValueError, match="already patched"):
        dk.patch(model, make_config("pt"))
    with pytest.raises(ValueError, match="max_length"):
        model(input_ids=torch.randint(2, VOCAB, (1, 9)))
    with pytest.raises(ValueError, match="needs input_ids"):
        model(inputs_embeds=torch.randn(1, 3, 32))
    with pytest.raises(ValueError, match="attention_mask"):
        model(input_ids=torch.randint(2, VOCAB, (1, 3)), attention_mask=torch.ones(1, 1, 3, 3))
    dk.unpatch(model)
    with pytest.raises(ValueError, match="not patched"):
        dk.unpatch(model)
    with pytest.raises(TypeError, match="unsupported model"):
        dk.patch(torch.nn.Linear(2, 2), make_config("pt"))
    distil = transformers.DistilBertModel(
        transformers.DistilBertConfig(
            vocab_size=VOCAB, dim=32, n_layers=1, n_heads=2, hidden_dim=32
        )
    )  # fmt: skip
    with pytest.raises(TypeError, match="model_type='distilbert'"):
        dk.patch(distil, make_config("pt"))
    with pytest.raises(TypeError, match="LlamaForCausalLM"):
        dk.patch(transformers.LlamaForTokenClassification(tiny_config("llama")), make_config("pt"))
    with pytest.raises(TypeError, match="needs a config"):
        dk.patch(tiny_model("gpt2"))
    # A failed patch leaves the model untouched.
    assert not hasattr(distil, "dept_adapter")
    assert all(p.requires_grad for p in distil.parameters())


# --------------------------------------------------------------------------- generate()


def reference_generate(arch, base, adapter, ids, mask, **kwargs):
    """Generation from the formula's inputs_embeds on the unpatched model."""
    m = adapter.num_virtual_tokens
    embeds = reference_embeds(adapter, base.get_input_embeddings(), ids, None)
    if arch != "t5":
        # HF gives left-padded tokens position = rank among real tokens; DePT rows follow it.
        rows = (mask.cumsum(-1) - 1).clamp(min=0)
        embeds = reference_embeds(adapter, base.get_input_embeddings(), ids, rows)
    return base.generate(inputs_embeds=embeds, attention_mask=ones_front(mask, m), **kwargs)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("num_beams", [1, 3])
def test_generate_matches_reference(arch, num_beams):
    base, model = patched_pair(arch, "dept")
    ids, mask, _ = batch(s=7)
    if arch != "t5":
        ids[0, :2], mask[0, :2] = PAD, 0  # decoder-only generation pads on the left
    kwargs = {"max_new_tokens": 6, "do_sample": False, "num_beams": num_beams, "use_cache": True}
    got = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    want = reference_generate(arch, base, model.dept_adapter, ids, mask, **kwargs)
    if arch != "t5":
        assert torch.equal(got[:, : ids.shape[1]], ids)
        got = got[:, ids.shape[1] :]
    assert torch.equal(got, want)
    assert len(set(got.flatten().tolist())) > 1  # a degenerate constant output proves little


def test_t5_question_answering_head():
    """T5ForQuestionAnswering makes its decoder input from input_ids (shifted right), which
    the patched forward must still see: spans equal the unpatched head on the formula's
    encoder states."""
    from transformers import T5ForQuestionAnswering

    base, model = patched_pair("t5", "dept", cls=T5ForQuestionAnswering)
    ids, mask, _ = batch()
    mask[0, -3:] = 0
    out = model(input_ids=ids, attention_mask=mask)
    embeds = reference_embeds(model.dept_adapter, base.get_input_embeddings(), ids)
    ext = ones_front(mask, model.dept_adapter.num_virtual_tokens)
    enc = base.encoder(inputs_embeds=embeds, attention_mask=ext)
    ref = base(input_ids=ids, attention_mask=ext, encoder_outputs=enc)
    assert out.start_logits.shape == ids.shape
    torch.testing.assert_close(out.start_logits, ref.start_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.end_logits, ref.end_logits, atol=1e-5, rtol=1e-5)
