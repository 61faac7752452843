"""patch / unpatch on small random-weight T5, GPT-2 and LLaMA models.

The reference builds `inputs_embeds` from the formulas in docs/design.md §1 with plain torch ops
on the adapter's own parameters and runs an unpatched copy of the model with the mask,
labels and positions shifted by hand. Helpers here are shared by the other test_patch* files.
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from transformers import (
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    MistralConfig,
    MistralForCausalLM,
    MistralForSequenceClassification,
    T5Config,
    T5EncoderModel,
    T5ForConditionalGeneration,
    T5ForSequenceClassification,
)

import dept_kernels as dk

transformers.logging.set_verbosity_error()

VOCAB = 128
PAD, EOS = 0, 1
ARCHS = ("t5", "gpt2", "llama", "mistral")
METHODS = ("dept", "pt", "ept")


def tiny_config(arch: str):
    if arch == "t5":
        return T5Config(
            vocab_size=VOCAB, d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=2,
            dropout_rate=0.0, decoder_start_token_id=PAD, pad_token_id=PAD, eos_token_id=EOS,
            attn_implementation="eager",
        )  # fmt: skip
    if arch == "gpt2":
        return GPT2Config(
            vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0,
            embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=PAD, bos_token_id=EOS,
            eos_token_id=EOS, attn_implementation="eager", initializer_range=0.2,
        )  # fmt: skip
    if arch == "mistral":  # the window spans every test's batch; test_models_table narrows it
        return MistralConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            sliding_window=64, pad_token_id=PAD, bos_token_id=EOS, eos_token_id=EOS,
            attn_implementation="eager", initializer_range=0.2,
        )  # fmt: skip
    return LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        pad_token_id=PAD, bos_token_id=EOS, eos_token_id=EOS, attn_implementation="eager",
        initializer_range=0.2,
    )  # fmt: skip


LM_CLASSES = {
    "t5": T5ForConditionalGeneration,
    "gpt2": GPT2LMHeadModel,
    "llama": LlamaForCausalLM,
    "mistral": MistralForCausalLM,
}
CLS_CLASSES = {
    "t5": T5ForSequenceClassification,
    "gpt2": GPT2ForSequenceClassification,
    "llama": LlamaForSequenceClassification,
    "mistral": MistralForSequenceClassification,
}


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


def reference_embeds(adapter, weight, ids, position_ids=None):
    """inputs_embeds (B, m + s, d) from the formulas, fp32 math, cast to the table dtype."""
    batch, seq = ids.shape
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
    weight = base.get_input_embeddings().weight
    embeds = reference_embeds(adapter, weight, ids, position_ids)
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


def tol(dtype):
    return {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 3e-2, "rtol": 3e-2}


# The models here live on the CPU: the backends that take CPU tensors.
BACKENDS = [
    b
    for b in dk.available_backends()
    if b in ("torch", "cpu") or (b == "triton" and dk.backends.triton_interpreting())
]
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
    embeds = reference_embeds(adapter, base.get_input_embeddings().weight, ids)
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
    embeds = reference_embeds(adapter, base.get_input_embeddings().weight, ids)
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


@pytest.mark.parametrize("arch", ["gpt2", "llama", "mistral"])
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


def test_ept_fold_gives_same_outputs():
    _, model = patched_pair("gpt2", "ept")
    ids, mask, _ = batch()
    before = model(input_ids=ids, attention_mask=mask).logits
    folded = dk.fold(model).dept_adapter
    assert isinstance(folded, dk.methods.PromptTuningAdapter)
    assert folded.prompt.shape == (3, 32)
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, before)
    with pytest.raises(TypeError, match="nothing to fold"):
        dk.fold(model)


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
    bert = transformers.BertModel(
        transformers.BertConfig(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
            intermediate_size=32,
        )
    )  # fmt: skip
    with pytest.raises(TypeError, match="model_type='bert'"):
        dk.patch(bert, make_config("pt"))
    with pytest.raises(TypeError, match="LlamaForCausalLM"):
        dk.patch(transformers.LlamaForTokenClassification(tiny_config("llama")), make_config("pt"))
    with pytest.raises(TypeError, match="needs a config"):
        dk.patch(tiny_model("gpt2"))
    # A failed patch leaves the model untouched.
    assert not hasattr(bert, "dept_adapter")
    assert all(p.requires_grad for p in bert.parameters())


# --------------------------------------------------------------------------- generate()


def reference_generate(arch, base, adapter, ids, mask, **kwargs):
    """Generation from the formula's inputs_embeds on the unpatched model."""
    m = adapter.num_virtual_tokens
    embeds = reference_embeds(adapter, base.get_input_embeddings().weight, ids, None)
    if arch != "t5":
        # HF gives left-padded tokens position = rank among real tokens; DePT rows follow it.
        rows = (mask.cumsum(-1) - 1).clamp(min=0)
        embeds = reference_embeds(adapter, base.get_input_embeddings().weight, ids, rows)
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
    embeds = reference_embeds(model.dept_adapter, base.get_input_embeddings().weight, ids)
    ext = ones_front(mask, model.dept_adapter.num_virtual_tokens)
    enc = base.encoder(inputs_embeds=embeds, attention_mask=ext)
    ref = base(input_ids=ids, attention_mask=ext, encoder_outputs=enc)
    assert out.start_logits.shape == ids.shape
    torch.testing.assert_close(out.start_logits, ref.start_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.end_logits, ref.end_logits, atol=1e-5, rtol=1e-5)
