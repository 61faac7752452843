"""Prompt methods (DePT, prompt tuning, EPT) on BERT, RoBERTa and DeBERTa-v2: the
sequence-classification heads and the base models against the reference of
`tests/helpers/encoders.py` (the unpatched model fed the formula's `inputs_embeds`, with the
mask and token types extended as PEFT's prompt tuning extends them), PEFT's own prompt
tuning, stacked tasks, adapter files and the bad inputs.
"""

from __future__ import annotations

import copy

import peft
import pytest
import torch
import transformers
from helpers.encoders import (
    BASE_CLASSES,
    ENCODERS,
    encoder_model,
    padded_batch,
    patched_pair,
    reference_forward,
)
from helpers.models import BACKENDS, METHODS, grads, make_config, randomize, tol

import dept_kernels as dk

# The triton interpreter is slow: fp32 DePT only.
CASES = [
    pytest.param(arch, method, dtype, backend, id=f"{arch}-{method}-{str(dtype)[6:]}-{backend}")
    for arch in ENCODERS
    for method in METHODS
    for dtype in (torch.float32, torch.bfloat16)
    for backend in BACKENDS
    if backend != "triton" or (method == "dept" and dtype == torch.float32)
]
CLOSE = {"atol": 1e-5, "rtol": 1e-5}


def check_grads(got: dict, want: dict, dtype) -> None:
    assert set(got) == set(want)
    for name in want:
        assert want[name].abs().sum() > 0, name
        torch.testing.assert_close(got[name], want[name], **tol(dtype), msg=name)


@pytest.mark.parametrize(("arch", "method", "dtype", "backend"), CASES)
def test_seq_cls_matches_reference(arch, method, dtype, backend):
    base, model = patched_pair(arch, method, dtype)
    adapter = model.dept_adapter
    ids, mask, types, labels = padded_batch(model)
    with dk.use_backend(backend):
        out = model(input_ids=ids, attention_mask=mask, token_type_ids=types, labels=labels)
        out.loss.backward()
    got = grads(adapter)
    adapter.zero_grad()
    ref = reference_forward(base, adapter, ids, mask, types, labels=labels)
    ref.loss.backward()
    assert out.logits.shape == (3, 3)
    torch.testing.assert_close(out.logits, ref.logits, **tol(dtype))
    torch.testing.assert_close(out.loss, ref.loss, **tol(dtype))
    check_grads(got, grads(adapter), dtype)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", ENCODERS)
def test_base_model_keeps_the_prompt_rows(arch, method):
    """The base model's outputs have m + s rows, as under PEFT; the pooler reads row 0."""
    base, model = patched_pair(arch, method, cls=BASE_CLASSES[arch])
    adapter = model.dept_adapter
    ids, mask, types, _ = padded_batch(model)
    # Positional ids and mask, as a caller may pass them.
    out = model(ids, mask, token_type_ids=types, output_hidden_states=True)
    ref = reference_forward(base, adapter, ids, mask, types, output_hidden_states=True)
    m = adapter.num_virtual_tokens
    assert out.last_hidden_state.shape[:2] == (3, m + ids.shape[1])
    torch.testing.assert_close(out.last_hidden_state, ref.last_hidden_state, **CLOSE)
    for got, want in zip(out.hidden_states, ref.hidden_states, strict=True):
        torch.testing.assert_close(got, want, **CLOSE)
    if getattr(ref, "pooler_output", None) is not None:
        torch.testing.assert_close(out.pooler_output, ref.pooler_output, **CLOSE)
    (out.last_hidden_state * torch.linspace(-1, 1, 32)).sum().backward()
    got = grads(adapter)
    adapter.zero_grad()
    (ref.last_hidden_state * torch.linspace(-1, 1, 32)).sum().backward()
    check_grads(got, grads(adapter), torch.float32)


@pytest.mark.parametrize("arch", ENCODERS)
def test_no_mask_and_no_token_types(arch):
    """Without a mask or token types the model makes its own (all ones, all zeros) over the
    m + s rows, as for PEFT's inputs."""
    base, model = patched_pair(arch, "dept")
    ids, _, _, _ = padded_batch(model)
    out = model(input_ids=ids)
    ref = reference_forward(base, model.dept_adapter, ids)
    torch.testing.assert_close(out.logits, ref.logits, **CLOSE)


