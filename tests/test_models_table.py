"""The architecture table: decoder-only rows, the registry, and Mistral's sliding window.

Mistral's window counts columns, the prompt's m included: the patched model equals the
reference that feeds the prompt through `inputs_embeds` under the same window, tokens past
the window (over the layers) no longer depend on the prompt, and a padding trim does not cut
leading columns that would bring the prompt back within reach.
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from helpers.models import (
    PAD,
    VOCAB,
    make_config,
    ones_front,
    randomize,
    reference_embeds,
    tiny_config,
)

import dept_kernels as dk
from dept_kernels import models
from dept_kernels.models import _registry
from dept_kernels.models.decoders import DECODERS, Decoder

WINDOW = 4  # with 2 layers a token reaches 2 * (WINDOW - 1) = 6 columns back
M = 4  # DePT's prompt rows (make_config("dept"))
S = 12


def assert_matches_reference(base, model, ids):
    """The patched model's logits equal the unpatched one's on the formula's embeddings;
    returns them."""
    mask = torch.ones_like(ids)
    embeds = reference_embeds(model.dept_adapter, base.get_input_embeddings(), ids)
    want = base(inputs_embeds=embeds, attention_mask=ones_front(mask, M)).logits
    got = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    return got


def windowed(cls=transformers.MistralForCausalLM, trim_padding=None):
    """(unpatched tiny Mistral with a 4-column window, patched DePT copy)."""
    torch.manual_seed(0)
    config = tiny_config("mistral")
    config.sliding_window = WINDOW
    base = cls(config).eval()
    model = dk.patch(copy.deepcopy(base), make_config("dept"), trim_padding=trim_padding)
    randomize(model.dept_adapter)
    return base, model


def tokens(b: int = 2, s: int = S) -> torch.Tensor:
    return torch.randint(2, VOCAB, (b, s), generator=torch.Generator().manual_seed(0))


def test_window_spans_the_prompt_as_in_the_reference():
    base, model = windowed()
    ids = tokens()
    got = assert_matches_reference(base, model, ids)
    # Another prompt changes the first token, not the last, which lies out of its reach.
    with torch.no_grad():
        model.dept_adapter.prompt.add_(1.0)
    moved = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    assert not torch.allclose(moved[:, M], got[:, M])
    torch.testing.assert_close(moved[:, -1], got[:, -1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("head", ["cls", "lm"])
def test_trim_keeps_leading_padding_under_the_window(head):
    """Left padding: a leading cut would bring the prompt nearer the tokens."""
    cls = transformers.MistralForSequenceClassification if head == "cls" else None
    cls = cls or transformers.MistralForCausalLM
    # Trimming is on by default for the classification head, opt-in for the LM head.
    _, model = windowed(cls, trim_padding=True if head == "lm" else None)
    _, untrimmed = windowed(cls, trim_padding=False)
    # 8 columns: the last token reaches the prompt only if the 3 padding columns were cut.
    ids = tokens(s=8)
    mask = torch.ones_like(ids)
    ids[:, :3], mask[:, :3] = PAD, 0
    kwargs = {"input_ids": ids, "attention_mask": mask}
    if head == "lm":
        kwargs["labels"] = ids.masked_fill(mask == 0, -100)
    got, want = model(**kwargs), untrimmed(**kwargs)
    torch.testing.assert_close(got.logits, want.logits, atol=1e-5, rtol=1e-5)
    if head == "lm":
        torch.testing.assert_close(got.loss, want.loss, atol=1e-5, rtol=1e-5)


def test_generate_with_and_without_the_sliding_cache_agree():
    _, model = windowed()
    ids = tokens(s=6)
    kwargs = {"max_new_tokens": 8, "do_sample": False}
    cached = model.generate(input_ids=ids, use_cache=True, **kwargs)
    uncached = model.generate(input_ids=ids, use_cache=False, **kwargs)
    assert torch.equal(cached, uncached)


def test_every_row_serves_both_sites():
    for row in DECODERS:
        assert row.model_type in _registry.supported("input_embedding")
        assert row.model_type in _registry.supported("layer_input")
    base, _ = windowed()
    spec = models.describe(base, "layer_input")
    assert spec.model_type == "mistral" and spec.inner is base.model
    assert list(spec.layers) == list(base.model.layers)
    assert spec.embedding is base.get_input_embeddings() and spec.hidden_size == 32


def test_a_row_names_what_transformers_lacks_when_used():
    row = Decoder("fake", "Fake", {"FakeForCausalLM": "lm", "FakeModel": "base"}, "layers")
    base, _ = windowed()
    with pytest.raises(TypeError, match=r"Fake support needs transformers.FakeForCausalLM"):
        row.install(base, None)
    with pytest.raises(ValueError, match="one 'base'"):
        Decoder("fake", "Fake", {"FakeForCausalLM": "lm"}, "layers")
    with pytest.raises(ValueError, match="already registered"):
        _registry.register(_registry.Architecture("mistral", DECODERS[0].locate))


def test_a_new_decoder_is_one_row(monkeypatch):
    """Phi, registered as one row here, patches and matches the formula."""
    row = Decoder(
        "phi",
        "Phi",
        {"PhiForCausalLM": "lm", "PhiForSequenceClassification": "cls", "PhiModel": "base"},
        "layers",
    )
    arch = _registry.Architecture(row.model_type, row.locate, row.install)
    monkeypatch.setitem(_registry._ARCHITECTURES, "phi", arch)
    torch.manual_seed(0)
    config = transformers.PhiConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=64, pad_token_id=PAD,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_implementation="eager",
    )  # fmt: skip
    base = transformers.PhiForCausalLM(config).eval()
    model = dk.patch(copy.deepcopy(base), make_config("dept"))
    randomize(model.dept_adapter)
    ids = tokens()
    assert_matches_reference(base, model, ids)
