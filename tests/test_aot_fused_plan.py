"""The fused AoT inference forward: what every layer shares is found once per forward
(`dept_kernels.ops.aot.FusedAdds`: the backend, the checked rows, the tables' views) and each
layer's bias is the backend's kernel on them. It must give the bits of each layer's own call
(`aot_bias_add` in place), which every case it does not cover still takes.
"""

from __future__ import annotations

import pytest
import torch
from helpers.aot import ARCHS, batch, patched_pair, run
from helpers.models import VOCAB

import dept_kernels as dk
from dept_kernels.methods import aot as aot_method
from dept_kernels.models import _aot as aot_hooks
from dept_kernels.ops import _eager
from dept_kernels.ops.aot import FusedAdds, fused_adds


def fused_model(arch: str, dtype=torch.float32):
    _, model = patched_pair(arch, "kron", dtype)
    return dk.merge(model).eval()


def counting(monkeypatch) -> dict[str, int]:
    """Counts of the layers' own op calls and of the plan's adds that ran the kernel."""
    counts = {"op": 0, "plan": 0}
    op, add = aot_method._aot_bias_add, FusedAdds.add_

    def counted_op(*args, **kwargs):
        counts["op"] += 1
        return op(*args, **kwargs)

    def counted_add(self, index, hidden):
        done = add(self, index, hidden)
        counts["plan"] += done
        return done

    monkeypatch.setattr(aot_method, "_aot_bias_add", counted_op)
    monkeypatch.setattr(FusedAdds, "add_", counted_add)
    return counts


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("arch", ARCHS)
def test_plan_gives_the_layers_own_bits(monkeypatch, arch, dtype):
    model = fused_model(arch, dtype)
    layers = len(model.dept_adapter.layers)
    # DeBERTa-v2 reads layer 0's input again after it: that layer adds out of place.
    reread = 1 if arch == "deberta-v2" else 0
    ids = batch()
    counts = counting(monkeypatch)
    with torch.no_grad():
        planned = run(arch, model, ids)
    assert counts == {"op": reread, "plan": layers - reread}
    # Without a plan every layer takes its own call, in place as before.
    monkeypatch.setattr(aot_hooks, "fused_adds", lambda *args: None)
    with torch.no_grad():
        own = run(arch, model, ids)
    assert counts == {"op": layers + reread, "plan": layers - reread}
    torch.testing.assert_close(planned, own, atol=0, rtol=0)


def test_stacked_tables_follow_task_ids(monkeypatch):
    """Stacked (T, V, d) tables: the plan's rows are offset by each sample's task."""
    models = []
    for seed in (1, 2, 3):
        _, model = patched_pair("gpt2", "fc", seed=seed)
        models.append(dk.merge(model))
    served = dk.stack_adapters(models).eval()
    ids, task_ids = batch(b=5), torch.tensor([2, 0, 1, 2, 0])
    counts = counting(monkeypatch)
    with torch.no_grad():
        planned = served(input_ids=ids, task_ids=task_ids).logits
    assert counts["op"] == 0 and counts["plan"] > 0
    monkeypatch.setattr(aot_hooks, "fused_adds", lambda *args: None)
    with torch.no_grad():
        own = served(input_ids=ids, task_ids=task_ids).logits
    torch.testing.assert_close(planned, own, atol=0, rtol=0)


def test_cases_the_plan_leaves_to_the_layers(monkeypatch):
    model = fused_model("gpt2")
    layers = len(model.dept_adapter.layers)
    ids = batch()
    counts = counting(monkeypatch)
    # With autograd on, the out-of-place op (its gradient flows to hidden).
    model(input_ids=ids)
    assert counts == {"op": layers, "plan": 0}
    # Recorded hidden states must not be overwritten: no in-place add at all.
    with torch.no_grad():
        model(input_ids=ids, output_hidden_states=True)
    assert counts == {"op": 2 * layers, "plan": 0}
    # Measurements that compare the custom ops with the eager path force the custom ops.
    with torch.no_grad(), _eager.custom_ops_only():
        model(input_ids=ids)
    assert counts == {"op": 3 * layers, "plan": 0}
    # A layer put back in training mode raises its own error, plan or not.
    model.dept_adapter.layers[1].train()
    with torch.no_grad(), pytest.raises(RuntimeError, match="fused AoT adapter is for inference"):
        model(input_ids=ids)


