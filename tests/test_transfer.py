"""Transfer from a source-task adapter (the DePT paper's few-shot setting): the prompt and the
low-rank pair start from a saved adapter or an official DePT checkpoint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers.models import batch, make_config, randomize, tiny_model
from transformers import T5Config, T5ForConditionalGeneration

import dept_kernels as dk

OFFICIAL = Path(__file__).parent / "fixtures" / "dept_official" / "cola"


def trained_source(tmp_path, method: str = "dept", arch: str = "gpt2") -> tuple[Path, object]:
    """A saved source adapter with non-initial values everywhere, and its model."""
    model = dk.patch(tiny_model(arch), make_config(method))
    randomize(dk.adapter(model), seed=7)
    dk.save_adapter(model, tmp_path / "source")
    return tmp_path / "source", model


def transfer(config, source: Path):
    return type(config)(**{**config.__dict__, "prompt_init": "adapter", "init_from": source})


@pytest.mark.parametrize("arch", ["gpt2", "t5"])
def test_dept_starts_from_the_source_prompt_and_pair(tmp_path, arch):
    source, trained = trained_source(tmp_path, arch=arch)
    target = dk.patch(tiny_model(arch), transfer(make_config("dept"), source))
    got, want = dk.adapter(target), dk.adapter(trained)
    for name in ("prompt", "lora_a", "lora_b"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    assert got.config.init_from == str(source)
    ids, mask, labels = batch()
    same = {"input_ids": ids, "attention_mask": mask, "labels": labels if arch == "t5" else ids}
    torch.testing.assert_close(target(**same).loss, trained(**same).loss, rtol=0, atol=0)
    # Training moves the copies, not the source's tensors.
    target(**same).loss.backward()
    assert got.lora_b.grad.abs().sum() > 0 and got.prompt is not want.prompt


def test_prompt_tuning_from_a_prompt_tuning_or_dept_source(tmp_path):
    pt_source, pt_trained = trained_source(tmp_path / "pt", "pt")
    pt = dk.patch(tiny_model("gpt2"), transfer(make_config("pt"), pt_source))
    assert torch.equal(dk.adapter(pt).prompt, dk.adapter(pt_trained).prompt)
    dept_source, dept_trained = trained_source(tmp_path / "dept", "dept")
    four = dk.PromptTuningConfig(4, prompt_init="adapter", init_from=dept_source)
    from_dept = dk.patch(tiny_model("gpt2"), four)
    assert torch.equal(dk.adapter(from_dept).prompt, dk.adapter(dept_trained).prompt)
    # A prompt-tuning source has no pair: DePT keeps the official init (B = 0).
    dept = dk.patch(
        tiny_model("gpt2"), dk.DePTConfig(5, r=3, prompt_init="adapter", init_from=pt_source)
    )
    assert torch.equal(dk.adapter(dept).prompt, dk.adapter(pt_trained).prompt)
    assert not dk.adapter(dept).lora_b.any()


def test_dept_from_the_official_checkpoint():
    config = T5Config(
        vocab_size=128, d_model=768, d_kv=8, num_heads=2, d_ff=32, num_layers=1,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    )  # fmt: skip
    fields = json.loads((OFFICIAL / "adapter_config.json").read_text())
    dept = dk.DePTConfig(
        fields["num_virtual_tokens"], r=fields["r"], lora_alpha=fields["lora_alpha"],
        max_length=fields["max_length"], prompt_init="adapter", init_from=OFFICIAL,
    )  # fmt: skip
    model = dk.patch(T5ForConditionalGeneration(config), dept)
    state = torch.load(OFFICIAL / "adapter_model.bin", map_location="cpu", weights_only=True)
    adapter = dk.adapter(model)
    assert torch.equal(adapter.prompt, state["prompt_embeddings"])
    a = next(v for k, v in state.items() if k.endswith("lora_embedding_A"))
    b = next(v for k, v in state.items() if k.endswith("lora_embedding_B"))
    assert torch.equal(adapter.lora_a, a) and torch.equal(adapter.lora_b, b)
    # The same tensors as loading the checkpoint itself.
    loaded = dk.adapter(dk.load_dept_checkpoint(T5ForConditionalGeneration(config), OFFICIAL))
    for name in ("prompt", "lora_a", "lora_b"):
        assert torch.equal(getattr(loaded, name), getattr(adapter, name)), name


def test_a_transferred_adapter_saves_and_loads_without_its_source(tmp_path):
    source, _ = trained_source(tmp_path)
    config = transfer(make_config("dept"), source)
    model = dk.patch(tiny_model("gpt2"), config)
    randomize(dk.adapter(model), seed=11)  # trained on the target since
    dk.save_adapter(model, tmp_path / "target")
    shutil.rmtree(source)
    loaded = dk.load_adapter(tiny_model("gpt2"), tmp_path / "target")
    assert dk.adapter(loaded).config == config
    for name, p in dk.adapter(model).named_parameters():
        assert torch.equal(dict(dk.adapter(loaded).named_parameters())[name], p), name
    served = dk.stack_adapters([model, tmp_path / "target"])
    assert dk.adapter(served).num_tasks == 2


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda s: dk.DePTConfig(4, r=2, prompt_init="adapter", init_from=s), ValueError,
         r"has r=3, the config 2: a transferred adapter keeps the source's r"),
        (lambda s: dk.DePTConfig(4, r=3, max_length=32, prompt_init="adapter", init_from=s),
         ValueError, r"has max_length=16, the config 32"),
        (lambda s: dk.PromptTuningConfig(6, prompt_init="adapter", init_from=s), ValueError,
         r"has num_virtual_tokens=4, the config 6"),
        (lambda s: dk.DePTConfig(4, r=3, prompt_init="adapter", init_from=s / "missing"),
         FileNotFoundError, r"init_from: no adapter at .*missing"),
        (lambda s: dk.DePTConfig(4, r=3, prompt_init="adapter", init_from=s.parent),
         FileNotFoundError, r"init_from: no adapter config at"),
    ],
)  # fmt: skip
def test_a_source_that_does_not_fit_says_what_differs(tmp_path, make, error, match):
    source, _ = trained_source(tmp_path)
    with pytest.raises(error, match=match):
        dk.patch(tiny_model("gpt2"), make(source))


def test_transfer_arguments_are_checked(tmp_path):
    with pytest.raises(ValueError, match="prompt_init='adapter' and init_from"):
        dk.DePTConfig(4, r=3, prompt_init="adapter")
    with pytest.raises(ValueError, match="prompt_init='adapter' and init_from"):
        dk.PromptTuningConfig(4, init_from=tmp_path)
    with pytest.raises(TypeError, match="init_from must be a path"):
        dk.PromptTuningConfig(4, prompt_init="adapter", init_from=3)
    with pytest.raises(ValueError, match="prompt_init must be one of"):
        dk.EPTConfig(prompt_init="adapter")  # EPT has no transfer
    aot = dk.patch(tiny_model("gpt2"), dk.AoTConfig("kron", r=2))
    dk.save_adapter(aot, tmp_path / "aot")
    with pytest.raises(ValueError, match="holds a 'aot' adapter; a source for transfer"):
        dk.patch(
            tiny_model("gpt2"),
            dk.PromptTuningConfig(4, prompt_init="adapter", init_from=tmp_path / "aot"),
        )
    wide = dk.patch(tiny_model("gpt2"), make_config("pt"))
    dk.save_adapter(wide, tmp_path / "pt")
    with pytest.raises(
        ValueError, match=r"prompt has shape \(5, 32\); the model needs \(m, d=768\)"
    ):
        config = T5Config(vocab_size=128, d_model=768, d_kv=8, num_heads=2, d_ff=32, num_layers=1)
        dk.patch(T5ForConditionalGeneration(config), transfer(make_config("pt"), tmp_path / "pt"))
