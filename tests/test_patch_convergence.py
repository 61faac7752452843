"""200 DePT training steps: the patched model tracks the formula reference and learns."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers.models import VOCAB, patched_pair, reference_forward

import dept_kernels as dk

STEPS = 200


def synthetic_batch(gen: torch.Generator, b: int = 16, s: int = 8):
    """Target: token 2 + (first id mod 2), then </s>; the first id is 10 or 11."""
    ids = torch.randint(2, VOCAB, (b, s), generator=gen)
    ids[:, 0] = 10 + torch.randint(0, 2, (b,), generator=gen)
    labels = torch.stack([2 + ids[:, 0] % 2, torch.ones(b, dtype=torch.long)], dim=1)
    return ids, torch.ones(b, s, dtype=torch.long), labels


@pytest.mark.usefixtures("one_thread")
def test_dept_training_matches_reference_and_converges():
    base, model = patched_pair("t5", "dept")
    with torch.no_grad():
        model.dept_adapter.lora_b.zero_()  # the real init: the delta starts at zero
    ref_adapter = copy.deepcopy(model.dept_adapter)
    opt = torch.optim.AdamW(dk.param_groups(model, prompt_lr=0.3, lowrank_lr=1e-2))
    ref_opt = torch.optim.AdamW(
        [
            {"params": [ref_adapter.prompt], "lr": 0.3, "weight_decay": 0.01},
            {"params": [ref_adapter.lora_a, ref_adapter.lora_b], "lr": 1e-2, "weight_decay": 0.01},
        ]
    )
    gen = torch.Generator().manual_seed(0)
    losses, ref_losses = [], []
    for _ in range(STEPS):
        ids, mask, labels = synthetic_batch(gen)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        ref_loss = reference_forward("t5", base, ref_adapter, ids, mask, labels).loss
        ref_loss.backward()
        ref_opt.step()
        ref_opt.zero_grad()
        losses.append(loss.item())
        ref_losses.append(ref_loss.item())
    losses, ref_losses = torch.tensor(losses), torch.tensor(ref_losses)
    torch.testing.assert_close(losses, ref_losses, atol=2e-3, rtol=2e-3)
    assert losses[-20:].mean() < 0.5 * losses[0]
    assert model.dept_adapter.lora_b.abs().sum() > 0  # the low-rank pair trained too
