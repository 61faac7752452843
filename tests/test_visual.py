"""DePT, prompt tuning and EPT with visual rows (CLIP-T5, docs/design.md §1) through T5.

A patched T5 takes `visual_embeds` (B, n_v, d) and `visual_attention_mask` (B, n_v) in its
forward and `generate`. The reference here is the unpatched model fed, from the formulas,
`inputs_embeds = cat([P, E[ids] + scaling * A[t] @ B, V])` and the mask
`cat([1 (m), attention_mask, visual mask])`: losses, logits, encoder states, the gradients
of the adapter's parameters and of `V`, generated tokens, stacked tasks and saved adapters.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers.models import (
    BACKENDS,
    EOS,
    PAD,
    batch,
    formula_embeds,
    grads,
    make_config,
    patched_pair,
    randomize,
    reference_embeds,
    tiny_model,
    tol,
)
from transformers import (
    T5EncoderModel,
    T5ForQuestionAnswering,
    T5ForSequenceClassification,
    T5Model,
)

import dept_kernels as dk

METHODS = ("dept", "pt", "ept")
N_V, D = 4, 32


def visual_rows(b: int = 3, seed: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 visual rows (B, n_v, d), as a projection gives them, and a visual mask with a
    padded row in sample 1."""
    gen = torch.Generator().manual_seed(seed)
    embeds = torch.randn(b, N_V, D, generator=gen)
    vmask = torch.ones(b, N_V, dtype=torch.long)
    vmask[1, -1] = 0
    return embeds, vmask


def padded_text(b: int = 3):
    """A batch with right padding: 3 columns in sample 0, 2 in sample 2."""
    ids, mask, labels = batch(b=b)
    ids[0, -3:], mask[0, -3:] = PAD, 0
    ids[2, -2:], mask[2, -2:] = PAD, 0
    return ids, mask, labels


def reference_inputs(embeds, visual, mask, vmask, m):
    """The encoder input `[P; E[ids] + delta; V]` and mask `[1 (m); mask; vmask]`, built by
    concatenation; `visual` cast to the embeddings' dtype as the model's input is."""
    full = torch.cat([embeds, visual.to(embeds.dtype)], dim=1)
    ones = torch.ones(mask.shape[0], m, dtype=mask.dtype)
    vmask = torch.ones(visual.shape[:2], dtype=mask.dtype) if vmask is None else vmask
    return full, torch.cat([ones, mask, vmask.to(mask.dtype)], dim=1)


def model_reference(model, base, ids, visual, mask, vmask):
    """`reference_inputs` of a patched model's adapter over `base`'s embeddings."""
    adapter = model.dept_adapter
    embeds = reference_embeds(adapter, base.get_input_embeddings(), ids)
    return reference_inputs(embeds, visual, mask, vmask, adapter.num_virtual_tokens)


def leaf(visual: torch.Tensor) -> torch.Tensor:
    return visual.detach().clone().requires_grad_(True)


# The triton interpreter is slow: fp32 DePT only.
CASES = [
    pytest.param(method, dtype, backend, id=f"{method}-{str(dtype)[6:]}-{backend}")
    for method in METHODS
    for dtype in (torch.float32, torch.bfloat16)
    for backend in BACKENDS
    if backend != "triton" or (method == "dept" and dtype == torch.float32)
]


@pytest.mark.parametrize(("method", "dtype", "backend"), CASES)
@pytest.mark.parametrize("with_vmask", [True, False], ids=["vmask", "no_vmask"])
def test_forward_and_gradients_match_reference(method, dtype, backend, with_vmask):
    base, model = patched_pair("t5", method, dtype=dtype)
    adapter = model.dept_adapter
    m = adapter.num_virtual_tokens
    ids, mask, labels = padded_text()
    visual, vmask = visual_rows()
    vmask = vmask if with_vmask else None
    got_v = leaf(visual)
    with dk.use_backend(backend):
        out = model(
            input_ids=ids,
            attention_mask=mask,
            labels=labels,
            visual_embeds=got_v,
            visual_attention_mask=vmask,
        )
        out.loss.backward()
    got = grads(adapter)
    adapter.zero_grad()
    want_v = leaf(visual)
    embeds, ext = reference_inputs(
        reference_embeds(adapter, base.get_input_embeddings(), ids), want_v, mask, vmask, m
    )
    ref = base(inputs_embeds=embeds, attention_mask=ext, labels=labels)
    ref.loss.backward()
    want = grads(adapter)
    assert out.encoder_last_hidden_state.shape == (3, m + ids.shape[1] + N_V, D)
    torch.testing.assert_close(out.logits, ref.logits, **tol(dtype))
    torch.testing.assert_close(out.loss, ref.loss, **tol(dtype))
    torch.testing.assert_close(
        out.encoder_last_hidden_state, ref.encoder_last_hidden_state, **tol(dtype)
    )
    assert set(got) == set(want)
    for name in want:
        assert want[name].abs().sum() > 0, name
        torch.testing.assert_close(got[name], want[name], **tol(dtype), msg=name)
    # The visual rows' gradient reaches the fp32 projection output, masked rows' too.
    assert got_v.grad.dtype == torch.float32
    assert want_v.grad.abs().sum() > 0
    torch.testing.assert_close(got_v.grad, want_v.grad, **tol(dtype))


