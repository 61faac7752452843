"""save_adapter / load_adapter and the official DePT checkpoint format."""

from __future__ import annotations

import copy
import functools
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from helpers.models import batch, make_config, patched_pair, tiny_model
from transformers import T5Config, T5ForConditionalGeneration

import dept_kernels as dk

OFFICIAL = Path(__file__).parent / "fixtures" / "dept_official" / "cola"


@pytest.mark.parametrize(
    ("arch", "method"),
    [("t5", "dept"), ("gpt2", "ept"), ("llama", "pt"), ("qwen2", "dept"), ("gemma", "dept")],
)
def test_save_load_roundtrip(tmp_path, arch, method):
    _, model = patched_pair(arch, method)
    dk.save_adapter(model, tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {
        "adapter_config.json",
        "adapter_model.safetensors",
    }
    assert json.loads((tmp_path / "adapter_config.json").read_text())["method"] == {
        "dept": "dept", "ept": "ept", "pt": "prompt_tuning"
    }[method]  # fmt: skip
    fresh = dk.load_adapter(tiny_model(arch), tmp_path)  # patches on the way
    ids, mask, labels = batch()
    kwargs = {"labels": labels} if arch == "t5" else {}
    torch.testing.assert_close(
        fresh(input_ids=ids, attention_mask=mask, **kwargs).logits,
        model(input_ids=ids, attention_mask=mask, **kwargs).logits,
    )
    for name, p in model.dept_adapter.state_dict().items():
        assert torch.equal(fresh.dept_adapter.state_dict()[name], p)
    dk.load_adapter(fresh, tmp_path)  # an already patched model with the same config


def test_load_adapter_mismatches(tmp_path):
    _, model = patched_pair("gpt2", "dept")
    dk.save_adapter(model, tmp_path)
    other = dk.patch(tiny_model("gpt2"), dk.DePTConfig(num_virtual_tokens=4, r=2, max_length=16))
    with pytest.raises(ValueError, match="patched with"):
        dk.load_adapter(other, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "method": "lora"}))
    with pytest.raises(ValueError, match="method must be one of"):
        dk.load_adapter(tiny_model("gpt2"), tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "rank": 3}))
    with pytest.raises(ValueError, match="bad dept config"):
        dk.load_adapter(tiny_model("gpt2"), tmp_path)
    # Weights whose shapes disagree with the config.
    wide = dk.patch(tiny_model("gpt2"), dk.DePTConfig(num_virtual_tokens=4, r=3, max_length=32))
    dk.save_adapter(wide, tmp_path / "wide")
    shutil.copy(tmp_path / "wide" / "adapter_model.safetensors", tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"lora_a has shape \(32, 3\)"):
        dk.load_adapter(tiny_model("gpt2"), tmp_path)
    with pytest.raises(FileNotFoundError):
        dk.load_adapter(tiny_model("gpt2"), tmp_path / "missing")


def t5_base_width() -> T5ForConditionalGeneration:
    """t5-base widths where the adapter touches them (d=768, V=32128), everything else tiny."""
    return copy.deepcopy(_t5_base_width())


@functools.cache
def _t5_base_width() -> T5ForConditionalGeneration:
    torch.manual_seed(0)
    config = T5Config(
        vocab_size=32128, d_model=768, d_kv=8, num_heads=2, d_ff=16, num_layers=1,
        num_decoder_layers=1, dropout_rate=0.0, decoder_start_token_id=0,
    )  # fmt: skip
    return T5ForConditionalGeneration(config).eval()


def official_formula(model, ids, state, config):
    """The official code's encoder input at s = max_length."""
    scaling = config["lora_alpha"] / math.sqrt(config["r"])
    a, b = state["prompt_encoder.lora_embedding_A"], state["prompt_encoder.lora_embedding_B"]
    tokens = model.shared.weight[ids] + scaling * (a @ b)
    prompt = state["prompt_embeddings"].expand(ids.shape[0], -1, -1)
    return torch.cat([prompt, tokens], dim=1)


def encoder_input(model, ids):
    """What the first encoder block receives (dropout is off in eval)."""
    seen = {}
    hook = model.encoder.block[0].register_forward_pre_hook(
        lambda mod, args: seen.setdefault("x", args[0])
    )
    with torch.no_grad():
        model.get_encoder()(input_ids=ids)
    hook.remove()
    return seen["x"]


def test_official_checkpoint_matches_official_formula():
    config = json.loads((OFFICIAL / "adapter_config.json").read_text())
    state = torch.load(OFFICIAL / "adapter_model.bin", map_location="cpu", weights_only=True)
    model = dk.load_dept_checkpoint(t5_base_width(), OFFICIAL)
    adapter = model.dept_adapter
    assert adapter.config == dk.DePTConfig(80, 15, lora_alpha=8, max_length=256)
    ids = torch.randint(0, 32128, (2, 256), generator=torch.Generator().manual_seed(0))
    want = official_formula(model, ids, state, config)
    torch.testing.assert_close(encoder_input(model, ids), want, atol=1e-5, rtol=1e-5)
    # Shorter inputs get the first s rows of A @ B: the official formula's prefix.
    short = encoder_input(model, ids[:, :40])
    torch.testing.assert_close(short, want[:, : 80 + 40], atol=1e-5, rtol=1e-5)


