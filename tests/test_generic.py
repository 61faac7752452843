"""The generic path: the prompt methods on OPT, BLOOM, Phi and BART, which have no table entry.

The reference is the unpatched model fed the formula's `inputs_embeds = [P; E[ids] + delta]`,
the mask with m ones in front and (causal LM) m leading -100 labels; the model numbers the
positions of that call itself (OPT from the mask, Phi from the columns, BLOOM's ALiBi from
the mask), as it does for the patched model's inner call. Sequence classification pools the
base model's states without the prompt rows at each row's last real token. BART (an
encoder-decoder) takes the prompt on its encoder input; its decoder reads the m + s encoder
states through the extended mask.
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from helpers.generic import (
    BART_EOS,
    DECODER_ARCHS,
    GENERIC_TABLE,
    generic_generate,
    generic_model,
    generic_pair,
)
from helpers.models import (
    PAD,
    VOCAB,
    batch,
    grads,
    ignore_front,
    make_config,
    ones_front,
    randomize,
    reference_embeds,
    tol,
)

import dept_kernels as dk
from dept_kernels.models import _registry

KINDS = ("lm", "cls", "base")
CLOSE = tol(torch.float32)


def left_padded(s: int = 9):
    """A batch whose row 1 has two leading padding columns, and class labels."""
    ids, mask, _ = batch(s=s)
    ids[1, :2], mask[1, :2] = PAD, 0
    return ids, mask, torch.tensor([0, 1, 1])


def reference(arch, kind, base, adapter, ids, mask, labels):
    """The unpatched model's (logits or states, loss) on the formula's inputs."""
    m = adapter.num_virtual_tokens
    embeds = reference_embeds(adapter, base.get_input_embeddings(), ids)
    ext = ones_front(mask, m)
    if kind == "lm":
        out = base(inputs_embeds=embeds, attention_mask=ext, labels=ignore_front(ids, m))
        return out.logits, out.loss
    if kind == "base":
        return base(inputs_embeds=embeds, attention_mask=ext).last_hidden_state, None
    inner = getattr(base, GENERIC_TABLE[arch].inner)
    hidden = inner(inputs_embeds=embeds, attention_mask=ext).last_hidden_state[:, m:]
    last = (ids != PAD).long().mul(torch.arange(ids.shape[1])).argmax(-1)
    logits = base.score(hidden)[torch.arange(len(ids)), last]
    return logits, torch.nn.functional.cross_entropy(logits.float(), labels)


def run(kind, model, ids, mask, labels):
    if kind == "lm":
        out = model(input_ids=ids, attention_mask=mask, labels=ids)
        return out.logits, out.loss
    if kind == "base":
        return model(input_ids=ids, attention_mask=mask).last_hidden_state, None
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    return out.logits, out.loss


def backward(adapter, output, loss):
    """Gradients of the loss, or (base model) of a fixed projection of the states."""
    adapter.zero_grad()
    if loss is None:
        weights = torch.linspace(-1, 1, output.shape[-1], dtype=output.dtype)
        loss = (output * weights).sum()
    loss.backward()
    return grads(adapter)


FORWARD_CASES = [
    *[(a, k, meth, torch.float32) for a in DECODER_ARCHS for k in KINDS for meth in ("dept", "pt")],
    *[(a, "lm", "dept", torch.bfloat16) for a in DECODER_ARCHS],
    ("phi", "lm", "ept", torch.float32),
    ("opt", "cls", "ept", torch.float32),
]  # fmt: skip


@pytest.mark.parametrize(("arch", "kind", "method", "dtype"), FORWARD_CASES)
def test_forward_and_gradients_match_the_formula(arch, kind, method, dtype):
    base, model = generic_pair(arch, kind, method, dtype)
    adapter = model.dept_adapter
    ids, mask, labels = left_padded()
    got_out, got_loss = run(kind, model, ids, mask, labels)
    got = backward(adapter, got_out, got_loss)
    want_out, want_loss = reference(arch, kind, base, adapter, ids, mask, labels)
    want = backward(adapter, want_out, want_loss)
    m = adapter.num_virtual_tokens
    assert got_out.shape == want_out.shape
    if kind != "cls":
        assert got_out.shape[1] == m + ids.shape[1]  # the prompt rows kept, as in PEFT
    torch.testing.assert_close(got_out, want_out, **tol(dtype))
    if got_loss is not None:
        torch.testing.assert_close(got_loss, want_loss.to(got_loss.dtype), **tol(dtype))
    assert set(got) == set(want)
    for name in want:
        assert want[name].abs().sum() > 0, name
        torch.testing.assert_close(got[name], want[name], **tol(dtype), msg=name)


@pytest.mark.parametrize("arch", DECODER_ARCHS)
def test_head_kinds_and_inner_modules(arch):
    """The entry finds the module holding the embedding, and each head's kind."""
    from dept_kernels.models import _generic

    for kind in KINDS:
        model = generic_model(arch, kind)
        inner, layers = _generic.locate(model)
        assert model.get_input_embeddings() in list(inner.children()) and layers == ()
        assert _generic.head(model) == kind
        assert _registry.lookup(model, "input_embedding").model_type == "generic"
    spec = dk.models.describe(generic_model(arch), "input_embedding")
    assert spec.embedding is spec.inner.get_input_embeddings()


