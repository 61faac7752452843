"""1,000 training steps of a patched tiny model leave nothing behind.

After a warm-up (optimizer state, allocator pools, lazily built caches), the process's
resident memory (/proc/self/statm) and the number of live tensors (`gc`) must not grow over
1,000 forward/backward/step iterations, and after every step the hooks hold no tensors of
a finished call: task ids, AoT's ids, the records kept for checkpoint recomputation.
"""

from __future__ import annotations

import copy
import gc
import os
from pathlib import Path

import pytest
import torch
from helpers import aot, models
from helpers.hooks import assert_hook_state_empty, wrap_layers

import dept_kernels as dk

WARMUP = 50
ITERATIONS = 1000
# A leaked step graph holds its activations (tens of KiB here), so a leak over 1,000 steps
# is tens of MiB; allocator noise stays well below this bound.
RSS_SLACK = 8 * 2**20

STATM = Path("/proc/self/statm")


def rss_bytes() -> int:
    return int(STATM.read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def live_tensors() -> int:
    gc.collect()
    # issubclass of the type: isinstance would read `__class__` of every object, and some
    # (deprecated torch aliases) warn when touched.
    return sum(issubclass(type(o), torch.Tensor) for o in gc.get_objects())


def patched(case: str) -> torch.nn.Module:
    """A tiny GPT-2 patched for `case`, in training mode."""
    base = models.tiny_model("gpt2")
    if case == "dept":
        model = dk.patch(copy.deepcopy(base), models.make_config("dept", max_length=16))
        models.randomize(model.dept_adapter)
    else:
        reparam = case.split("-")[1]
        model = dk.patch(copy.deepcopy(base), dk.AoTConfig(reparam, r=4))
        aot.randomize(model.dept_adapter)
        if case.endswith("checkpointed"):
            wrap_layers(model, reentrant=False)
    return model.train()


@pytest.mark.skipif(not STATM.exists(), reason="needs Linux's /proc/self/statm")
@pytest.mark.parametrize("case", ["dept", "aot-kron-checkpointed"])
@pytest.mark.usefixtures("one_thread")
def test_training_steps_do_not_grow_memory(case):
    torch.manual_seed(0)
    model = patched(case)
    opt = torch.optim.AdamW(model.dept_adapter.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(2, models.VOCAB, (4, 16), generator=gen) for _ in range(8)]

    def step(i: int) -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        ids = batches[i % len(batches)]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        return loss

    for i in range(WARMUP):
        step(i)
    tensors_before, rss_before = live_tensors(), rss_bytes()
    for i in range(ITERATIONS):
        loss = step(i)  # held, as a training loop holds it for logging
        assert_hook_state_empty(model)
        assert torch.isfinite(loss)
    del loss
    tensors_after, rss_after = live_tensors(), rss_bytes()
    print(
        f"{case}: live tensors {tensors_before} -> {tensors_after}, "
        f"RSS {rss_before / 2**20:.1f} -> {rss_after / 2**20:.1f} MiB"
    )
    assert tensors_after == tensors_before
    assert rss_after - rss_before < RSS_SLACK
