"""`generate()` of patched models against the unpatched model fed the formula.

For T5, GPT-2 and LLaMA with DePT, prompt tuning, EPT and a stacked multi-task adapter: with
and without the KV cache, greedy and beam search, with no mask and with a padded one (left
padding for the decoder-only models, right padding for T5), the tokens equal those of the
unpatched model's `generate(inputs_embeds=[P; E[ids] + delta], attention_mask=[1; mask])`:
the prompt and the delta apply to the input tokens only, never to generated ones.
"""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
import transformers
from helpers.models import (
    ARCHS,
    DECODERS,
    PAD,
    VOCAB,
    batch,
    make_config,
    randomize,
    reference_generate,
    tiny_model,
)

import dept_kernels as dk

METHODS = ("dept", "pt", "ept", "stacked")
TASK_IDS = torch.tensor([1, 0, 1])


def patched(arch: str, method: str, max_length: int = 16):
    """(unpatched base, patched model, the single-task adapter of each sample's row)."""
    base = tiny_model(arch)
    for p in base.parameters():
        p.requires_grad_(False)
    if method != "stacked":
        model = dk.patch(copy.deepcopy(base), make_config(method, max_length))
        randomize(model.dept_adapter)
        return base, model, [model.dept_adapter] * 3
    tasks = []
    for t in range(2):
        task = dk.patch(copy.deepcopy(base), make_config("dept", max_length))
        randomize(task.dept_adapter, seed=20 + t)
        tasks.append(task)
    adapters = [copy.deepcopy(t.dept_adapter) for t in tasks]
    return base, dk.stack_adapters(tasks), [adapters[int(t)] for t in TASK_IDS]


def generate_inputs(arch: str, padded: bool, s: int = 7):
    ids, mask, _ = batch(s=s)
    if not padded:
        return ids, None
    if arch == "t5":
        ids[1, -3:], mask[1, -3:] = PAD, 0  # an encoder input pads on the right
    else:
        ids[0, :2], mask[0, :2] = PAD, 0  # decoder-only generation pads on the left
    return ids, mask


def new_tokens(arch, out, ids):
    if arch == "t5":
        return out
    assert torch.equal(out[:, : ids.shape[1]], ids)
    return out[:, ids.shape[1] :]


def run_generate(arch, method, model, ids, mask, **kwargs):
    extra = {"task_ids": TASK_IDS} if method == "stacked" else {}
    out = model.generate(input_ids=ids, attention_mask=mask, **extra, **kwargs)
    return new_tokens(arch, out, ids)


@pytest.mark.parametrize("num_beams", [1, 3])
@pytest.mark.parametrize("padded", [False, True], ids=["no_mask", "padded"])
@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no_cache"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", ARCHS)
def test_generate_equals_formula(arch, method, use_cache, padded, num_beams):
    base, model, row_adapters = patched(arch, method)
    ids, mask = generate_inputs(arch, padded)
    kwargs = {
        "max_new_tokens": 6,
        "do_sample": False,
        "num_beams": num_beams,
        "use_cache": use_cache,
    }
    got = run_generate(arch, method, model, ids, mask, **kwargs)
    want = reference_generate(arch, base, row_adapters, ids, mask, **kwargs)
    assert torch.equal(got, want)
    assert len(set(got.flatten().tolist())) > 1  # a degenerate constant output proves little


@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no_cache"])
@pytest.mark.parametrize("arch", DECODERS)
def test_generation_past_max_length(arch, use_cache):
    """DePT's A has max_length rows: a generation may run past them (new tokens take no
    delta), with or without the cache, and still equals the formula."""
    base, model, row_adapters = patched(arch, "dept", max_length=7)
    ids, mask = generate_inputs(arch, padded=True, s=7)
    kwargs = {"max_new_tokens": 8, "do_sample": False, "use_cache": use_cache}
    got = run_generate(arch, "dept", model, ids, mask, **kwargs)
    want = reference_generate(arch, base, row_adapters, ids, mask, **kwargs)
    assert got.shape[1] == 8
    assert torch.equal(got, want)


@pytest.mark.parametrize("arch", ARCHS)
def test_cache_and_no_cache_agree(arch):
    _, model, _ = patched(arch, "dept")
    ids, mask = generate_inputs(arch, padded=True)
    kwargs = {"max_new_tokens": 6, "do_sample": False}
    with_cache = run_generate(arch, "dept", model, ids, mask, use_cache=True, **kwargs)
    without = run_generate(arch, "dept", model, ids, mask, use_cache=False, **kwargs)
    assert torch.equal(with_cache, without)


def test_generate_task_ids_must_be_1d():
    _, model, _ = patched("gpt2", "stacked")
    ids, _ = generate_inputs("gpt2", padded=False)
    with pytest.raises(ValueError, match=r"task_ids must be a 1-D tensor.*\(3, 1\)"):
        model.generate(input_ids=ids, task_ids=TASK_IDS[:, None], max_new_tokens=2)


# --------------------------------------------------------------------------- signatures


def test_hooked_forwards_name_what_the_hooks_read():
    """Fails when a transformers release drops or renames an argument the hooks read
    (transformers 5.24 renamed past_key_values to cache): patching each architecture
    resolves every argument by the installed forward's signature."""
    from dept_kernels.models._hooks import ROLES

    for arch in ARCHS:
        model = dk.patch(tiny_model(arch), make_config("dept"))
        inner = model if arch == "t5" else model.get_decoder()
        params = inspect.signature(type(inner).forward).parameters
        needed = ("input_ids", "attention_mask", "inputs_embeds")
        needed += ("encoder_outputs",) if arch == "t5" else ("position_ids", "cache")
        for role in needed:
            assert any(name in params for name in ROLES[role]), (arch, role)


def test_patch_refuses_a_forward_without_an_argument_it_needs(monkeypatch):
    """A forward that lost `position_ids` (or the cache) fails the patch, naming the class
    and the transformers version, and leaves the model unpatched."""
    model = tiny_model("gpt2")
    inner_cls = type(model.transformer)
    original = inner_cls.forward

    def forward(self, input_ids=None, cache=None, attention_mask=None, inputs_embeds=None, **kw):
        return original(self, input_ids=input_ids, attention_mask=attention_mask, **kw)

    monkeypatch.setattr(inner_cls, "forward", forward)
    from dept_kernels.models import _hooks

    _hooks.signature.cache_clear()
    try:
        with pytest.raises(
            TypeError,
            match=rf"GPT2Model.forward \(transformers {transformers.__version__}\) takes no "
            "position_ids",
        ):
            dk.patch(model, make_config("dept"))
    finally:
        _hooks.signature.cache_clear()
    assert not hasattr(model, "dept_adapter")
    assert all(p.requires_grad for p in model.parameters())


def test_old_cache_keyword_still_read():
    """A caller passing the cache under its older name (which transformers' deprecation
    wrapper still accepts) is not taken for a first forward."""
    _, model, _ = patched("gpt2", "dept")
    ids = torch.randint(2, VOCAB, (2, 5))
    out = model(input_ids=ids, use_cache=True)
    step = torch.randint(2, VOCAB, (2, 1))
    want = model(input_ids=step, **{_cache_name(model): out.past_key_values}).logits
    out = model(input_ids=ids, use_cache=True)
    got = model(input_ids=step, past_key_values=out.past_key_values).logits
    torch.testing.assert_close(got, want)
    assert got.shape[1] == 1


def _cache_name(model) -> str:
    params = inspect.signature(type(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"
