"""Host syncs per training step (issue 18, part 2), counted on CPU by `helpers.syncs`.

On a GPU each counted call waits for the device: `.item()`-style reads, and the ops whose
output size depends on the data (`nonzero`, `torch.unique`). A training step reads at most
once per forward (the range check of all the op's ids, one flag) and never in backward;
AoT's distinct ids are found once per forward, their count read with the range flag in that
one read, and serve every layer and the backward. Sync-free mode (no read at all) is
`tests/test_sync_free.py`.
"""

from __future__ import annotations

import contextlib
import copy
import pickle

import pytest
import torch
import transformers
from helpers import aot, encoders, models
from helpers.syncs import SyncCounter, library_step

import dept_kernels as dk
from dept_kernels.ops._aot_op import checked_distinct
from dept_kernels.ops._eager import custom_ops_only


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


@pytest.mark.parametrize("through_custom_ops", [False, True])
def test_counter_sees_inside_the_library_custom_ops(through_custom_ops):
    ids = torch.tensor([[4, 1, 4]])
    with contextlib.ExitStack() as stack:
        if through_custom_ops:
            stack.enter_context(custom_ops_only())
        with SyncCounter() as syncs:
            used, inverse = dk.ops.aot.distinct_ids(ids, 5)
    # The range flag and the distinct count cross in one read, where a range check and
    # `torch.unique` would read twice.
    assert syncs.counts == {"Tensor.tolist": 1}
    assert used.tolist() == [1, 4] and inverse.tolist() == [[1, 0, 1]]
    with SyncCounter() as syncs:
        dk.ops.aot.distinct_ids(ids, 5)
        with dk.sync_free(check=False):
            dk.ops.aot.distinct_ids(ids, 5)
    assert syncs.counts == {"Tensor.tolist": 1}