@pytest.mark.parametrize("num_beams", [1, 2])
@pytest.mark.parametrize("arch", DECODER_ARCHS)
def test_generate_matches_the_reference(arch, num_beams):
    """Rows on the first step only, the mask and positions shifted on the later ones: the
    tokens equal the unpatched model's generate from the formula's embeds (left padding)."""
    base, model = generic_pair(arch)
    ids, mask, _ = left_padded(s=6)
    kwargs = {"max_new_tokens": 6, "do_sample": False, "num_beams": num_beams}
    out = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    assert torch.equal(out[:, : ids.shape[1]], ids)
    want = generic_generate(arch, base, [model.dept_adapter] * 3, ids, mask, **kwargs)
    assert torch.equal(out[:, ids.shape[1] :], want)
    assert len(set(want.flatten().tolist())) > 2  # a constant output proves little


@pytest.mark.parametrize("arch", DECODER_ARCHS)
def test_generate_without_the_cache_agrees(arch):
    """Without a cache every step re-runs the sequence: generated tokens take no delta."""
    _, model = generic_pair(arch)
    ids, mask, _ = left_padded(s=6)
    kwargs = {"max_new_tokens": 5, "do_sample": False}
    cached = model.generate(input_ids=ids, attention_mask=mask, use_cache=True, **kwargs)
    uncached = model.generate(input_ids=ids, attention_mask=mask, use_cache=False, **kwargs)
    assert torch.equal(cached, uncached)


def stacked(arch: str, kind: str = "lm", tasks: int = 2):
    """(the serving model of `tasks` DePT adapters, each task's own patched copy)."""
    base = generic_model(arch, kind)
    singles = []
    for t in range(tasks):
        single = dk.patch(copy.deepcopy(base), make_config("dept"))
        randomize(single.dept_adapter, seed=30 + t)
        singles.append(single)
    served = dk.stack_adapters([copy.deepcopy(s) for s in singles])
    return served, singles


TASK_IDS = torch.tensor([1, 0, 1])


@pytest.mark.parametrize(("arch", "kind"), [(a, k) for a in DECODER_ARCHS for k in ("lm", "cls")])
def test_stacked_tasks_equal_each_task_alone(arch, kind):
    served, singles = stacked(arch, kind)
    ids, mask, _ = left_padded()
    mixed = served(input_ids=ids, attention_mask=mask, task_ids=TASK_IDS).logits
    for t, single in enumerate(singles):
        rows = TASK_IDS.eq(t)
        alone = single(input_ids=ids[rows], attention_mask=mask[rows]).logits
        torch.testing.assert_close(mixed[rows], alone, **CLOSE)