def test_visual_mask_changes_the_result():
    """A masked visual row is not attended: the reference with it masked differs from the
    one without a mask, and the patched model follows the mask it is given."""
    _, model = patched_pair("t5", "dept")
    ids, mask, labels = padded_text()
    visual, vmask = visual_rows()
    with torch.no_grad():
        masked = model(input_ids=ids, attention_mask=mask, labels=labels,
                       visual_embeds=visual, visual_attention_mask=vmask).logits  # fmt: skip
        unmasked = model(input_ids=ids, attention_mask=mask, labels=labels,
                         visual_embeds=visual).logits  # fmt: skip
    assert not torch.allclose(masked[1], unmasked[1])
    torch.testing.assert_close(masked[0], unmasked[0], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("trim", [None, True, False], ids=["default", "on", "off"])
def test_padding_trim_setting_gives_the_reference(trim):
    """Calls with visual rows are never trimmed (the visual rows follow the text, and T5's
    relative bias reads their distance to it): every trim setting equals the reference, and
    the encoder states keep all m + s + n_v columns."""
    base = tiny_model("t5")
    model = dk.patch(copy.deepcopy(base), make_config("dept"), trim_padding=trim)
    randomize(model.dept_adapter)
    adapter = model.dept_adapter
    ids, mask, labels = padded_text()
    mask[:, -2:], ids[:, -2:] = 0, PAD  # two columns of padding in every row
    visual, vmask = visual_rows()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, labels=labels,
                    visual_embeds=visual, visual_attention_mask=vmask)  # fmt: skip
        embeds, ext = reference_inputs(
            reference_embeds(adapter, base.get_input_embeddings(), ids), visual, mask, vmask, 4
        )
        ref = base(inputs_embeds=embeds, attention_mask=ext, labels=labels)
    assert out.encoder_last_hidden_state.shape[1] == 4 + ids.shape[1] + N_V
    torch.testing.assert_close(out.logits, ref.logits, **tol(torch.float32))
    torch.testing.assert_close(
        out.encoder_last_hidden_state, ref.encoder_last_hidden_state, **tol(torch.float32)
    )


@pytest.mark.parametrize("method", METHODS)
def test_t5_encoder_model(method):
    base, model = patched_pair("t5", method, cls=T5EncoderModel)
    adapter = model.dept_adapter
    m = adapter.num_virtual_tokens
    ids, mask, _ = padded_text()
    visual, vmask = visual_rows()
    got_v, want_v = leaf(visual), leaf(visual)
    out = model(input_ids=ids, attention_mask=mask, visual_embeds=got_v,
                visual_attention_mask=vmask).last_hidden_state  # fmt: skip
    embeds, ext = reference_inputs(
        reference_embeds(adapter, base.get_input_embeddings(), ids), want_v, mask, vmask, m
    )
    ref = base(inputs_embeds=embeds, attention_mask=ext).last_hidden_state
    assert out.shape == (3, m + ids.shape[1] + N_V, D)
    torch.testing.assert_close(out, ref, **tol(torch.float32))
    out.square().sum().backward()
    ref.square().sum().backward()
    torch.testing.assert_close(got_v.grad, want_v.grad, **tol(torch.float32))