@pytest.mark.parametrize(
    "copy_with", [None, copy.deepcopy, lambda m: pickle.loads(pickle.dumps(m))]
)
@pytest.mark.parametrize("reparam", aot.REPARAMS)
def test_aot_training_step(reparam, copy_with):
    """T5's encoder has two AoT layers. The forward finds the batch's distinct ids once for
    both and reads their count with the ids' range flag (one read, not one per layer); the
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
    assert forward == {"Tensor.tolist": 1}, forward
    assert backward == {}, backward


def _dept_loss(ids, mask, labels, **extra):
    return lambda m: m(input_ids=ids, attention_mask=mask, labels=labels, **extra).loss


@pytest.mark.parametrize("trim_padding", [None, False])
def test_dept_training_step_t5(trim_padding):
    """One DePT training step (T5): one read. Untrimmed, the fused op checks all its ids
    with it (`.tolist()` of their bounds); the padding trim, on by default for T5, reads
    the op's id bounds with the mask's runs, and the op then reads nothing. The backward
    reads nothing."""
    base = models.tiny_model("t5")
    model = dk.patch(copy.deepcopy(base), models.make_config("dept"), trim_padding=trim_padding)
    models.randomize(model.dept_adapter)
    ids, mask, labels = models.batch()
    forward, backward = library_step(base, model, _dept_loss(ids, mask, labels))
    assert forward == {"Tensor.tolist": 1}, forward
    assert backward == {}, backward


@pytest.mark.parametrize("arch", ["gpt2", "gemma"])
def test_dept_training_step_with_position_rows(arch):
    """Left padding with position ids: the low-rank rows are gathered per token (not row t
    for token t). One read checks input and position ids (Gemma under transformers 5: its
    scaled lookup reads the ids before the op, in that same read), and the backward groups
    the tokens by row without `torch.unique` (the row count L is a shape)."""
    base, model = models.patched_pair(arch, "dept")
    ids, mask, _ = models.batch()
    mask[0, :3] = 0
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    forward, backward = library_step(
        base, model, _dept_loss(ids, mask, ids, position_ids=positions)
    )
    assert forward == {"Tensor.tolist": 1}, forward
    assert backward == {}, backward


def _stacked_dept(arch: str, tasks: int):
    """(base model, a model serving `tasks` stacked DePT adapters of their own values)."""
    base = models.tiny_model(arch)
    models_ = []
    for t in range(tasks):
        model = dk.patch(copy.deepcopy(base), models.make_config("dept"))
        models.randomize(model.dept_adapter, seed=10 + t)
        models_.append(model)
    return base, dk.stack_adapters(models_)


def test_multitask_training_step():
    """Stacked DePT adapters trained on a mixed batch: the backward forms each task's
    low-rank gradients without splitting the rows per task on the host (no `.tolist()`,
    no `unique_consecutive`)."""
    base, served = _stacked_dept("gpt2", 3)
    ids, mask, _ = models.batch(b=4)
    task_ids = torch.tensor([1, 0, 2, 1])

    def loss(m):
        extra = {"task_ids": task_ids} if m is served else {}
        return _dept_loss(ids, mask, ids, **extra)(m)

    forward, backward = library_step(base, served, loss)
    assert served.dept_adapter.lora_a.grad is not None
    assert forward == {"Tensor.tolist": 1}, forward
    assert backward == {}, backward


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize(
    "ids", [[[4, 1, 4]], [[0]], [[7, 7, 7, 7]], [[9, 0, 3, 3], [5, 0, 9, 8]], [[]]]
)
def test_checked_distinct_is_unique_with_one_read(ids, dtype):
    ids = torch.tensor(ids, dtype=dtype)
    expected_used, expected_inverse = torch.unique(ids, return_inverse=True)
    with SyncCounter() as syncs:
        used, inverse = checked_distinct(ids, 10, "input_ids")
    assert syncs.total <= 1
    assert used.dtype == ids.dtype and inverse.dtype == torch.int64
    assert torch.equal(used, expected_used) and torch.equal(inverse, expected_inverse)


@pytest.mark.parametrize(
    "ids, message",
    [
        ([[3, -2, 1]], r"input_ids holds a negative id \(-2\); ids must lie in \[0, 10\)"),
        ([[3, 10, 1]], r"input_ids holds id 10, out of range \[0, 10\)"),
    ],
)
def test_checked_distinct_raises_out_of_range(ids, message):
    with pytest.raises(IndexError, match=message):
        checked_distinct(torch.tensor(ids), 10, "input_ids")


def test_checked_distinct_raises_what_sync_free_calls_recorded():
    with dk.sync_free(check=False):
        dk.ops.aot.distinct_ids(torch.tensor([[12]]), 10)
    with pytest.raises(ValueError, match=r"input_ids held id 12, out of range \[0, 10\)"):
        checked_distinct(torch.tensor([[1, 2]]), 10, "input_ids")


def test_stacked_aot_forward_reads_ids_and_task_ids_once():
    """Stacked fused tables: the ids and the task ids are range-checked in one read."""
    base = aot.tiny_model("gpt2")
    models_ = []
    for seed in (1, 2):
        model = dk.patch(copy.deepcopy(base), dk.AoTConfig("kron", r=2))
        aot.randomize(model.dept_adapter, seed=seed)
        models_.append(dk.merge(model))
    served = dk.stack_adapters(models_).eval()
    ids, task_ids = aot.batch(b=4), torch.tensor([1, 0, 0, 1])
    with torch.no_grad(), SyncCounter() as own:  # transformers' own reads
        base(input_ids=ids)
    with torch.no_grad(), SyncCounter() as syncs:
        served(input_ids=ids, task_ids=task_ids)
    assert syncs.counts - own.counts == {"Tensor.tolist": 1}, (syncs.counts, own.counts)
    bad = r"task_ids holds id 2, out of range \[0, 2\)"
    with pytest.raises(IndexError, match=bad), torch.no_grad():
        served(input_ids=ids, task_ids=torch.tensor([1, 0, 2, 1]))


def _t5_trimmed_batch():
    """3 rows of 9 columns whose last 3 are padding in every row: the trim cuts them."""
    ids, mask, labels = models.batch()
    mask[:, 6:] = 0
    return ids, mask, labels


def test_t5_trimmed_step_reads_once_and_checks_every_column():
    """The trim's read carries the op's range flags: one read for a forward that cuts
    columns, and an id out of range still raises, in a kept column and in a cut one (as
    the untrimmed model does), before any kernel runs."""
    base = models.tiny_model("t5")
    model = dk.patch(copy.deepcopy(base), models.make_config("dept"))
    models.randomize(model.dept_adapter)
    ids, mask, labels = _t5_trimmed_batch()
    forward, backward = library_step(base, model, _dept_loss(ids, mask, labels))
    assert forward == {"Tensor.tolist": 1} and backward == {}, (forward, backward)
    vocab = model.config.vocab_size
    for column in (2, 7):
        bad = ids.clone()
        bad[1, column] = vocab
        with pytest.raises(IndexError, match=rf"input_ids holds id {vocab}, out of range"):
            model(input_ids=bad, attention_mask=mask, labels=labels)


def test_t5_stacked_trimmed_step_reads_once():
    base, served = _stacked_dept("t5", 2)
    ids, mask, labels = _t5_trimmed_batch()

    def loss(m, task_ids=(1, 0, 1)):
        extra = {"task_ids": torch.tensor(task_ids)} if m is served else {}
        return _dept_loss(ids, mask, labels, **extra)(m)

    forward, _ = library_step(base, served, loss)
    assert forward == {"Tensor.tolist": 1}, forward
    with pytest.raises(IndexError, match=r"task_ids holds id 2, out of range \[0, 2\)"):
        loss(served, (1, 2, 0))


def test_encoder_trimmed_step_reads_once():
    """A sequence-classification encoder trims by default: its forward reads once too."""
    base = encoders.encoder_model("bert")
    model = dk.patch(copy.deepcopy(base), models.make_config("dept"))
    models.randomize(model.dept_adapter)
    ids, mask, types, labels = encoders.padded_batch(model)
    ids[:, -2:], mask[:, -2:] = encoders.pad_id(model), 0  # cut in every row
    seen = []
    model.dept_adapter.register_forward_pre_hook(lambda _, args: seen.append(args[0].shape[1]))

    def loss(m):
        return m(input_ids=ids, attention_mask=mask, token_type_ids=types, labels=labels).loss

    forward, backward = library_step(base, model, loss)
    assert seen == [ids.shape[1] - 2]  # trimmed
    assert forward == {"Tensor.tolist": 1} and backward == {}, (forward, backward)


@pytest.mark.parametrize("padding", ["right", "left"])
@pytest.mark.parametrize(
    "arch, cls",
    [
        ("gpt2", transformers.GPT2ForSequenceClassification),
        ("gemma", transformers.GemmaForSequenceClassification),
    ],
)
def test_decoder_classification_trimmed_forward_reads_once(arch, cls, padding):
    """A decoder's sequence-classification head trims by default (leading columns too,
    under left padding): the cut and the op's id ranges cross in one read (Gemma under
    transformers 5: its scaled lookup's ids too)."""
    base = models.tiny_model(arch, cls)
    base.config.pad_token_id = 0
    model = dk.patch(copy.deepcopy(base), models.make_config("dept"))
    models.randomize(model.dept_adapter)
    ids, mask, _ = models.batch(s=9)
    real = slice(0, 6) if padding == "right" else slice(3, 9)
    keep = torch.zeros(9, dtype=torch.bool)
    keep[real] = True
    ids[:, ~keep], mask[:, ~keep] = 0, 0
    seen = []
    model.dept_adapter.register_forward_pre_hook(lambda _, args: seen.append(args[0].shape[1]))
    with torch.no_grad(), SyncCounter() as own:
        base(input_ids=ids, attention_mask=mask)
    with torch.no_grad(), SyncCounter() as syncs:
        model(input_ids=ids, attention_mask=mask)
    assert seen == [6]
    assert syncs.counts - own.counts == {"Tensor.tolist": 1}, (syncs.counts, own.counts)