@pytest.mark.parametrize("arch", DECODER_ARCHS)
def test_generate_with_task_ids(arch):
    served, singles = stacked(arch)
    ids, mask, _ = left_padded(s=6)
    kwargs = {"max_new_tokens": 5, "do_sample": False}
    mixed = served.generate(input_ids=ids, attention_mask=mask, task_ids=TASK_IDS, **kwargs)
    for t, single in enumerate(singles):
        rows = TASK_IDS.eq(t)
        alone = single.generate(input_ids=ids[rows], attention_mask=mask[rows], **kwargs)
        assert torch.equal(mixed[rows], alone)
    adapters = [singles[int(t)].dept_adapter for t in TASK_IDS]
    want = generic_generate(arch, generic_model(arch), adapters, ids, mask, **kwargs)
    assert torch.equal(mixed[:, ids.shape[1] :], want)
    with pytest.raises(ValueError, match="pass task_ids"):
        served.generate(input_ids=ids, attention_mask=mask, **kwargs)


@pytest.mark.parametrize(
    ("arch", "method"), [(a, "dept") for a in DECODER_ARCHS] + [("bloom", "ept")]
)
def test_save_and_load_round_trip(arch, method, tmp_path):
    _, model = generic_pair(arch, "lm", method)
    ids, mask, _ = left_padded()
    want = model(input_ids=ids, attention_mask=mask).logits
    dk.save_adapter(model, tmp_path)
    loaded = dk.load_adapter(generic_model(arch), tmp_path)
    torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask).logits, want)
    for name, p in model.dept_adapter.state_dict().items():
        assert torch.equal(loaded.dept_adapter.state_dict()[name], p), name


def test_unpatch_restores_the_model():
    base = generic_model("opt")
    model = dk.patch(copy.deepcopy(base), make_config("dept"))
    dk.unpatch(model)
    ids, mask, _ = left_padded()
    torch.testing.assert_close(
        model(input_ids=ids, attention_mask=mask).logits,
        base(input_ids=ids, attention_mask=mask).logits,
        **CLOSE,
    )


# --------------------------------------------------------------------------- errors


class _Config(transformers.PretrainedConfig):
    model_type = "dept-kernels-test-plain"

    def __init__(self, hidden_size: int = 8, **kwargs) -> None:
        self.hidden_size = hidden_size
        super().__init__(**kwargs)


class _IdsOnly(transformers.PreTrainedModel):
    """A model whose forward takes input_ids and attention_mask only."""

    config_class = _Config

    def __init__(self, config: _Config) -> None:
        super().__init__(config)
        self.embed = torch.nn.Embedding(VOCAB, config.hidden_size)

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids=None, attention_mask=None):
        return self.embed(input_ids)


class _NoEmbedding(_IdsOnly):
    def get_input_embeddings(self):
        raise NotImplementedError


