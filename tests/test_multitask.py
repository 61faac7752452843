"""Multi-task serving for the prompt methods: `stack_adapters` of DePT, prompt tuning and EPT
on T5, GPT-2 and LLaMA, and deep copies of patched models.

The reference is each task's own patched model run on that task's samples alone: a mixed
batch must give those samples the same logits, loss share and generations.
"""

from __future__ import annotations

import copy
import dataclasses
import json

import peft
import pytest
import torch
from helpers.aot import formula_tables, hook_reference
from helpers.models import (
    ARCHS,
    BACKENDS,
    BASE_CLASSES,
    CLS_CLASSES,
    DECODERS,
    EOS,
    PAD,
    batch,
    make_config,
    randomize,
    reference_generate,
    tiny_config,
    tiny_model,
)
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    T5EncoderModel,
)

import dept_kernels as dk
from dept_kernels.methods import DePTAdapter, PromptTuningAdapter

METHODS = ("dept", "pt", "ept")
TASK_IDS = torch.tensor([1, 0, 2, 1])
CLOSE = {"atol": 1e-5, "rtol": 1e-5}


def task_config(method: str, task: int):
    config = make_config(method)
    if method == "dept" and task == 1:
        # Another lora_alpha: the stack folds this task's scaling into its B.
        config = dataclasses.replace(config, lora_alpha=4)
    return config


def task_models(arch: str, method: str, tasks: int = 3, cls=None) -> list[torch.nn.Module]:
    """`tasks` patched copies of one base model, each with its own non-zero adapter values."""
    base = tiny_model(arch, cls)
    models = []
    for t in range(tasks):
        model = dk.patch(copy.deepcopy(base), task_config(method, t))
        randomize(model.dept_adapter, seed=10 + t)
        models.append(model)
    return models


def call_kwargs(arch: str, ids, mask, labels) -> dict:
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "labels": labels if arch == "t5" else ids,
    }


def rows_of(kwargs: dict, rows) -> dict:
    return {k: v[rows] for k, v in kwargs.items()}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", ARCHS)
def test_mixed_batch_equals_per_task_runs(arch, method):
    models = task_models(arch, method)
    singles = [copy.deepcopy(m) for m in models]  # stack_adapters replaces models[0]'s adapter
    served = dk.stack_adapters(models)
    assert served is models[0]
    stacked = served.dept_adapter
    assert stacked.num_tasks == 3
    assert type(stacked) is (DePTAdapter if method == "dept" else PromptTuningAdapter)
    seen = []
    served.register_forward_pre_hook(lambda mod, a, kw: seen.append(set(kw)), with_kwargs=True)
    ids, mask, labels = batch(b=4)
    kwargs = call_kwargs(arch, ids, mask, labels)
    mixed = served(**kwargs, task_ids=TASK_IDS)
    assert "task_ids" not in seen[0]  # popped before the Hugging Face forward
    mixed.loss.backward()
    loss = 0.0
    for t, single in enumerate(singles):
        rows = TASK_IDS.eq(t)
        alone = single(**rows_of(kwargs, rows))
        torch.testing.assert_close(mixed.logits[rows], alone.logits, **CLOSE)
        # Every sample has as many label tokens: the batch mean weighs tasks by sample count.
        share = rows.sum() / len(TASK_IDS)
        loss = loss + alone.loss * share
        if method != "ept":  # EPT stacks its folded prompt, not its own parameters
            alone.loss.backward()
            torch.testing.assert_close(
                stacked.prompt.grad[t], single.dept_adapter.prompt.grad * share, **CLOSE
            )
    torch.testing.assert_close(mixed.loss, loss, **CLOSE)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_batch_on_every_backend(backend):
    models = task_models("gpt2", "dept")
    singles = [copy.deepcopy(m) for m in models]
    served = dk.stack_adapters(models)
    ids, mask, labels = batch(b=4)
    kwargs = call_kwargs("gpt2", ids, mask, labels)
    with dk.use_backend(backend):
        mixed = served(**kwargs, task_ids=TASK_IDS).logits
    for t, single in enumerate(singles):
        rows = TASK_IDS.eq(t)
        torch.testing.assert_close(mixed[rows], single(**rows_of(kwargs, rows)).logits, **CLOSE)