def test_official_checkpoint_with_prompt_only(tmp_path):
    state = torch.load(OFFICIAL / "adapter_model.bin", map_location="cpu", weights_only=True)
    shutil.copy(OFFICIAL / "adapter_config.json", tmp_path)
    torch.save({"prompt_embeddings": state["prompt_embeddings"]}, tmp_path / "adapter_model.bin")
    model = dk.load_dept_checkpoint(t5_base_width(), tmp_path / "adapter_model.bin")
    adapter = model.dept_adapter
    assert torch.equal(adapter.prompt, state["prompt_embeddings"])
    assert not adapter.lora_b.any()  # the official init: the delta is zero
    ids = torch.randint(0, 32128, (1, 12), generator=torch.Generator().manual_seed(1))
    want = torch.cat([state["prompt_embeddings"][None], model.shared.weight[ids]], dim=1)
    torch.testing.assert_close(encoder_input(model, ids), want)


def test_official_checkpoint_errors(tmp_path):
    config = json.loads((OFFICIAL / "adapter_config.json").read_text())
    shutil.copy(OFFICIAL / "adapter_model.bin", tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "LORA"}))
    with pytest.raises(ValueError, match="PROMPT_TUNING_LORA"):
        dk.load_dept_checkpoint(t5_base_width(), tmp_path)
    with pytest.raises(ValueError, match="token_dim=768"):
        dk.load_dept_checkpoint(tiny_model("t5"), OFFICIAL)
    patched = dk.patch(t5_base_width(), make_config("dept"))
    with pytest.raises(ValueError, match="patched with"):
        dk.load_dept_checkpoint(patched, OFFICIAL)
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "r": 16}))
    with pytest.raises(ValueError, match="lora_embedding_A has shape"):
        dk.load_dept_checkpoint(t5_base_width(), tmp_path)


def test_official_checkpoint_with_two_submodules(tmp_path):
    """PEFT's seq2seq default saves m prompt rows per submodule; the official code feeds the
    first m to the encoder, and so does the loaded adapter."""
    config = json.loads((OFFICIAL / "adapter_config.json").read_text())
    state = torch.load(OFFICIAL / "adapter_model.bin", map_location="cpu", weights_only=True)
    decoder_rows = torch.randn(state["prompt_embeddings"].shape)
    two = {**state, "prompt_embeddings": torch.cat([state["prompt_embeddings"], decoder_rows])}
    torch.save(two, tmp_path / "adapter_model.bin")
    config["num_transformer_submodules"] = 2
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    model = dk.load_dept_checkpoint(t5_base_width(), tmp_path)
    ids = torch.randint(0, 32128, (2, 256), generator=torch.Generator().manual_seed(0))
    want = official_formula(model, ids, state, {**config, "num_transformer_submodules": 1})
    torch.testing.assert_close(encoder_input(model, ids), want, atol=1e-5, rtol=1e-5)
    config["num_transformer_submodules"] = 3
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="num_transformer_submodules=3"):
        dk.load_dept_checkpoint(t5_base_width(), tmp_path)


@pytest.mark.parametrize(
    ("flags", "loads_a", "loads_b"),
    [
        ({"load_lora_embeddings": False}, False, False),
        ({"load_lora_embedding_B": False}, True, False),
        ({}, True, True),
    ],
)
def test_official_load_flags_onto_a_trained_adapter(tmp_path, flags, loads_a, loads_b):
    """The config's load flags pick what is read. Loaded onto a patched model whose B is
    non-zero (trained), a load without B sets the official B = 0: no delta."""
    config = json.loads((OFFICIAL / "adapter_config.json").read_text())
    state = torch.load(OFFICIAL / "adapter_model.bin", map_location="cpu", weights_only=True)
    shutil.copy(OFFICIAL / "adapter_model.bin", tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, **flags}))
    model = dk.patch(t5_base_width(), dk.DePTConfig(80, 15, lora_alpha=8, max_length=256))
    adapter = model.dept_adapter
    with torch.no_grad():
        adapter.lora_b.normal_(generator=torch.Generator().manual_seed(3))
    a_before = adapter.lora_a.detach().clone()
    assert dk.load_dept_checkpoint(model, tmp_path) is model
    assert torch.equal(adapter.prompt, state["prompt_embeddings"])
    file_a = state["prompt_encoder.lora_embedding_A"]
    assert torch.equal(adapter.lora_a, file_a if loads_a else a_before)
    ids = torch.randint(0, 32128, (2, 256), generator=torch.Generator().manual_seed(2))
    if loads_b:
        assert torch.equal(adapter.lora_b, state["prompt_encoder.lora_embedding_B"])
        want = official_formula(model, ids, state, config)
    else:
        assert not adapter.lora_b.any()
        prompt = state["prompt_embeddings"].expand(2, -1, -1)
        want = torch.cat([prompt, model.shared.weight[ids]], dim=1)
    torch.testing.assert_close(encoder_input(model, ids), want, atol=1e-5, rtol=1e-5)