@pytest.mark.parametrize(
    ("arch", "changes"),
    [
        ("deberta-v2", {"type_vocab_size": 2, "position_biased_input": True}),
        ("deberta-v2", {"conv_kernel_size": 0, "relative_attention": False}),
        ("roberta", {"type_vocab_size": 1}),
    ],
    ids=["deberta-v2-absolute-types", "deberta-v2-no-relative", "roberta-one-type"],
)
@pytest.mark.parametrize("method", ["dept", "pt"])
def test_config_variants(arch, changes, method):
    """DeBERTa-v2 with absolute positions and token types (the prompt reads segment 0 and
    positions 0..m-1), or without relative attention; RoBERTa with one token type."""
    base, model = patched_pair(arch, method, **changes)
    ids, mask, types, labels = padded_batch(model)
    if changes.get("type_vocab_size") == 1:
        types = torch.zeros_like(types)
    out = model(input_ids=ids, attention_mask=mask, token_type_ids=types, labels=labels)
    ref = reference_forward(base, model.dept_adapter, ids, mask, types, labels=labels)
    torch.testing.assert_close(out.logits, ref.logits, **CLOSE)
    torch.testing.assert_close(out.loss, ref.loss, **CLOSE)


@pytest.mark.parametrize("arch", ENCODERS)
def test_longest_inputs_the_position_table_allows(arch):
    """BERT: m + s = max_position_embeddings; RoBERTa: two rows fewer (its positions start at
    pad_token_id + 1 = 2); DeBERTa-v2 (relative positions only): past the table size."""
    base, model = patched_pair(arch, "pt")
    m = model.dept_adapter.num_virtual_tokens
    s = {"bert": 64 - m, "roberta": 62 - m, "deberta-v2": 80 - m}[arch]
    ids, mask, types, _ = padded_batch(model, s=s)
    out = model(input_ids=ids, attention_mask=mask, token_type_ids=types)
    ref = reference_forward(base, model.dept_adapter, ids, mask, types)
    torch.testing.assert_close(out.logits, ref.logits, **CLOSE)


@pytest.mark.parametrize("arch", ENCODERS)
def test_matches_peft_prompt_tuning(arch):
    """PEFT's SEQ_CLS prompt tuning with the same prompt gives the same logits, loss and
    prompt gradient, with padding and token types; and `patch(peft_model)` accelerates it."""
    base = encoder_model(arch)
    ours = dk.patch(copy.deepcopy(base), dk.PromptTuningConfig(num_virtual_tokens=6))
    config = peft.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=6)
    theirs = peft.get_peft_model(base, config)
    randomize(ours.dept_adapter)
    with torch.no_grad():
        theirs.prompt_encoder["default"].embedding.weight.copy_(ours.dept_adapter.prompt)
    ids, mask, types, labels = padded_batch(ours)
    call = dict(input_ids=ids, attention_mask=mask, token_type_ids=types, labels=labels)
    want = theirs(**call)
    got = ours(**call)
    torch.testing.assert_close(got.logits, want.logits, **CLOSE)
    torch.testing.assert_close(got.loss, want.loss, **CLOSE)
    got.loss.backward()
    want.loss.backward()
    prompt = theirs.prompt_encoder["default"].embedding.weight
    torch.testing.assert_close(ours.dept_adapter.prompt.grad, prompt.grad, **CLOSE)
    # patch(peft_model): PEFT's own parameter, served by the fused hooks.
    reference = copy.deepcopy(theirs)
    assert dk.patch(theirs) is theirs
    assert dk.adapter(theirs).prompt is prompt
    torch.testing.assert_close(theirs(**call).logits, reference(**call).logits, **CLOSE)
    # Padded to a max length: the accelerated model trims, PEFT's runs every column.
    ids, mask, types, labels = max_length_batch(ours)
    call = dict(input_ids=ids, attention_mask=mask, token_type_ids=types, labels=labels)
    seen = spy(theirs)
    torch.testing.assert_close(theirs(**call).logits, reference(**call).logits, **CLOSE)
    assert seen == [7]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", ENCODERS)