@pytest.mark.parametrize(
    ("arch", "cls"),
    [
        *CLS_CLASSES.items(),
        ("t5", T5EncoderModel),
        *BASE_CLASSES.items(),
    ],
)
def test_heads_and_base_models(arch, cls):
    models = task_models(arch, "dept", cls=cls)
    singles = [copy.deepcopy(m) for m in models]
    served = dk.stack_adapters(models)
    ids, mask, _ = batch(b=4, s=8)
    if arch == "t5":
        ids[:, -1] = EOS  # T5 pools the decoder state at the last <eos>
    else:
        ids[0, 5:], mask[0, 5:] = PAD, 0  # right padding: the head pools token 4 of row 0
    bases = (T5EncoderModel, *BASE_CLASSES.values())
    key = "last_hidden_state" if cls in bases else "logits"
    mixed = served(input_ids=ids, attention_mask=mask, task_ids=TASK_IDS)[key]
    for t, single in enumerate(singles):
        rows = TASK_IDS.eq(t)
        alone = single(input_ids=ids[rows], attention_mask=mask[rows])[key]
        torch.testing.assert_close(mixed[rows], alone, **CLOSE)


@pytest.mark.parametrize(
    ("arch", "method", "num_beams"),
    [
        ("t5", "dept", 1),
        *[(arch, "dept", 1) for arch in DECODERS],
        ("gpt2", "pt", 3),
        ("t5", "ept", 3),
    ],
)
def test_generate_with_task_ids(arch, method, num_beams):
    models = task_models(arch, method)
    singles = [copy.deepcopy(m) for m in models]
    served = dk.stack_adapters(models)
    ids, mask, _ = batch(b=4, s=6)
    if arch != "t5":
        ids[0, :2], mask[0, :2] = PAD, 0  # decoder-only generation pads on the left
    kwargs = {"max_new_tokens": 5, "do_sample": False, "num_beams": num_beams}
    mixed = served.generate(input_ids=ids, attention_mask=mask, task_ids=TASK_IDS, **kwargs)
    assert len(set(mixed[:, -5:].flatten().tolist())) > 1  # a constant output proves little
    for t, single in enumerate(singles):
        rows = TASK_IDS.eq(t)
        alone = single.generate(input_ids=ids[rows], attention_mask=mask[rows], **kwargs)
        assert torch.equal(mixed[rows], alone)
    with pytest.raises(ValueError, match="pass task_ids"):
        served.generate(input_ids=ids, attention_mask=mask, **kwargs)


def test_save_load_and_stack_from_directories(tmp_path):
    models = task_models("t5", "dept")
    singles = [copy.deepcopy(m) for m in models]
    for t, single in enumerate(singles):
        dk.save_adapter(single, tmp_path / str(t))
    served = dk.stack_adapters([tmp_path / "0", models[1], tmp_path / "2"], model=tiny_model("t5"))
    ids, mask, labels = batch(b=4)
    kwargs = call_kwargs("t5", ids, mask, labels)
    want = served(**kwargs, task_ids=TASK_IDS).logits
    for t, single in enumerate(singles):
        rows = TASK_IDS.eq(t)
        torch.testing.assert_close(want[rows], single(**rows_of(kwargs, rows)).logits, **CLOSE)
    dk.save_adapter(served, tmp_path / "stacked")
    config = json.loads((tmp_path / "stacked" / "adapter_config.json").read_text())
    assert config["method"] == "dept" and config["num_tasks"] == 3
    assert json.loads((tmp_path / "0" / "adapter_config.json").read_text())["num_tasks"] is None
    loaded = dk.load_adapter(tiny_model("t5"), tmp_path / "stacked")
    torch.testing.assert_close(loaded(**kwargs, task_ids=TASK_IDS).logits, want)
    for name, p in served.dept_adapter.state_dict().items():
        assert torch.equal(loaded.dept_adapter.state_dict()[name], p), name
    dk.load_adapter(loaded, tmp_path / "stacked")  # an already patched, stacked model
    with pytest.raises(ValueError, match="num_tasks=3"):
        dk.load_adapter(singles[0], tmp_path / "stacked")
    # A stacked source contributes all its tasks: tasks 0, 1, 2, then task 1 again.
    four = dk.stack_adapters([tmp_path / "stacked", tmp_path / "1"], model=tiny_model("t5"))
    got = four(**kwargs, task_ids=torch.tensor([1, 0, 2, 3])).logits
    torch.testing.assert_close(got[:3], want[:3])
    torch.testing.assert_close(got[3], want[3])