class _Stem(torch.nn.Module):
    """Holds the embedding; its forward takes no attention_mask."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, d)

    def forward(self, input_ids=None, inputs_embeds=None):
        return self.embed(input_ids) if inputs_embeds is None else inputs_embeds


class _StemModel(transformers.PreTrainedModel):
    config_class = _Config

    def __init__(self, config: _Config) -> None:
        super().__init__(config)
        self.stem = _Stem(config.hidden_size)

    def get_input_embeddings(self):
        return self.stem.embed

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None):
        return self.stem(input_ids=input_ids, inputs_embeds=inputs_embeds)


VERSION = transformers.__version__.replace(".", r"\.")


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (_IdsOnly, r"_IdsOnly.forward takes no inputs_embeds argument"),
        (_NoEmbedding, r"no input-embedding module found"),
        (_StemModel, r"the module holding its input embedding: _Stem.forward takes no "
                     r"attention_mask argument"),
    ],
)  # fmt: skip
def test_a_model_lacking_what_the_path_needs_is_named(build, message):
    model = build(_Config())
    name = type(model).__name__
    with pytest.raises(
        TypeError,
        match=rf"unsupported model {name} \(model_type='dept-kernels-test-plain'\) under "
        rf"transformers {VERSION}: {message}",
    ):
        dk.patch(model, make_config("pt"))
    assert all(p.requires_grad for p in model.parameters())  # left untouched


class _NoEncoder(_IdsOnly):
    """An encoder-decoder by its config whose forward takes what the path needs, but which
    has no encoder to find."""

    def forward(
        self, input_ids=None, attention_mask=None, inputs_embeds=None, encoder_outputs=None
    ):
        return self.embed(input_ids)


def test_an_encoder_decoder_without_an_encoder_is_named():
    model = _NoEncoder(_Config(is_encoder_decoder=True))
    with pytest.raises(TypeError, match=r"unsupported model _NoEncoder .*get_encoder\(\) gives no"):
        dk.patch(model, make_config("dept"))


def test_aot_still_needs_a_table_entry():
    with pytest.raises(TypeError, match=r"model_type='opt'\) for AoT P-tuning; supported"):
        dk.patch(generic_model("opt"), dk.AoTConfig("fc", r=4))


def test_trim_padding_is_refused():
    model = generic_model("phi", "cls")
    with pytest.raises(ValueError, match=r"generic path.*does not trim padding"):
        dk.patch(model, make_config("dept"), trim_padding=True)
    assert not hasattr(model, "dept_adapter")


def test_opt_position_table_limit():
    model = dk.patch(generic_model("opt"), make_config("pt"))  # max_position_embeddings=64
    m = model.dept_adapter.num_virtual_tokens
    fits = torch.randint(2, VOCAB, (2, 64 - m))
    assert model(input_ids=fits).logits.shape[1] == 64
    with pytest.raises(
        ValueError,
        match=rf"prompt's {m} rows and {65 - m} tokens need 65 positions, but OPTDecoder's "
        r"position table \(config.max_position_embeddings\) has 64",
    ):
        model(input_ids=torch.randint(2, VOCAB, (2, 65 - m)))
    with pytest.raises(ValueError, match=r"after 64 cached, need 65 positions"):
        model.generate(input_ids=fits, max_new_tokens=2, do_sample=False)


@pytest.mark.parametrize("arch", DECODER_ARCHS)
def test_bad_inputs_are_refused_before_the_op(arch):
    _, model = generic_pair(arch)
    ids, mask, _ = left_padded()
    with pytest.raises(ValueError, match="needs input_ids"):
        model(inputs_embeds=torch.randn(3, 9, 32), attention_mask=mask)
    with pytest.raises(ValueError, match=r"attention_mask has shape \(3, 8\)"):
        model(input_ids=ids, attention_mask=mask[:, 1:])
    with pytest.raises(IndexError, match="out of range"):
        model(input_ids=torch.full((1, 3), VOCAB))
    with pytest.raises(ValueError, match="stack_adapters"):
        model(input_ids=ids, task_ids=torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="max_length"):
        model(input_ids=torch.randint(2, VOCAB, (1, 17)))  # DePT's L = 16


@pytest.mark.parametrize("arch", DECODER_ARCHS)
def test_a_peft_prompt_tuning_model_accelerates(arch):
    """`patch(peft_model)` with no config: PEFT's own forward (logits, loss, gradient); its
    generate follows the formula (PEFT's own drops generate's position ids, and misses the
    cache where the forward names it `cache`: tests/test_patch_peft.py)."""
    import peft

    config = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=6)
    model = peft.get_peft_model(generic_model(arch), config)
    prompt = model.prompt_encoder["default"].embedding.weight
    with torch.no_grad():
        prompt.copy_(0.5 * torch.randn(prompt.shape, generator=torch.Generator().manual_seed(3)))
    ids, mask, _ = left_padded(s=6)
    want = model(input_ids=ids, attention_mask=mask, labels=ids)
    want.loss.backward()
    theirs = prompt.grad.clone()
    prompt.grad = None
    dk.patch(model)
    assert dk.adapter(model).prompt is prompt
    got = model(input_ids=ids, attention_mask=mask, labels=ids)
    got.loss.backward()
    torch.testing.assert_close(got.logits, want.logits, **CLOSE)
    torch.testing.assert_close(got.loss, want.loss, **CLOSE)
    torch.testing.assert_close(prompt.grad, theirs, **CLOSE)
    kwargs = {"max_new_tokens": 5, "do_sample": False}
    tokens = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    adapters = [dk.adapter(model)] * 3
    want_tokens = generic_generate(arch, generic_model(arch), adapters, ids, mask, **kwargs)
    assert torch.equal(tokens[:, ids.shape[1] :], want_tokens)


# --------------------------------------------------------------------------- BART


def seq2seq_batch():
    """Row 1 right-padded (an encoder input pads on the right), one <eos> ending each row's
    tokens (BART's classification head pools there), decoder labels, class labels."""
    ids, mask, labels = batch()
    ids[ids == BART_EOS] = BART_EOS + 1
    ids[1, -3:], mask[1, -3:] = PAD, 0
    ids[0, -1], ids[1, -4], ids[2, -1] = BART_EOS, BART_EOS, BART_EOS
    return ids, mask, labels, torch.tensor([0, 1, 1])


def seq2seq_reference(kind, base, adapter, ids, mask, labels, classes):
    """The unpatched model on the formula's encoder input; (logits or states, loss)."""
    m = adapter.num_virtual_tokens
    embeds = reference_embeds(adapter, base.get_input_embeddings(), ids)
    ext = ones_front(mask, m)
    if kind == "lm":
        out = base(inputs_embeds=embeds, attention_mask=ext, labels=labels)
        return out.logits, out.loss
    inner = base if kind == "base" else base.model
    enc = inner.encoder(inputs_embeds=embeds, attention_mask=ext)
    if kind == "base":
        out = base(attention_mask=ext, encoder_outputs=enc, decoder_input_ids=labels)
        return out.last_hidden_state, None
    out = base(input_ids=ids, attention_mask=ext, encoder_outputs=enc, labels=classes)
    return out.logits, out.loss


def seq2seq_run(kind, model, ids, mask, labels, classes):
    if kind == "lm":
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        return out.logits, out.loss
    if kind == "base":
        out = model(input_ids=ids, attention_mask=mask, decoder_input_ids=labels)
        return out.last_hidden_state, None
    out = model(input_ids=ids, attention_mask=mask, labels=classes)
    return out.logits, out.loss


SEQ2SEQ_CASES = [
    *[(k, meth, torch.float32) for k in KINDS for meth in ("dept", "pt")],
    ("lm", "dept", torch.bfloat16),
    ("lm", "ept", torch.float32),
]


@pytest.mark.parametrize(("kind", "method", "dtype"), SEQ2SEQ_CASES)
def test_seq2seq_forward_and_gradients_match_the_formula(kind, method, dtype):
    base, model = generic_pair("bart", kind, method, dtype)
    adapter = model.dept_adapter
    ids, mask, labels, classes = seq2seq_batch()
    got_out, got_loss = seq2seq_run(kind, model, ids, mask, labels, classes)
    got = backward(adapter, got_out, got_loss)
    want_out, want_loss = seq2seq_reference(kind, base, adapter, ids, mask, labels, classes)
    want = backward(adapter, want_out, want_loss)
    plain, _ = seq2seq_run(kind, base, ids, mask, labels, classes)
    assert got_out.shape == plain.shape and not torch.allclose(got_out, plain)
    torch.testing.assert_close(got_out, want_out, **tol(dtype))
    if got_loss is not None:
        torch.testing.assert_close(got_loss, want_loss, **tol(dtype))
    assert set(got) == set(want)
    for name in want:
        assert want[name].abs().sum() > 0, name
        torch.testing.assert_close(got[name], want[name], **tol(dtype), msg=name)
    if kind == "base":  # the encoder states keep the prompt rows, as in PEFT
        out = model(input_ids=ids, attention_mask=mask, decoder_input_ids=labels)
        assert out.encoder_last_hidden_state.shape[1] == adapter.num_virtual_tokens + 9


@pytest.mark.parametrize("num_beams", [1, 2])
def test_seq2seq_generate_matches_the_reference(num_beams):
    base, model = generic_pair("bart")
    ids, mask, _, _ = seq2seq_batch()
    kwargs = {"max_new_tokens": 6, "do_sample": False, "num_beams": num_beams}
    out = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    want = generic_generate("bart", base, [model.dept_adapter] * 3, ids, mask, **kwargs)
    assert torch.equal(out, want)
    assert len(set(want[:, 1:].flatten().tolist())) > 2  # a constant output proves little
    no_cache = model.generate(input_ids=ids, attention_mask=mask, use_cache=False, **kwargs)
    assert torch.equal(no_cache, out)


@pytest.mark.parametrize("kind", ["lm", "cls"])
def test_seq2seq_stacked_tasks(kind):
    served, singles = stacked("bart", kind)
    ids, mask, labels, _ = seq2seq_batch()
    extra = {"labels": labels} if kind == "lm" else {}
    mixed = served(input_ids=ids, attention_mask=mask, task_ids=TASK_IDS, **extra).logits
    for t, single in enumerate(singles):
        rows = TASK_IDS.eq(t)
        alone = single(
            input_ids=ids[rows], attention_mask=mask[rows], **{k: v[rows] for k, v in extra.items()}
        ).logits
        torch.testing.assert_close(mixed[rows], alone, **CLOSE)
    if kind == "lm":
        kwargs = {"max_new_tokens": 5, "do_sample": False}
        out = served.generate(input_ids=ids, attention_mask=mask, task_ids=TASK_IDS, **kwargs)
        adapters = [singles[int(t)].dept_adapter for t in TASK_IDS]
        want = generic_generate("bart", generic_model("bart"), adapters, ids, mask, **kwargs)
        assert torch.equal(out, want)


def test_seq2seq_save_load_and_errors(tmp_path):
    _, model = generic_pair("bart")
    ids, mask, labels, _ = seq2seq_batch()
    want = model(input_ids=ids, attention_mask=mask, labels=labels).logits
    dk.save_adapter(model, tmp_path)
    loaded = dk.load_adapter(generic_model("bart"), tmp_path)
    torch.testing.assert_close(
        loaded(input_ids=ids, attention_mask=mask, labels=labels).logits, want
    )
    with pytest.raises(ValueError, match="needs input_ids"):
        model(inputs_embeds=torch.randn(3, 9, 32), attention_mask=mask, labels=labels)
    with pytest.raises(ValueError, match="BartEncoder needs input_ids"):
        model.get_encoder()(inputs_embeds=torch.randn(3, 9, 32))
    with pytest.raises(ValueError, match=r"attention_mask has shape \(3, 8\)"):
        model(input_ids=ids, attention_mask=mask[:, 1:], labels=labels)
    m = model.dept_adapter.num_virtual_tokens
    with pytest.raises(ValueError, match=r"need 65 positions, but BartEncoder's position table"):
        model(input_ids=torch.randint(3, VOCAB, (1, 65 - m)), labels=labels[:1])
    with pytest.raises(ValueError, match="trim_padding"):
        dk.patch(generic_model("bart"), make_config("pt"), trim_padding=True)


def test_an_encoder_with_an_embeddings_module_is_named():
    """DistilBERT's word embeddings sit in an `Embeddings` module whose forward takes no mask
    (no table entry: AoT refuses it too, tests/test_patch_aot.py)."""
    config = transformers.DistilBertConfig(
        vocab_size=VOCAB, dim=32, n_layers=1, n_heads=2, hidden_dim=32
    )
    with pytest.raises(
        TypeError,
        match=r"unsupported model DistilBertModel \(model_type='distilbert'\) under transformers "
        # (4.x's also takes no inputs_embeds)
        r".*: the module holding its input embedding: Embeddings.forward takes no "
        r"attention_mask",
    ):
        dk.patch(transformers.DistilBertModel(config), make_config("dept"))