def test_stacked_tasks(arch, method, tmp_path):
    """A mixed batch gives each sample its own task's logits (`task_ids` popped from the
    call), and the stacked adapter saves and loads."""
    base = encoder_model(arch)
    models = []
    for t in range(3):
        model = dk.patch(copy.deepcopy(base), make_config(method))
        randomize(model.dept_adapter, seed=10 + t)
        models.append(model)
    singles = [copy.deepcopy(m) for m in models]
    served = dk.stack_adapters(models)
    task_ids = torch.tensor([1, 0, 2, 1])
    ids, mask, types, labels = padded_batch(served, b=4)
    call = dict(input_ids=ids, attention_mask=mask, token_type_ids=types)
    mixed = served(**call, labels=labels, task_ids=task_ids)
    loss = 0.0
    for t, single in enumerate(singles):
        rows = task_ids.eq(t)
        alone = single(**{k: v[rows] for k, v in call.items()}, labels=labels[rows])
        torch.testing.assert_close(mixed.logits[rows], alone.logits, **CLOSE)
        loss = loss + alone.loss * rows.sum() / len(task_ids)
    torch.testing.assert_close(mixed.loss, loss, **CLOSE)
    dk.save_adapter(served, tmp_path)
    loaded = dk.load_adapter(encoder_model(arch), tmp_path)
    again = loaded(**call, task_ids=task_ids).logits
    torch.testing.assert_close(again, mixed.logits, atol=0, rtol=0)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", ENCODERS)
def test_save_load_round_trip(arch, method, tmp_path):
    _, model = patched_pair(arch, method)
    ids, mask, types, _ = padded_batch(model)
    call = dict(input_ids=ids, attention_mask=mask, token_type_ids=types)
    dk.save_adapter(model, tmp_path)
    loaded = dk.load_adapter(encoder_model(arch), tmp_path)
    torch.testing.assert_close(loaded(**call).logits, model(**call).logits, atol=0, rtol=0)


def test_aot_and_prompt_methods_both_serve_encoders():
    """The encoders are listed among the prompt methods' model types."""
    with pytest.raises(
        TypeError, match=r"model types with a table entry: \[.*'bert'.*'deberta-v2'"
    ):
        dk.patch(torch.nn.Linear(2, 2), make_config("pt"))


# --------------------------------------------------------------------------- padding trim


def trim_pair(arch: str, method: str, cls=None, trim: bool | None = None):
    """(untrimmed model, model patched with `trim_padding=trim`), same adapter values."""
    base = encoder_model(arch, cls=cls)
    untrimmed = dk.patch(copy.deepcopy(base), make_config(method), trim_padding=False)
    randomize(untrimmed.dept_adapter)
    model = dk.patch(copy.deepcopy(base), make_config(method), trim_padding=trim)
    model.dept_adapter.load_state_dict(untrimmed.dept_adapter.state_dict())
    return base, untrimmed, model


def spy(model) -> list[int]:
    """The number of id columns of each call of `model`'s fused op."""
    seen: list[int] = []
    dk.adapter(model).register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[1]))
    return seen


def max_length_batch(model):
    """12 columns, rows of 7, 5 and 3 tokens: the last 5 columns are padding in every row."""
    ids, mask, types, labels = padded_batch(model, s=12)
    for row, n in enumerate((7, 5, 3)):
        ids[row, n:], mask[row, n:], types[row, n:] = model.config.pad_token_id, 0, 0
    return ids, mask, types, labels


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", ENCODERS)
def test_cls_trim_equals_untrimmed_and_reference(arch, method):
    base, untrimmed, model = trim_pair(arch, method)
    ids, mask, types, labels = max_length_batch(model)
    call = dict(input_ids=ids, attention_mask=mask, token_type_ids=types, labels=labels)
    seen, seen_untrimmed = spy(model), spy(untrimmed)
    out = model(**call, output_hidden_states=True)
    want = untrimmed(**call, output_hidden_states=True)
    assert seen == [7] and seen_untrimmed == [12]
    out.loss.backward()
    want.loss.backward()
    torch.testing.assert_close(out.logits, want.logits, **CLOSE)
    torch.testing.assert_close(out.loss, want.loss, **CLOSE)
    check_grads(grads(model.dept_adapter), grads(untrimmed.dept_adapter), torch.float32)
    m = model.dept_adapter.num_virtual_tokens
    kept = m + 7
    for got, full in zip(out.hidden_states, want.hidden_states, strict=True):
        assert got.shape == full.shape
        torch.testing.assert_close(got[:, :kept], full[:, :kept], **CLOSE)
        assert not got[:, kept:].any()  # the cut columns read zeros
    with torch.no_grad():
        ref = reference_forward(base, model.dept_adapter, ids, mask, types, labels=labels)
    torch.testing.assert_close(out.logits, ref.logits, **CLOSE)


