"""Config validation, initialisation, the equal-budget rule, and the method interface:
registration, parameter groups, the merged (inference) form."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

import dept_kernels as dk
from dept_kernels.methods import (
    METHODS,
    DePTAdapter,
    EPTAdapter,
    MethodConfig,
    PromptAdapter,
    PromptTuningAdapter,
    register_method,
)
from dept_kernels.methods.base import stack_tensors


def table(v=50, d=16):
    return torch.randn(v, d, generator=torch.Generator().manual_seed(0))


def test_equal_budget():
    assert dk.equal_budget(100, 768, 256, num_virtual_tokens=40) == (40, 45)
    assert dk.equal_budget(100, 768, 256, r=45) == (40, 45)
    assert dk.equal_budget(100, 768, 256, r=30) == (60, 30)
    m, r = dk.equal_budget(100, 768, 512, num_virtual_tokens=60)
    assert m * 768 + (512 + 768) * r <= 100 * 768 < m * 768 + (512 + 768) * (r + 1)
    with pytest.raises(ValueError, match="exactly one"):
        dk.equal_budget(100, 768, 256)
    with pytest.raises(ValueError, match="over the budget"):
        dk.equal_budget(10, 768, 256, r=45)


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: dk.DePTConfig(num_virtual_tokens=4.0, r=2), TypeError, "num_virtual_tokens"),
        (lambda: dk.DePTConfig(4, r=-1), ValueError, "r must be >= 0"),
        (lambda: dk.DePTConfig(4, 2, max_length=0), ValueError, "max_length"),
        (lambda: dk.DePTConfig(4, 2, index="row"), ValueError, "index"),
        (lambda: dk.DePTConfig(4, 2, lora_alpha="8"), TypeError, "lora_alpha"),
        (lambda: dk.PromptTuningConfig(0), ValueError, "num_virtual_tokens"),
        (lambda: dk.PromptTuningConfig(4, prompt_init="zeros"), ValueError, "prompt_init"),
        (lambda: dk.PromptTuningConfig(4, prompt_init="text"), ValueError, "init_text"),
        (lambda: dk.PromptTuningConfig(4, init_text=(1, 2)), ValueError, "only used"),
        (lambda: dk.PromptTuningConfig(4, "text", ("a",)), TypeError, "token ids"),
        (lambda: dk.EPTConfig(hidden=0), ValueError, "hidden"),
        (lambda: dk.EPTConfig(residual=1), TypeError, "residual"),
    ],
)
def test_config_validation(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_prompt_inits():
    weight = table()
    random = PromptTuningAdapter(dk.PromptTuningConfig(7), weight).prompt
    assert random.shape == (7, 16) and random.abs().max() <= 0.5
    vocab = PromptTuningAdapter(dk.PromptTuningConfig(7, "vocab"), weight).prompt
    assert all((weight == row).all(-1).any() for row in vocab)
    text = PromptTuningAdapter(dk.PromptTuningConfig(7, "text", [3, 1, 4]), weight).prompt
    torch.testing.assert_close(text, weight[[3, 1, 4, 3, 1, 4, 3]], rtol=0, atol=0)
    trimmed = DePTAdapter(dk.DePTConfig(2, 1, prompt_init="text", init_text=(5, 6, 7)), weight)
    torch.testing.assert_close(trimmed.prompt, weight[[5, 6]], rtol=0, atol=0)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        PromptTuningAdapter(dk.PromptTuningConfig(2, "text", (50,)), weight)


def test_dept_init_and_token_mode():
    weight = table()
    adapter = DePTAdapter(dk.DePTConfig(4, r=3, lora_alpha=6, max_length=20), weight)
    assert adapter.lora_a.shape == (20, 3) and adapter.lora_b.shape == (3, 16)
    assert not adapter.lora_b.any()
    bound = 1 / math.sqrt(3)  # Kaiming-uniform a=sqrt(5) on fan-in r
    assert adapter.lora_a.abs().max() <= bound and adapter.lora_a.abs().max() > bound / 2
    assert adapter.config.scaling == pytest.approx(6 / math.sqrt(3))
    assert dk.DePTConfig(4, r=0).scaling == 0.0
    token = DePTAdapter(dk.DePTConfig(4, r=2, index="token"), weight)
    assert token.lora_a.shape == (50, 2)
    with torch.no_grad():
        token.lora_b.normal_()
    ids = torch.tensor([[3, 3, 9]])
    out = token(ids, weight, position_ids=torch.tensor([[0, 1, 2]]))
    delta = token.config.scaling * token.lora_a[ids[0]] @ token.lora_b
    torch.testing.assert_close(out[0, 4:], weight[ids[0]] + delta)


def test_ept_shapes_and_residual():
    weight = table()
    adapter = EPTAdapter(dk.EPTConfig(num_virtual_tokens=10, hidden=1), weight)
    assert [p.numel() for p in adapter.parameters()] == [16, 16, 16]
    torch.testing.assert_close(adapter.prompt_row(), adapter.prompt.float())  # W_up = 0
    plain = EPTAdapter(dk.EPTConfig(residual=False), weight)
    assert not plain.prompt_row().any()


def test_ept_prompt_inits():
    weight = table()
    text = EPTAdapter(dk.EPTConfig(3, prompt_init="text", init_text=(7, 2)), weight)
    torch.testing.assert_close(text.prompt, weight[[7]], rtol=0, atol=0)
    vocab = EPTAdapter(dk.EPTConfig(prompt_init="vocab"), weight).prompt
    assert (weight == vocab).all(-1).any()
    with pytest.raises(ValueError, match="init_text"):
        dk.EPTConfig(prompt_init="text")


# --------------------------------------------------------------------------- the interface


def _gpt2(seed: int = 0) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=64,
        n_positions=32,
        n_embd=16,
        n_layer=2,
        n_head=2,
        bos_token_id=1,
        eos_token_id=1,
        pad_token_id=0,
    )
    return GPT2LMHeadModel(config).eval()


@dataclass(frozen=True)
class _DoubledConfig(MethodConfig):
    """A method defined outside the library: a prompt read at twice its value."""

    num_virtual_tokens: int

    method: ClassVar[str] = "doubled_prompt"


class _DoubledAdapter(PromptAdapter):
    groups: ClassVar[dict[str, float | None]] = {"prompt": 0.5}

    def __init__(self, config, weight, generator=None):
        super().__init__()
        self.config = config
        self.num_virtual_tokens = config.num_virtual_tokens
        self.prompt = torch.nn.Parameter(torch.randn(config.num_virtual_tokens, weight.shape[1]))

    def op_args(self):
        return {"prompt": 2 * self.active_prompt()}

    def param_groups(self):
        return {"prompt": [self.prompt]}

    @classmethod
    def stack(cls, adapters):
        return adapters[0].with_parameters(prompt=stack_tensors([a.prompt for a in adapters]))


@pytest.fixture
def doubled_method():
    """`_DoubledConfig` registered for one test, as a third-party method module would."""
    register_method(_DoubledConfig, _DoubledAdapter)
    yield
    del METHODS[_DoubledConfig]


def test_a_registered_method_needs_no_generic_module_change(doubled_method, tmp_path):
    """patch, param_groups, save/load, merge and stack_adapters serve a method they never
    name, through the Adapter interface and the registry."""
    model = dk.patch(_gpt2(), _DoubledConfig(3))
    adapter = dk.adapter(model)
    assert isinstance(adapter, _DoubledAdapter)
    ids = torch.randint(2, 64, (2, 5), generator=torch.Generator().manual_seed(0))
    logits = model(input_ids=ids).logits
    base = _gpt2()
    embeds = torch.cat(
        [2 * adapter.prompt.detach().expand(2, 3, 16), base.get_input_embeddings()(ids)], 1
    )
    torch.testing.assert_close(logits, base(inputs_embeds=embeds).logits)
    assert dk.param_groups(model) == [{"params": [adapter.prompt], "lr": 0.5, "weight_decay": 0.01}]
    assert dk.merge(model) is model and dk.adapter(model) is adapter
    dk.save_adapter(model, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config == {"method": "doubled_prompt", "num_virtual_tokens": 3, "num_tasks": None}
    loaded = dk.load_adapter(_gpt2(), tmp_path / "a")
    torch.testing.assert_close(loaded(input_ids=ids).logits, logits)
    served = dk.stack_adapters([tmp_path / "a", model], model=_gpt2())
    out = served(input_ids=ids, task_ids=torch.tensor([1, 0])).logits
    torch.testing.assert_close(out, logits)


def test_register_method_refuses_bad_entries():
    with pytest.raises(TypeError, match="MethodConfig"):
        register_method(dict, _DoubledAdapter)
    with pytest.raises(TypeError, match="Adapter"):
        register_method(_DoubledConfig, torch.nn.Linear)

    @dataclass(frozen=True)
    class Clash(MethodConfig):
        method: ClassVar[str] = "dept"

    with pytest.raises(ValueError, match="'dept' is taken by DePTConfig"):
        register_method(Clash, _DoubledAdapter)
    assert Clash not in METHODS


def test_param_groups_default_rates_and_names():
    dept = dk.patch(_gpt2(), dk.DePTConfig(2, r=2))
    assert [g["lr"] for g in dk.param_groups(dept)] == [3e-1, 1e-4]  # the paper's pair
    assert [g["lr"] for g in dk.param_groups(dept, lowrank_lr=1e-3)] == [3e-1, 1e-3]
    # A rate for a group the adapter lacks is ignored; an unknown name is an error.
    pt = dk.patch(_gpt2(), dk.PromptTuningConfig(2))
    assert [g["lr"] for g in dk.param_groups(pt, lowrank_lr=1e-3)] == [3e-1]
    with pytest.raises(TypeError, match=r"unknown arguments \['prompt_rate'\]"):
        dk.param_groups(pt, prompt_rate=0.1)
    ept = dk.patch(_gpt2(), dk.EPTConfig(2))
    with pytest.raises(ValueError, match="EPTAdapter has parameters that need prompt_lr"):
        dk.param_groups(ept, lowrank_lr=1e-3)


def test_merge_is_the_one_inference_form():
    ids = torch.randint(2, 64, (2, 5), generator=torch.Generator().manual_seed(1))
    ept = dk.patch(_gpt2(), dk.EPTConfig(3, hidden=2))
    with torch.no_grad():
        dk.adapter(ept).w_up.normal_()
    before = ept(input_ids=ids).logits
    assert isinstance(dk.adapter(dk.merge(ept)), PromptTuningAdapter)
    torch.testing.assert_close(ept(input_ids=ids).logits, before)
    aot = dk.patch(_gpt2(), dk.AoTConfig("kron", r=2, dropout=0.0))
    with torch.no_grad():
        for layer in dk.adapter(aot).layers:
            layer.w_r.normal_()
    unfused = dk.adapter(aot)
    before = aot(input_ids=ids).logits
    dk.merge(aot)
    assert dk.adapter(aot).fused and not unfused.fused  # a new module; the old one unchanged
    torch.testing.assert_close(aot(input_ids=ids).logits, before)
    assert dk.merge(aot) is aot  # already merged
    dept = dk.patch(_gpt2(), dk.DePTConfig(2, r=2))
    same = dk.adapter(dept)
    assert dk.adapter(dk.merge(dept)) is same  # trained form is the inference form


def test_fold_and_fuse_are_deprecated_aliases():
    ept = dk.patch(_gpt2(), dk.EPTConfig(2))
    with pytest.warns(DeprecationWarning, match="use dept_kernels.merge"):
        dk.fold(ept)
    assert isinstance(dk.adapter(ept), PromptTuningAdapter)
    aot = dk.patch(_gpt2(), dk.AoTConfig("fc", r=2))
    adapter = dk.adapter(aot)
    with pytest.warns(DeprecationWarning, match="use dept_kernels.merge"):
        dk.fuse(aot)
    assert adapter.fused and dk.adapter(aot) is adapter  # in place, as it always was
    with pytest.warns(DeprecationWarning, match="use merged"):
        EPTAdapter(dk.EPTConfig(), table()).fold()


def test_stack_adapters_merges_unfused_sources():
    ids = torch.randint(2, 64, (2, 5), generator=torch.Generator().manual_seed(2))
    models = []
    for seed in (0, 1):
        model = dk.patch(_gpt2(), dk.AoTConfig("kron", r=2, dropout=0.0))
        with torch.no_grad():
            for layer in dk.adapter(model).layers:
                layer.w_r.copy_(
                    torch.randn(layer.w_r.shape, generator=torch.Generator().manual_seed(seed))
                )
        models.append(model)
    singles = [m(input_ids=ids).logits for m in models]
    served = dk.stack_adapters(models, model=_gpt2())
    out = served(input_ids=ids, task_ids=torch.tensor([1, 0])).logits
    torch.testing.assert_close(out[0], singles[1][0])
    torch.testing.assert_close(out[1], singles[0][1])
    assert not any(dk.adapter(m).fused for m in models)  # the sources are left as they are


def test_is_patched():
    model = _gpt2()
    assert not dk.is_patched(model)
    dk.patch(model, dk.PromptTuningConfig(2))
    assert dk.is_patched(model)
    dk.unpatch(model)
    assert not dk.is_patched(model)