def test_stacked_ept_saves_as_prompt_tuning(tmp_path):
    models = task_models("gpt2", "ept", tasks=2)
    served = dk.stack_adapters(models)
    dk.save_adapter(served, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["method"] == "prompt_tuning" and config["num_tasks"] == 2
    loaded = dk.load_adapter(tiny_model("gpt2"), tmp_path)
    ids, mask, _ = batch(b=4)
    task_ids = torch.tensor([1, 0, 0, 1])
    torch.testing.assert_close(
        loaded(input_ids=ids, attention_mask=mask, task_ids=task_ids).logits,
        served(input_ids=ids, attention_mask=mask, task_ids=task_ids).logits,
    )
    config.update(method="ept", num_virtual_tokens=3, hidden=2, residual=True)
    del config["prompt_init"], config["init_text"], config["init_from"]  # PT-only field
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="stacked ept adapter saves as prompt_tuning"):
        dk.load_adapter(tiny_model("gpt2"), tmp_path)


def test_errors_are_clear():
    served = dk.stack_adapters(task_models("gpt2", "pt"))
    single = task_models("gpt2", "pt", tasks=1)[0]
    ids = batch(b=4)[0]
    with pytest.raises(ValueError, match="serves 3 stacked tasks: pass task_ids"):
        served(input_ids=ids)
    with pytest.raises(ValueError, match="stack_adapters"):
        single(input_ids=ids, task_ids=TASK_IDS)
    with pytest.raises(ValueError, match="stack_adapters"):
        single.generate(input_ids=ids, task_ids=TASK_IDS, max_new_tokens=2)
    with pytest.raises(IndexError, match="task_ids holds id 3"):
        served(input_ids=ids, task_ids=torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="task_ids has 2 entries"):
        served(input_ids=ids, task_ids=torch.tensor([0, 1]))
    # Adapters that cannot share one op call.
    pt = task_models("gpt2", "pt", tasks=1)[0]
    longer = dk.patch(tiny_model("gpt2"), dk.PromptTuningConfig(num_virtual_tokens=6))
    with pytest.raises(ValueError, match="share one length"):
        dk.stack_adapters([pt, longer])
    dept = task_models("gpt2", "dept", tasks=1)[0]
    for change in ({"r": 2}, {"max_length": 32}, {"index": "token"}):
        other = dk.patch(tiny_model("gpt2"), dataclasses.replace(make_config("dept"), **change))
        name = next(iter(change))
        with pytest.raises(ValueError, match=f"adapter 1 has {name}="):
            dk.stack_adapters([dept, other])
    with pytest.raises(ValueError, match="one method"):
        dk.stack_adapters([dept, pt])
    wide = GPT2LMHeadModel(GPT2Config(**{**tiny_config("gpt2").to_dict(), "n_embd": 48}))
    wide_pt = dk.patch(wide, dk.PromptTuningConfig(num_virtual_tokens=5))
    with pytest.raises(ValueError, match="not trained on the same base model"):
        PromptTuningAdapter.stack([pt.dept_adapter, wide_pt.dept_adapter])
    with pytest.raises(TypeError, match=r"PromptTuningAdapter\.stack stacks"):
        PromptTuningAdapter.stack([pt.dept_adapter, dept.dept_adapter])
    # The serving model's hooks must be of the sources' family.
    aot = dk.patch(tiny_model("gpt2"), dk.AoTConfig("fc", r=2))
    with pytest.raises(ValueError, match="patched with a AoTAdapter"):
        dk.stack_adapters([pt], model=aot)
    accelerated = dk.patch(
        peft.get_peft_model(
            tiny_model("gpt2"), peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5)
        )
    )
    with pytest.raises(TypeError, match="accelerated by patch"):
        dk.stack_adapters([pt, accelerated])
    with pytest.raises(TypeError, match="accelerated by patch"):
        dk.stack_adapters([pt], model=accelerated)