def test_t5_model_and_heads():
    """T5Model, T5ForSequenceClassification (which hooks its inner T5Model) and
    T5ForQuestionAnswering (whose decoder input is made from input_ids) take visual rows
    too: the reference's states and logits."""
    base, model = patched_pair("t5", "dept", cls=T5Model)
    ids, mask, labels = padded_text()
    visual, vmask = visual_rows()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, decoder_input_ids=labels,
                    visual_embeds=visual, visual_attention_mask=vmask)  # fmt: skip
        embeds, ext = model_reference(model, base, ids, visual, mask, vmask)
        ref = base(inputs_embeds=embeds, attention_mask=ext, decoder_input_ids=labels)
    torch.testing.assert_close(out.last_hidden_state, ref.last_hidden_state, **tol(torch.float32))

    base, model = patched_pair("t5", "dept", cls=T5ForSequenceClassification)
    ids[:, -1] = EOS  # T5 pools the decoder state at the last <eos>
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, visual_embeds=visual,
                    visual_attention_mask=vmask).logits  # fmt: skip
        embeds, ext = model_reference(model, base, ids, visual, mask, vmask)
        enc = base.transformer.encoder(inputs_embeds=embeds, attention_mask=ext)
        ref = base(input_ids=ids, attention_mask=ext, encoder_outputs=enc).logits
    torch.testing.assert_close(out, ref, **tol(torch.float32))

    base, model = patched_pair("t5", "dept", cls=T5ForQuestionAnswering)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, visual_embeds=visual,
                    visual_attention_mask=vmask)  # fmt: skip
        embeds, ext = model_reference(model, base, ids, visual, mask, vmask)
        enc = base.encoder(inputs_embeds=embeds, attention_mask=ext)
        ref = base(input_ids=ids, attention_mask=ext, encoder_outputs=enc)
    assert out.start_logits.shape == ids.shape
    torch.testing.assert_close(out.start_logits, ref.start_logits, **tol(torch.float32))
    torch.testing.assert_close(out.end_logits, ref.end_logits, **tol(torch.float32))


def test_encoder_called_alone_then_the_decoder():
    """The encoder stack called by hand with visual rows (as generate calls it), then the
    model with its outputs and the visual mask: the reference's logits."""
    base, model = patched_pair("t5", "dept")
    ids, mask, labels = padded_text()
    visual, vmask = visual_rows()
    with torch.no_grad():
        enc = model.get_encoder()(input_ids=ids, attention_mask=mask, visual_embeds=visual,
                                  visual_attention_mask=vmask)  # fmt: skip
        out = model(attention_mask=mask, encoder_outputs=enc, labels=labels,
                    visual_embeds=visual, visual_attention_mask=vmask)  # fmt: skip
        embeds, ext = model_reference(model, base, ids, visual, mask, vmask)
        ref = base(inputs_embeds=embeds, attention_mask=ext, labels=labels)
    torch.testing.assert_close(out.logits, ref.logits, **tol(torch.float32))


# --------------------------------------------------------------------------- generate


def stacked(base):
    """Two DePT task adapters stacked on `base`'s copy, and each sample's adapter."""
    tasks = []
    for t in range(2):
        task = dk.patch(copy.deepcopy(base), make_config("dept"))
        randomize(task.dept_adapter, seed=20 + t)
        tasks.append(task)
    adapters = [copy.deepcopy(t.dept_adapter) for t in tasks]
    return dk.stack_adapters(tasks), adapters


TASK_IDS = torch.tensor([1, 0, 1])


@pytest.mark.parametrize("num_beams", [1, 2])
@pytest.mark.parametrize("with_vmask", [True, False], ids=["vmask", "no_vmask"])
@pytest.mark.parametrize("method", [*METHODS, "stacked"])
def test_generate_equals_reference(method, with_vmask, num_beams):
    base = tiny_model("t5")
    if method == "stacked":
        model, adapters = stacked(base)
        row_adapters, extra = [adapters[int(t)] for t in TASK_IDS], {"task_ids": TASK_IDS}
    else:
        model = dk.patch(copy.deepcopy(base), make_config(method))
        randomize(model.dept_adapter)
        row_adapters, extra = [model.dept_adapter] * 3, {}
    ids, mask, _ = padded_text()
    visual, vmask = visual_rows()
    vmask = vmask if with_vmask else None
    kwargs = {"max_new_tokens": 6, "do_sample": False, "num_beams": num_beams}
    got = model.generate(input_ids=ids, attention_mask=mask, visual_embeds=visual,
                         visual_attention_mask=vmask, **extra, **kwargs)  # fmt: skip
    m = row_adapters[0].num_virtual_tokens
    with torch.no_grad():
        embeds, ext = reference_inputs(
            formula_embeds("t5", base, row_adapters, ids, mask), visual, mask, vmask, m
        )
    want = base.generate(inputs_embeds=embeds, attention_mask=ext, **kwargs)
    assert torch.equal(got, want)
    assert len(set(got.flatten().tolist())) > 1  # a degenerate constant output proves little


