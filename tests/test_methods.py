"""Config validation, initialisation and the equal-budget rule."""

from __future__ import annotations

import math

import pytest
import torch

import dept_kernels as dk
from dept_kernels.methods import DePTAdapter, EPTAdapter, PromptTuningAdapter


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