def test_a_method_without_stack_is_refused(monkeypatch):
    pt = task_models("gpt2", "pt", tasks=1)[0]
    monkeypatch.delattr(PromptTuningAdapter, "stack")
    with pytest.raises(TypeError, match="PromptTuningAdapter adapters do not stack"):
        dk.stack_adapters([pt])


# --------------------------------------------------------------------------- deep copies


def test_deepcopy_of_a_prompt_model_serves_its_own_adapter():
    model = task_models("gpt2", "dept", tasks=1)[0]
    ids, mask, _ = batch()
    before = model(input_ids=ids, attention_mask=mask).logits
    twin = copy.deepcopy(model)
    randomize(twin.dept_adapter, seed=5)  # as if the copy had been trained on
    reference = dk.patch(tiny_model("gpt2"), make_config("dept"))
    randomize(reference.dept_adapter, seed=5)
    got = twin(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, reference(input_ids=ids, attention_mask=mask).logits)
    assert (got - before).abs().max() > 1e-2
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, before)
    kwargs = {"max_new_tokens": 4, "do_sample": False}
    # The copy's generation against the formula on the unpatched base model.
    base = tiny_model("gpt2")
    adapters = [twin.dept_adapter] * ids.shape[0]
    want = reference_generate("gpt2", base, adapters, ids, None, **kwargs)
    assert torch.equal(twin.generate(input_ids=ids, **kwargs)[:, ids.shape[1] :], want)
    dk.unpatch(twin)
    assert all(not m._forward_pre_hooks for m in twin.modules())
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, before)


def test_deepcopy_of_an_aot_model_serves_its_own_adapter():
    def aot_model(seed):
        model = dk.patch(tiny_model("llama"), dk.AoTConfig("kron", r=4))
        with torch.no_grad():
            for layer in model.dept_adapter.layers:
                layer.w_r.normal_(generator=torch.Generator().manual_seed(seed))
        return model

    model = aot_model(seed=1)
    ids, _, _ = batch()
    before = model(input_ids=ids).logits
    twin = copy.deepcopy(model)
    reference = aot_model(seed=2)
    twin.dept_adapter.load_state_dict(reference.dept_adapter.state_dict())
    got = twin(input_ids=ids).logits
    torch.testing.assert_close(got, reference(input_ids=ids).logits)
    assert (got - before).abs().max() > 1e-2
    torch.testing.assert_close(model(input_ids=ids).logits, before)
    kwargs = {"max_new_tokens": 4, "do_sample": False}
    # The copy's generation against the formula: P_i[ids] added before each layer of the
    # unpatched model.
    base = tiny_model("llama")
    tables = formula_tables(twin.dept_adapter, base.get_input_embeddings().weight)
    hook_reference(base, "llama", [t.detach() for t in tables])
    assert torch.equal(twin.generate(input_ids=ids, **kwargs), base.generate(ids, **kwargs))


def test_deepcopy_of_an_accelerated_peft_model():
    model = peft.get_peft_model(
        tiny_model("gpt2"), peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    )
    dk.patch(model)
    ids, mask, _ = batch()
    before = model(input_ids=ids, attention_mask=mask).logits
    twin = copy.deepcopy(model)
    prompt = twin.prompt_encoder["default"].embedding.weight
    assert dk.adapter(twin).prompt is prompt
    with torch.no_grad():
        prompt.normal_(generator=torch.Generator().manual_seed(3))
    got = twin(input_ids=ids, attention_mask=mask).logits
    dk.unpatch(twin)
    torch.testing.assert_close(got, twin(input_ids=ids, attention_mask=mask).logits, **CLOSE)
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, before)
    assert (got - before).abs().max() > 1e-2
