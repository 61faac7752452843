"""Errors at the model seam name the model's terms.

- GPT-2's learned position table has n_positions rows; the prompt's m rows use m of them.
- A model converted after patching (model.double()) is named as such, not as the op's table.
"""

from __future__ import annotations

import pytest
import torch
from helpers.models import VOCAB, make_config, tiny_model

import dept_kernels as dk


@pytest.mark.parametrize("method", ["pt", "dept"])
def test_gpt2_prompt_pushes_past_the_position_table(method):
    config = make_config(method, max_length=64)
    model = dk.patch(tiny_model("gpt2"), config)  # n_positions = 64
    m = model.dept_adapter.num_virtual_tokens
    fits = torch.randint(2, VOCAB, (2, 64 - m))
    assert model(input_ids=fits).logits.shape[1] == 64
    with pytest.raises(
        ValueError,
        match=rf"prompt's {m} rows and {65 - m} tokens need 65 positions.*n_positions\) has 64",
    ):
        model(input_ids=torch.randint(2, VOCAB, (2, 65 - m)))
    with pytest.raises(ValueError, match=r"after 64 cached, need 65 positions"):
        model.generate(input_ids=fits, max_new_tokens=2, do_sample=False)


def test_model_converted_after_patching_is_named():
    model = dk.patch(tiny_model("llama"), make_config("dept")).double()
    with pytest.raises(
        TypeError, match=r"the model's input embedding is torch.float64.*model.float\(\)"
    ):
        model(input_ids=torch.randint(2, VOCAB, (2, 5)))