def test_generate_reads_the_visual_rows():
    """Other visual rows, or none, give other scores: generate does not drop them."""
    _, model = patched_pair("t5", "dept")
    ids, mask, _ = padded_text()
    visual, _ = visual_rows()
    kwargs = {"max_new_tokens": 3, "do_sample": False, "output_scores": True,
              "return_dict_in_generate": True}  # fmt: skip

    def first_scores(**extra):
        return model.generate(input_ids=ids, attention_mask=mask, **extra, **kwargs).scores[0]

    one = first_scores(visual_embeds=visual)
    assert not torch.allclose(one, first_scores(visual_embeds=visual.flip(0)))
    assert not torch.allclose(one, first_scores())


# --------------------------------------------------------------------------- tasks, files


def test_stacked_tasks_forward_and_gradients():
    base = tiny_model("t5")
    for p in base.parameters():
        p.requires_grad_(False)
    model, adapters = stacked(base)
    row_adapters = [adapters[int(t)] for t in TASK_IDS]
    ids, mask, labels = padded_text()
    visual, vmask = visual_rows()
    got_v, want_v = leaf(visual), leaf(visual)
    out = model(input_ids=ids, attention_mask=mask, labels=labels, task_ids=TASK_IDS,
                visual_embeds=got_v, visual_attention_mask=vmask)  # fmt: skip
    out.loss.backward()
    embeds, ext = reference_inputs(
        formula_embeds("t5", base, row_adapters, ids, mask), want_v, mask, vmask, 4
    )
    ref = base(inputs_embeds=embeds, attention_mask=ext, labels=labels)
    ref.loss.backward()
    torch.testing.assert_close(out.logits, ref.logits, **tol(torch.float32))
    torch.testing.assert_close(got_v.grad, want_v.grad, **tol(torch.float32))


@pytest.mark.parametrize("method", METHODS)
def test_save_and_load_adapter_round_trip(method, tmp_path):
    base, model = patched_pair("t5", method)
    ids, mask, labels = padded_text()
    visual, vmask = visual_rows()
    call = {"input_ids": ids, "attention_mask": mask, "labels": labels,
            "visual_embeds": visual, "visual_attention_mask": vmask}  # fmt: skip
    dk.save_adapter(model, tmp_path)
    loaded = dk.load_adapter(copy.deepcopy(base), tmp_path)
    with torch.no_grad():
        want = model(**call)
        got = loaded(**call)
    assert torch.equal(got.logits, want.logits)
    kwargs = {"max_new_tokens": 4, "do_sample": False}
    assert torch.equal(
        loaded.generate(input_ids=ids, attention_mask=mask, visual_embeds=visual, **kwargs),
        model.generate(input_ids=ids, attention_mask=mask, visual_embeds=visual, **kwargs),
    )


@pytest.mark.parametrize("index", ["position", "token"])
def test_scaled_embedding_module_writes_the_visual_rows(index):
    """An embedding module that scales its lookup (`embed_scale`, Gemma under transformers 5)
    takes the fused path of `_hooks._scaled_lookup`: `[P; scale * E[ids] + delta; V]`, the
    visual rows after the tokens and unscaled, their gradient passed through."""
    from dept_kernels.models._hooks import FusedEmbedding

    model = tiny_model("t5")
    config = dk.DePTConfig(num_virtual_tokens=4, r=3, lora_alpha=8, max_length=16, index=index)
    adapter = dk.patch(model, config).dept_adapter
    randomize(adapter)
    embedding = torch.nn.Embedding(model.config.vocab_size, D)
    embedding.embed_scale = torch.tensor(3.0)
    ids, _, _ = padded_text()
    visual, _ = visual_rows()
    got_v, want_v = leaf(visual), leaf(visual)
    fused = FusedEmbedding(lambda: adapter)
    fused.install(embedding)
    out = fused(embedding, ids, None, None, got_v)
    rows = torch.arange(ids.shape[1]).expand_as(ids) if index == "position" else ids
    scaling = config.lora_alpha / config.r**0.5
    tokens = 3.0 * embedding.weight[ids] + scaling * adapter.lora_a[rows] @ adapter.lora_b
    prompt = adapter.prompt.expand(ids.shape[0], -1, -1)
    want = torch.cat([prompt, tokens, want_v], dim=1)
    torch.testing.assert_close(out, want, **tol(torch.float32))
    out.square().sum().backward()
    want.square().sum().backward()
    torch.testing.assert_close(got_v.grad, want_v.grad, **tol(torch.float32))
