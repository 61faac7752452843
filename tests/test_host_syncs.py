"""Host syncs per training step (issue 18, part 2), counted on CPU by `helpers.syncs`.

On a GPU each counted call waits for the device: `.item()`-style reads, and the ops whose
output size depends on the data (`nonzero`, `torch.unique`). A training step reads at most
once per forward (the range check of all the op's ids, one flag) and never in backward;
AoT's distinct ids (one `torch.unique`) run once per forward and serve every layer and the
backward. Sync-free mode (no read at all) is `tests/test_sync_free.py`.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from helpers import aot, models
from helpers.syncs import SyncCounter, library_step

import dept_kernels as dk

UNIQUE = ("aten::_unique2", "aten::unique_dim", "aten::unique_consecutive", "aten::_unique")


def _unique_calls(syncs: SyncCounter) -> int:
    return sum(syncs.counts[name] for name in UNIQUE)


def test_counter_counts_reads_and_data_dependent_sizes():
    x = torch.tensor([3, 1, 3])
    with SyncCounter() as syncs:
        x.sum().item()
    assert syncs.counts == {"scalar read": 1}
    with SyncCounter() as syncs:
        int(x[0])
        x.nonzero()
        torch.unique(x, return_inverse=True)
    assert syncs.counts == {
        "scalar read": 1,
        "aten::nonzero": 1,
        "aten::_unique2": 1,
    }
    with SyncCounter() as syncs:
        (x * 2).sum()
    assert syncs.total == 0


def test_counter_counts_what_reads_without_a_local_scalar():
    """`.tolist()` of a CPU tensor dispatches no op; `repeat_interleave` reads its repeats'
    sum unless given it. (`bool(t)` below autograd, in a custom op's body, is `is_nonzero`:
    the next test.)"""
    x, repeats = torch.tensor([3, 1, 3]), torch.tensor([1, 0, 2])
    with SyncCounter() as syncs:
        x.tolist()
        torch.repeat_interleave(x, repeats)
        torch.equal(x, x)
    assert syncs.counts == {
        "Tensor.tolist": 1,
        "aten::repeat_interleave": 1,
        "scalar read": 1,
    }
    with SyncCounter() as syncs:
        torch.repeat_interleave(x, repeats, output_size=3)
    assert syncs.total == 0
    assert torch.Tensor.tolist is torch._C.TensorBase.tolist  # unwrapped on exit


def test_counter_sees_inside_the_library_custom_ops():
    with SyncCounter() as syncs:
        dk.ops.aot.distinct_ids(torch.tensor([[4, 1, 4]]), 5)
    # The range check is one read (`bool` of a flag); the distinct ids are one unique.
    assert syncs.counts == {"scalar read": 1, "aten::_unique2": 1}


@pytest.mark.parametrize(
    "copy_with", [None, copy.deepcopy, lambda m: pickle.loads(pickle.dumps(m))]
)
@pytest.mark.parametrize("reparam", aot.REPARAMS)
def test_aot_training_step(reparam, copy_with):
    """T5's encoder has two AoT layers. The forward finds the batch's distinct ids once for
    both (one unique) and checks the ids' range with one read, not once per layer; the
    backward reads nothing: each table gradient is a segmented sum over the rows the forward
    found, whose count is a shape. So does a copy of the patched model, taken after a step."""
    base, model = aot.patched_pair("t5", reparam)
    if copy_with is not None:
        model.train()
        aot.scalar(aot.run("t5", model, aot.batch(seed=1))).backward()
        model = copy_with(model)
        model.zero_grad(set_to_none=True)
    assert len(model.dept_adapter.layers) > 1
    ids = aot.batch()
    forward, backward = library_step(base, model, lambda m: aot.scalar(aot.run("t5", m, ids)))
    assert all(p.grad is not None for p in model.dept_adapter.parameters())
    assert forward == {"aten::_unique2": 1, "scalar read": 1}, forward
    assert backward == {}, backward


def _dept_loss(ids, mask, labels, **extra):
    return lambda m: m(input_ids=ids, attention_mask=mask, labels=labels, **extra).loss


@pytest.mark.parametrize("trim_padding", [None, False])
def test_dept_training_step_t5(trim_padding):
    """One DePT training step (T5): the fused op checks all its ids with one read; the
    padding trim, on by default for T5, reads the mask once (`.tolist()`) to find the
    columns to cut. The backward reads nothing."""
    base = models.tiny_model("t5")
    model = dk.patch(copy.deepcopy(base), models.make_config("dept"), trim_padding=trim_padding)
    models.randomize(model.dept_adapter)
    ids, mask, labels = models.batch()
    forward, backward = library_step(base, model, _dept_loss(ids, mask, labels))
    trim = {"Tensor.tolist": 1} if trim_padding is None else {}
    assert forward == {"scalar read": 1, **trim}, forward
    assert backward == {}, backward


def test_dept_training_step_with_position_rows():
    """Left padding with position ids (GPT-2): the low-rank rows are gathered per token
    (not row t for token t). The op checks input and position ids with one read, and the
    backward groups the tokens by row without `torch.unique` (the row count L is a shape)."""
    base, model = models.patched_pair("gpt2", "dept")
    ids, mask, _ = models.batch()
    mask[0, :3] = 0
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    forward, backward = library_step(
        base, model, _dept_loss(ids, mask, ids, position_ids=positions)
    )
    assert forward == {"scalar read": 1}, forward
    assert backward == {}, backward


def test_multitask_training_step():
    """Stacked DePT adapters trained on a mixed batch: the backward forms each task's
    low-rank gradients without splitting the rows per task on the host (no `.tolist()`,
    no `unique_consecutive`)."""
    base = models.tiny_model("gpt2")
    tasks = []
    for t in range(3):
        model = dk.patch(copy.deepcopy(base), models.make_config("dept"))
        models.randomize(model.dept_adapter, seed=10 + t)
        tasks.append(model)
    served = dk.stack_adapters(tasks)
    ids, mask, _ = models.batch(b=4)
    task_ids = torch.tensor([1, 0, 2, 1])

    def loss(m):
        extra = {"task_ids": task_ids} if m is served else {}
        return _dept_loss(ids, mask, ids, **extra)(m)

    forward, backward = library_step(base, served, loss)
    assert served.dept_adapter.lora_a.grad is not None
    assert forward == {"scalar read": 1}, forward
    assert backward == {}, backward