def test_trim_leaves_the_ranges_to_the_op_when_the_table_shape_is_unknown():
    """An FSDP1-flattened table's full shape is not known outside its unit's call: the trim
    reads only the mask, and the op checks the ids inside the call (two reads, no error)."""
    base = models.tiny_model("t5")
    model = dk.patch(copy.deepcopy(base), models.make_config("dept"))
    models.randomize(model.dept_adapter)
    model.get_input_embeddings().weight._fsdp_flattened = True
    ids, mask, labels = _t5_trimmed_batch()
    forward, _ = library_step(base, model, _dept_loss(ids, mask, labels))
    assert forward == {"Tensor.tolist": 2}, forward


def test_decoder_lm_trimmed_on_request_reads_once():
    """A decoder LM trims when asked (`trim_padding=True`), in the LM head's hook: the op's
    ranges cross with the mask's runs there, and the inner call's op reads nothing."""
    base = models.tiny_model("gpt2")
    model = dk.patch(copy.deepcopy(base), models.make_config("dept"), trim_padding=True)
    models.randomize(model.dept_adapter)
    ids, mask, _ = models.batch(s=9)
    mask[:, 6:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    seen = []
    model.dept_adapter.register_forward_pre_hook(lambda _, args: seen.append(args[0].shape[1]))
    forward, backward = library_step(base, model, _dept_loss(ids, mask, labels))
    assert seen == [6]  # trimmed
    assert forward == {"Tensor.tolist": 1} and backward == {}, (forward, backward)
    bad = ids.clone()
    bad[0, 7] = model.config.vocab_size  # in a cut column: checked as untrimmed
    with pytest.raises(IndexError, match="input_ids holds id"):
        model(input_ids=bad, attention_mask=mask, labels=labels)