def test_the_one_range_check_still_guards_the_plan():
    model = fused_model("llama")
    ids = batch()
    ids[1, 3] = VOCAB
    with torch.no_grad(), pytest.raises(IndexError, match="input_ids holds id"):
        model(input_ids=ids)


def plan(b=2, s=3, d=4, layers=2, vocab=5) -> tuple[FusedAdds, list[torch.Tensor]]:
    tables = [torch.randn(vocab, d) for _ in range(layers)]
    ids = torch.randint(0, vocab, (b, s))
    adds = fused_adds(ids, None, tables)
    assert adds is not None
    return adds, tables


def test_add_adds_each_layers_rows_in_place():
    adds, tables = plan()
    hidden = torch.randn(adds.shape)
    want = hidden + tables[1][adds.rows]
    version = hidden._version
    assert adds.add_(1, hidden)
    torch.testing.assert_close(hidden, want, atol=0, rtol=0)
    assert hidden._version > version  # a saved tensor would be seen as changed


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda adds, tables: tables[0].view(adds.shape), id="hidden-is-the-table"),
        pytest.param(lambda adds, tables: torch.randn(2, 3, 5), id="other-width"),
        pytest.param(lambda adds, tables: torch.randn(3, 2, 4), id="other-batch"),
        pytest.param(lambda adds, tables: torch.randn(2, 4, 3).mT, id="not-contiguous"),
        pytest.param(lambda adds, tables: torch.zeros(adds.shape, dtype=torch.int32), id="int"),
        pytest.param(
            lambda adds, tables: torch.randn(adds.shape, dtype=torch.float64), id="float64"
        ),
        pytest.param(
            lambda adds, tables: torch.randn(adds.shape, requires_grad=True), id="needs-grad"
        ),
    ],
)
def test_add_declines_without_writing(make):
    """Anything but the common case is declined untouched: the layer's own call then checks
    (and copies an aliased table, or raises)."""
    adds, tables = plan(vocab=6)  # 6 rows of width 4: one table holds 2 x 3 x 4 elements
    hidden = make(adds, tables)
    before = hidden.detach().clone()
    assert not adds.add_(0, hidden)
    torch.testing.assert_close(hidden.detach(), before, atol=0, rtol=0)


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(lambda t: t[:, :3], id="other-width"),
        pytest.param(lambda t: t.T.contiguous().T, id="not-contiguous"),
        pytest.param(lambda t: t.requires_grad_(), id="needs-grad"),
        pytest.param(lambda t: t.to("meta"), id="other-device"),
        pytest.param(lambda t: t.double(), id="float64"),
    ],
)
def test_no_plan_for_tables_the_layers_must_check(change):
    tables = [torch.randn(5, 4) for _ in range(3)]
    tables[2] = change(tables[2])
    assert fused_adds(torch.randint(0, 5, (2, 3)), None, tables) is None


def test_planned_layers_count_towards_the_bypass_check(monkeypatch):
    """A planned layer's hook counts its layer like every other: a layer whose hooks were
    skipped still raises, rather than leaving out its bias in silence."""
    model = fused_model("gpt2")
    layers = len(model.dept_adapter.layers)
    skipped = model.transformer.h[1]

    class ForwardOnly(type(skipped)):
        def __call__(self, *args, **kwargs):
            return self.forward(*args, **kwargs)

    skipped.__class__ = ForwardOnly
    counts = counting(monkeypatch)
    match = f"ran {layers - 1} of its {layers} AoT layer hooks"
    with torch.no_grad(), pytest.raises(RuntimeError, match=match):
        model(input_ids=batch())
    assert counts == {"op": 0, "plan": layers - 1}


def test_a_forward_inside_a_backward_takes_the_layers_calls(monkeypatch):
    """A no-grad forward run by a backward hook takes each layer's own call (the layer hooks
    there look for activation-checkpoint records, which the plan skips), and gives the same
    bits as outside."""
    model = fused_model("gpt2")
    layers = len(model.dept_adapter.layers)
    ids = batch()
    with torch.no_grad():
        outside = model(input_ids=ids).logits
    counts = counting(monkeypatch)
    inside = []

    def hook(grad):
        with torch.no_grad():
            inside.append(model(input_ids=ids).logits)

    x = torch.ones(2, requires_grad=True)
    x.register_hook(hook)
    (x * 2).sum().backward()
    assert counts == {"op": layers, "plan": 0}
    torch.testing.assert_close(inside[0], outside, atol=0, rtol=0)