@pytest.mark.parametrize("arch", ENCODERS)
def test_base_model_trims_on_request(arch):
    """Base models trim with trim_padding=True only: the kept columns and the pooled row are
    the untrimmed model's, the cut columns zeros."""
    _, untrimmed, default = trim_pair(arch, "dept", cls=BASE_CLASSES[arch])
    _, _, model = trim_pair(arch, "dept", cls=BASE_CLASSES[arch], trim=True)
    ids, mask, types, _ = max_length_batch(model)
    call = dict(input_ids=ids, attention_mask=mask, token_type_ids=types)
    seen_default, seen = spy(default), spy(model)
    want = untrimmed(**call)
    default(**call)
    out = model(**call)
    assert seen_default == [12] and seen == [7]
    kept = model.dept_adapter.num_virtual_tokens + 7
    assert out.last_hidden_state.shape == want.last_hidden_state.shape
    close = dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        out.last_hidden_state[:, :kept], want.last_hidden_state[:, :kept], **close
    )
    assert not out.last_hidden_state[:, kept:].any()
    if getattr(want, "pooler_output", None) is not None:
        torch.testing.assert_close(out.pooler_output, want.pooler_output, **close)


@pytest.mark.parametrize("arch", ENCODERS)
def test_calls_that_keep_every_column(arch):
    """No trim with attention maps (per column) or without a mask; a tuple output (the base
    model's, under transformers 4) keeps its values either way."""
    _, untrimmed, model = trim_pair(arch, "pt")
    ids, mask, _, _ = max_length_batch(model)
    seen = spy(model)
    out = model(input_ids=ids, attention_mask=mask, output_attentions=True)
    model(input_ids=ids)
    assert seen == [12, 12]
    want = untrimmed(input_ids=ids, attention_mask=mask, output_attentions=True)
    torch.testing.assert_close(out.logits, want.logits, **CLOSE)
    as_tuple = model(input_ids=ids, attention_mask=mask, return_dict=False)
    torch.testing.assert_close(as_tuple[0], want.logits, **CLOSE)


# --------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    ("arch", "s", "changes", "needed", "limit"),
    [
        ("bert", 61, {}, 65, "has 64:"),
        ("roberta", 59, {}, 63, r"has 62 \(its first 2 rows precede position 0\)"),
        ("deberta-v2", 61, {"position_biased_input": True}, 65, "has 64:"),
    ],
)
def test_position_table_overflow(arch, s, changes, needed, limit):
    _, model = patched_pair(arch, "dept", **changes)
    ids = padded_batch(model, s=s)[0]
    with pytest.raises(ValueError, match=rf"need {needed} positions.*position table.*{limit}"):
        model(input_ids=ids)


@pytest.mark.parametrize("arch", ENCODERS)
def test_bad_inputs_are_refused(arch):
    _, model = patched_pair(arch, "dept")
    ids, mask, types, _ = padded_batch(model)
    with pytest.raises(ValueError, match="needs input_ids"):
        model(inputs_embeds=torch.zeros(3, 9, 32))
    with pytest.raises(ValueError, match="pass input_ids only"):
        model(input_ids=ids, inputs_embeds=torch.zeros(3, 9, 32))
    with pytest.raises(ValueError, match="position_ids are not supported"):
        model(input_ids=ids, position_ids=torch.arange(9).expand(3, 9))
    with pytest.raises(ValueError, match=r"token_type_ids must have the shape of input_ids"):
        model(input_ids=ids, token_type_ids=types[:, :4])
    with pytest.raises(ValueError, match="attention_mask has shape"):
        model(input_ids=ids, attention_mask=mask[:, :4])
    with pytest.raises(ValueError, match="task_ids"):
        model(input_ids=ids, task_ids=torch.zeros(3, dtype=torch.long))


HEADS = {
    "bert": "BertForMaskedLM",
    "roberta": "RobertaForTokenClassification",
    "deberta-v2": "DebertaV2ForMultipleChoice",
}


@pytest.mark.parametrize("arch", ENCODERS)
def test_unsupported_heads_and_configs(arch):
    other = encoder_model(arch, cls=getattr(transformers, HEADS[arch]))
    base = BASE_CLASSES[arch].__name__
    with pytest.raises(TypeError, match=rf"cover {base} and \w+ForSequenceClassification, got"):
        dk.patch(other, make_config("pt"))
    # A failed patch leaves the model untouched.
    assert not hasattr(other, "dept_adapter")
    assert all(p.requires_grad for p in other.parameters())
    # AoT P-tuning still serves that head.
    dk.patch(other, dk.AoTConfig("kron", r=4))
    if arch != "deberta-v2":
        decoder = encoder_model(arch, is_decoder=True)
        with pytest.raises(TypeError, match=r"config\.is_decoder=True"):
            dk.patch(decoder, make_config("pt"))
