"""Whole-model checkpoints: a patched model (every method, stacked tasks, a PEFT model
accelerated in place) survives `torch.save` / `torch.load`, `pickle` and `copy.deepcopy`:
the copy gives the same outputs and generations, serves its own adapter, and unpatches."""

from __future__ import annotations

import copy
import io
import pickle

import peft
import pytest
import torch
from helpers.models import batch, make_config, randomize, tiny_model

import dept_kernels as dk


def _stacked(arch):
    tasks = [dk.patch(tiny_model(arch), make_config("dept")) for _ in range(2)]
    for t, task in enumerate(tasks):
        randomize(task.dept_adapter, seed=t)
    return dk.stack_adapters(tasks)


def _aot(arch):
    model = dk.patch(tiny_model(arch), dk.AoTConfig("kron", r=4))
    randomize(model.dept_adapter)
    return model.eval()


def _single(arch, method):
    model = dk.patch(tiny_model(arch), make_config(method))
    randomize(model.dept_adapter)
    return model


def _peft(arch):
    task = "SEQ_2_SEQ_LM" if arch == "t5" else "CAUSAL_LM"
    model = peft.get_peft_model(
        tiny_model(arch), peft.PromptTuningConfig(task_type=task, num_virtual_tokens=4)
    )
    with torch.no_grad():
        model.prompt_encoder["default"].embedding.weight.normal_(std=0.5)
    return dk.patch(model)


MAKERS = {
    "dept": lambda arch: _single(arch, "dept"),
    "pt": lambda arch: _single(arch, "pt"),
    "ept": lambda arch: _single(arch, "ept"),
    "stacked": _stacked,
    "aot": _aot,
    "peft": _peft,
}


def _save_load(model):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


COPIES = {
    "torch_save": _save_load,
    "pickle": lambda model: pickle.loads(pickle.dumps(model)),
    "deepcopy": copy.deepcopy,
}


def _outputs(arch, kind, model):
    ids, mask, labels = batch()
    kwargs = {"input_ids": ids, "attention_mask": mask}
    if kind == "stacked":
        kwargs["task_ids"] = torch.tensor([1, 0, 1])
    if arch == "t5":
        kwargs["labels"] = labels
    logits = model(**kwargs).logits
    kwargs.pop("labels", None)
    tokens = model.generate(**kwargs, max_new_tokens=3, do_sample=False)
    return logits, tokens


@pytest.mark.parametrize("how", list(COPIES))
@pytest.mark.parametrize("kind", list(MAKERS))
@pytest.mark.parametrize("arch", ["t5", "gpt2", "llama"])
def test_patched_model_survives_save_load_pickle_deepcopy(arch, kind, how):
    model = MAKERS[kind](arch)
    logits, tokens = _outputs(arch, kind, model)
    twin = COPIES[how](model)
    got_logits, got_tokens = _outputs(arch, kind, twin)
    torch.testing.assert_close(got_logits, logits, rtol=0, atol=0)
    assert torch.equal(got_tokens, tokens)
    # The copy serves its own adapter: changing it leaves the original alone.
    with torch.no_grad():
        for p in dk.adapter(twin).parameters():
            p.add_(1.0)
    assert not torch.equal(_outputs(arch, kind, twin)[0], logits)
    torch.testing.assert_close(_outputs(arch, kind, model)[0], logits, rtol=0, atol=0)
    dk.unpatch(twin)
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in twin.modules())
    for name in ("forward", "generate"):
        assert name not in twin.__dict__
