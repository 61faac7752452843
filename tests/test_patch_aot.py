"""AoT P-tuning through patch(): a bias before every layer of the decoder-only models, BERT,
RoBERTa and DeBERTa-v2 and every encoder layer of T5; fuse, multi-task stacking, adapters on
disk.

The reference (helpers.aot) is written from docs/design.md §1 alone: the full (V, d) tables
are materialised by the formulas from the adapter's own parameters (`torch.kron` for the
Kronecker form) and added as `P_i[ids]` by plain forward pre-hooks on the unpatched model's
layers.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import transformers
from helpers.aot import (
    ARCHS,
    ENCODER_BASES,
    GENERATORS,
    REPARAMS,
    assert_close,
    batch,
    formula_tables,
    hook_reference,
    patched_pair,
    randomize,
    run,
    scalar,
    tiny_model,
)
from helpers.models import BACKENDS, VOCAB, tiny_config
from transformers import BertModel, DebertaV2Model, GPT2LMHeadModel

import dept_kernels as dk
from dept_kernels.methods.aot import fetch_rows
from dept_kernels.testing import reference_aot_bias_add

# The triton interpreter is slow: fp32 GPT-2 only.
CASES = [
    pytest.param(arch, reparam, dtype, backend, id=f"{arch}-{reparam}-{str(dtype)[6:]}-{backend}")
    for arch in ARCHS
    for reparam in REPARAMS
    for dtype in (torch.float32, torch.bfloat16)
    for backend in BACKENDS
    if backend != "triton" or (arch == "gpt2" and dtype == torch.float32)
]


@pytest.mark.parametrize(("arch", "reparam", "dtype", "backend"), CASES)
def test_matches_reference_before_and_after_fuse(arch, reparam, dtype, backend):
    base, model = patched_pair(arch, reparam, dtype)
    adapter = model.dept_adapter
    ids = batch()
    with dk.use_backend(backend):
        out = run(arch, model, ids)
        scalar(out).backward()
    got = {n: p.grad.clone() for n, p in adapter.named_parameters()}
    adapter.zero_grad()
    plain = run(arch, base, ids)
    handles = hook_reference(
        base, arch, formula_tables(adapter, base.get_input_embeddings().weight)
    )
    ref = run(arch, base, ids)
    scalar(ref).backward()
    # The bias matters: well beyond the comparison's tolerance.
    assert (ref.float() - plain.float()).abs().max() > 0.2 * ref.float().abs().max()
    assert_close(out, ref, dtype)
    for name, p in adapter.named_parameters():
        assert p.grad.abs().sum() > 0, name
        assert_close(got[name], p.grad, dtype)

    merged = dk.merge(model).dept_adapter
    assert merged.fused and not list(merged.parameters())
    assert not adapter.fused  # a new module: the trained one is left as it was
    assert merged.layers[0].table.shape == (VOCAB, 32)
    assert merged.layers[0].table.dtype == dtype
    with dk.use_backend(backend):
        fused = run(arch, model, ids)
        with torch.no_grad():  # the in-place gather-add
            fused_no_grad = run(arch, model, ids)
    assert_close(fused, ref, dtype)
    torch.testing.assert_close(fused_no_grad, fused, atol=0, rtol=0)
    for h in handles:
        h.remove()


@pytest.mark.parametrize("arch", ENCODER_BASES)
def test_base_encoder_models(arch):
    """Models whose base is the model itself (one hook site receives ids and task_ids)."""
    base, model = patched_pair(arch, "fc", cls=ENCODER_BASES[arch][0])
    ids = batch()
    out = model(input_ids=ids).last_hidden_state
    hook_reference(
        base, arch, formula_tables(model.dept_adapter, base.embeddings.word_embeddings.weight)
    )
    torch.testing.assert_close(out, base(input_ids=ids).last_hidden_state, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("head", ["DebertaV2ForMultipleChoice", "DebertaV2ForTokenClassification"])
def test_deberta_v2_other_heads(head):
    """Heads beyond sequence classification reach the same base model; multiple choice
    passes (B, C, s) ids, which the layers see as (B*C, s)."""
    base, model = patched_pair("deberta-v2", "fc", cls=getattr(transformers, head))
    ids = batch(b=6).view(2, 3, 9) if head.endswith("MultipleChoice") else batch()
    out = model(input_ids=ids).logits
    tables = formula_tables(model.dept_adapter, base.get_input_embeddings().weight)
    hook_reference(base, "deberta-v2", [t.detach() for t in tables])
    assert_close(out, base(input_ids=ids).logits, torch.float32)


DEBERTA_V2_VARIANTS = {
    "xlarge": {},  # the tiny config's defaults: relative attention, the convolution
    "no-conv": {"conv_kernel_size": 0},
    "absolute-positions": {"relative_attention": False, "position_biased_input": True},
    "embed-proj": {"embedding_size": 16},  # E (V, 16) projected to d = 32 (FC reads E)
}


@pytest.mark.parametrize("reparam", REPARAMS)
@pytest.mark.parametrize("changes", DEBERTA_V2_VARIANTS.values(), ids=DEBERTA_V2_VARIANTS)
def test_deberta_v2_encoder_variants(changes, reparam):
    """DeBERTa-v2's encoder options keep the bias before each layer: a padded batch, every
    hidden state, the convolution after layer 0 reading the embedding output without layer
    0's bias (as the reference hooks leave it), trained and fused, with and without grad."""
    base = tiny_model("deberta-v2", **changes)
    model = dk.patch(copy.deepcopy(base), dk.AoTConfig(reparam, r=4))
    randomize(model.dept_adapter)
    ids = batch(b=4)
    mask = torch.ones_like(ids)
    mask[1, 6:] = mask[3, 4:] = 0
    kw = {"input_ids": ids, "attention_mask": mask, "output_hidden_states": True}
    adapter = model.dept_adapter
    got = model(**kw)
    scalar(got.logits).backward()
    grads = {n: p.grad.clone() for n, p in adapter.named_parameters()}
    adapter.zero_grad()
    hook_reference(base, "deberta-v2", formula_tables(adapter, base.get_input_embeddings().weight))
    want = base(**kw)
    scalar(want.logits).backward()
    outputs = zip((got.logits, *got.hidden_states), (want.logits, *want.hidden_states), strict=True)
    for g, w in outputs:
        assert_close(g, w, torch.float32)
    for name, p in adapter.named_parameters():
        assert p.grad.abs().sum() > 0, name
        assert_close(grads[name], p.grad, torch.float32)
    dk.merge(model)
    with torch.no_grad():  # the in-place gather-add, but before layer 0
        fused = model(input_ids=ids, attention_mask=mask).logits
    assert_close(fused, want.logits, torch.float32)


def test_hidden_states_are_not_overwritten_in_place():
    base, model = patched_pair("llama", "kron")
    ids = batch()
    dk.merge(model)
    tables = [layer.table for layer in model.dept_adapter.layers]
    hook_reference(base, "llama", tables)
    with torch.no_grad():
        got = model(input_ids=ids, output_hidden_states=True).hidden_states
        want = base(input_ids=ids, output_hidden_states=True).hidden_states
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("reparam", REPARAMS)
def test_dropout_in_training_only_and_reproducible(reparam):
    base, model = patched_pair("gpt2", reparam)
    ids = batch()
    hook_reference(base, "gpt2", formula_tables(model.dept_adapter, base.transformer.wte.weight))
    with torch.no_grad():
        ref = base(input_ids=ids).logits
        evaluated = model(input_ids=ids).logits
        model.train()
        torch.manual_seed(3)
        first = model(input_ids=ids).logits
        torch.manual_seed(3)
        again = model(input_ids=ids).logits
        torch.manual_seed(4)
        other = model(input_ids=ids).logits
        model.eval()
    torch.testing.assert_close(evaluated, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(first, again, atol=0, rtol=0)
    assert (first - ref).abs().max() > 1e-3
    assert (first - other).abs().max() > 1e-3


@pytest.mark.parametrize("reparam", REPARAMS)
@pytest.mark.parametrize("arch", GENERATORS)
def test_generate_matches_reference(arch, reparam):
    base, model = patched_pair(arch, reparam)
    ids = batch(s=6)
    kwargs = {"max_new_tokens": 6, "do_sample": False, "use_cache": True}
    tables = formula_tables(model.dept_adapter, base.get_input_embeddings().weight)
    hook_reference(base, arch, [t.detach() for t in tables])
    want = base.generate(input_ids=ids, **kwargs)
    assert len(set(want[:, -6:].flatten().tolist())) > 1  # a constant output proves little
    assert torch.equal(model.generate(input_ids=ids, **kwargs), want)
    dk.merge(model)
    assert torch.equal(model.generate(input_ids=ids, **kwargs), want)


# --------------------------------------------------------------------------- multi-task


def task_models(arch, reparam="kron", tasks=3, cls=None):
    """`tasks` fused patched copies of one base model, each with its own adapter values."""
    base = tiny_model(arch, cls=cls)
    models = []
    for t in range(tasks):
        model = dk.patch(copy.deepcopy(base), dk.AoTConfig(reparam, r=4))
        randomize(model.dept_adapter, seed=10 + t)
        models.append(dk.merge(model))
    return base, models


@pytest.mark.parametrize(
    ("arch", "cls"),
    [
        ("gpt2", None),
        ("t5", None),
        ("bert", None),
        ("bert", BertModel),
        ("deberta-v2", None),
        ("deberta-v2", DebertaV2Model),
    ],
)
def test_mixed_task_batch_equals_per_task_runs(arch, cls):
    base, models = task_models(arch, cls=cls)
    singles = [copy.deepcopy(m) for m in models]  # stack_adapters replaces models[0]'s adapter
    served = dk.stack_adapters(models)
    assert served is models[0]
    assert served.dept_adapter.layers[0].table.shape == (3, VOCAB, 32)
    ids = batch(b=5)
    task_ids = torch.tensor([2, 0, 1, 2, 0])
    key = "logits" if cls is None else "last_hidden_state"
    kw = {"labels": ids[:, :5].contiguous()} if arch == "t5" else {}
    with torch.no_grad():
        mixed = served(input_ids=ids, task_ids=task_ids, **kw)[key]
        for t, single in enumerate(singles):
            rows = task_ids == t
            alone = single(input_ids=ids[rows], **{k: v[rows] for k, v in kw.items()})[key]
            torch.testing.assert_close(mixed[rows], alone, atol=1e-5, rtol=1e-5)
    # The reference hooks on the base model agree with the stacked tables too.
    stacked = [layer.table for layer in served.dept_adapter.layers]
    hook_reference(base, arch, stacked, task_ids)
    with torch.no_grad():
        torch.testing.assert_close(base(input_ids=ids, **kw)[key], mixed, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["gpt2", "t5"])
def test_mixed_task_generate(arch):
    _, models = task_models(arch, tasks=2)
    singles = [copy.deepcopy(m) for m in models]
    served = dk.stack_adapters(models)
    ids = batch(b=4, s=6)
    task_ids = torch.tensor([1, 0, 0, 1])
    kwargs = {"max_new_tokens": 5, "do_sample": False, "use_cache": True}
    mixed = served.generate(input_ids=ids, task_ids=task_ids, **kwargs)
    for t, single in enumerate(singles):
        rows = task_ids == t
        assert torch.equal(mixed[rows], single.generate(input_ids=ids[rows], **kwargs))


def test_stack_from_adapter_directories(tmp_path):
    base, models = task_models("gpt2", reparam="fc", tasks=2)
    dirs = []
    for t, model in enumerate(models):
        dk.save_adapter(model, tmp_path / str(t))
        dirs.append(tmp_path / str(t))
    served = dk.stack_adapters(dirs, model=copy.deepcopy(base))
    again = dk.stack_adapters([models[0], dirs[1]])  # models and directories mix
    ids = batch(b=4)
    task_ids = torch.tensor([1, 0, 1, 0])
    with torch.no_grad():
        got = served(input_ids=ids, task_ids=task_ids).logits
        torch.testing.assert_close(again(input_ids=ids, task_ids=task_ids).logits, got)
        for t in range(2):
            rows = task_ids == t
            single = dk.load_adapter(copy.deepcopy(base), dirs[t])
            torch.testing.assert_close(got[rows], single(input_ids=ids[rows]).logits)
    # A stacked adapter saves and loads as one (T, V, d) table per layer.
    dk.save_adapter(served, tmp_path / "stacked")
    config = json.loads((tmp_path / "stacked" / "adapter_config.json").read_text())
    assert config["fused"] is True and config["num_tasks"] == 2
    loaded = dk.load_adapter(copy.deepcopy(base), tmp_path / "stacked")
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids, task_ids=task_ids).logits, got)


# --------------------------------------------------------------------------- host tables


def test_fetch_rows_moves_only_the_needed_rows():
    gen = torch.Generator().manual_seed(0)
    table = torch.randn(3, 50, 8, generator=gen)
    ids = torch.randint(0, 50, (4, 6), generator=gen)
    ids[1] = ids[0]  # repeats share one row
    task_ids = torch.tensor([0, 0, 2, 1])
    hidden = torch.randn(4, 6, 8, generator=gen)
    rows, inverse = fetch_rows(table, ids, task_ids, "cpu")
    assert rows.shape[0] == len(set(zip(task_ids[:, None].expand_as(ids).flatten().tolist(),
                                        ids.flatten().tolist(), strict=True)))  # fmt: skip
    torch.testing.assert_close(
        dk.ops.aot_bias_add(hidden, inverse, rows),
        reference_aot_bias_add(hidden, ids, table, task_ids=task_ids),
    )
    rows, inverse = fetch_rows(table[1], ids, None, torch.device("cpu"))
    torch.testing.assert_close(rows[inverse], table[1][ids])
    with pytest.raises(ValueError, match="need task_ids"):
        fetch_rows(table, ids, None, "cpu")
    with pytest.raises(IndexError, match="task_ids holds id 3"):
        fetch_rows(table, ids, torch.tensor([0, 1, 2, 3]), "cpu")


@pytest.mark.parametrize("arch", ["gpt2", "deberta-v2"])
def test_fuse_to_host_memory_on_a_cpu_model(arch):
    _, model = patched_pair(arch, "fc")
    ids = batch()
    before = model(input_ids=ids).logits
    dk.merge(model, dtype=torch.bfloat16, device="cpu")
    table = model.dept_adapter.layers[0].table
    assert table.device.type == "cpu" and table.dtype == torch.bfloat16
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, before, atol=2e-2, rtol=2e-2)


# --------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("reparam", REPARAMS)
@pytest.mark.parametrize("arch", ["roberta", "deberta-v2"])
def test_save_load_roundtrip(tmp_path, arch, reparam, fused):
    _, model = patched_pair(arch, reparam)
    if fused:
        dk.merge(model)
    dk.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["method"] == "aot" and config["reparam"] == reparam
    assert config["fused"] is fused and config["num_tasks"] is None
    fresh = dk.load_adapter(tiny_model(arch), tmp_path)
    assert fresh.dept_adapter.fused is fused
    ids = batch()
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids).logits, model(input_ids=ids).logits)
    for name, p in model.dept_adapter.state_dict().items():
        assert torch.equal(fresh.dept_adapter.state_dict()[name], p), name
    dk.load_adapter(fresh, tmp_path)  # an already patched model in the same state
    other = dk.patch(tiny_model(arch), dk.AoTConfig(reparam, r=4))
    if not fused:
        dk.merge(other)
    with pytest.raises(ValueError, match="unpatch"):
        dk.load_adapter(other, tmp_path)


# --------------------------------------------------------------------------- training


@pytest.mark.parametrize("arch", ["bert", "deberta-v2"])
def test_param_groups_hold_the_reparameterisation(arch):
    _, model = patched_pair(arch, "kron")
    adapter = model.dept_adapter
    groups = dk.param_groups(model, lowrank_lr=1e-3)
    assert len(groups) == 1 and groups[0]["lr"] == 1e-3
    assert groups[0]["params"] == list(adapter.parameters())
    assert {n.rsplit(".", 1)[-1] for n, _ in adapter.named_parameters()} == {"w_l", "w_m", "w_r"}
    opt = torch.optim.AdamW(groups)
    before = {n: p.detach().clone() for n, p in adapter.named_parameters()}
    model.train()
    model(input_ids=batch(), labels=torch.tensor([0, 1, 2])).loss.backward()
    opt.step()
    for name, p in adapter.named_parameters():
        assert not torch.equal(p, before[name]), name
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(n.startswith("dept_adapter.") for n in trainable)
    with pytest.raises(ValueError, match="lowrank_lr"):
        dk.param_groups(model, prompt_lr=0.3)


def test_unpatch_restores_model():
    model = tiny_model("t5")
    ids = batch()
    before = run("t5", model, ids)
    modules = list(model.modules())
    dk.merge(dk.patch(model, dk.AoTConfig("fc", r=4)))
    dk.unpatch(model)
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in modules)
    torch.testing.assert_close(run("t5", model, ids), before)


def test_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="reparam must be one of"):
        dk.AoTConfig("lora", r=4)
    with pytest.raises(ValueError, match="takes neither"):
        dk.AoTConfig("fc", r=4, a=2, b=64)
    with pytest.raises(ValueError, match="fewer than the vocabulary"):
        dk.patch(tiny_model("gpt2"), dk.AoTConfig("kron", r=4, a=2, b=8))
    with pytest.raises(TypeError, match="unsupported model"):
        dk.patch(torch.nn.Linear(2, 2), dk.AoTConfig("fc", r=4))
    distil = transformers.DistilBertModel(
        transformers.DistilBertConfig(
            vocab_size=VOCAB, dim=32, n_layers=1, n_heads=2, hidden_dim=32
        )
    )
    with pytest.raises(TypeError, match="model_type='distilbert'"):
        dk.patch(distil, dk.AoTConfig("fc", r=4))
    _, model = patched_pair("gpt2", "kron")
    ids = batch()
    with pytest.raises(ValueError, match="needs input_ids"):
        model(inputs_embeds=torch.randn(1, 3, 32))
    with pytest.raises(IndexError, match="out of range"):
        model(input_ids=torch.full((1, 3), VOCAB))
    with pytest.raises(ValueError, match="stack_adapters"):
        model(input_ids=ids, task_ids=torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="not fused"):  # stack_adapters merges it first
        type(model.dept_adapter).stack([model.dept_adapter])
    dk.merge(model)
    with pytest.raises(ValueError, match="already fused"), pytest.warns(DeprecationWarning):
        dk.fuse(model)
    model.train()
    with pytest.raises(RuntimeError, match="for inference"):
        model(input_ids=ids)
    with pytest.raises(RuntimeError, match="no trainable parameters"):
        dk.param_groups(model, lowrank_lr=1e-3)
    model.eval()
    with pytest.raises(ValueError, match="stack_adapters"):
        model(input_ids=ids, task_ids=torch.zeros(3, dtype=torch.long))
    # Stacked: task ids required, in range, one per sample.
    _, models = task_models("gpt2", tasks=2)
    served = dk.stack_adapters(models)
    with pytest.raises(ValueError, match="pass task_ids"):
        served(input_ids=ids)
    with pytest.raises(IndexError, match="task_ids holds id 2"):
        served(input_ids=ids, task_ids=torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="task_ids has 2 entries"):
        served(input_ids=ids, task_ids=torch.tensor([0, 1]))
    # Mismatched adapters.
    kron = task_models("gpt2", reparam="kron", tasks=1)[1][0]
    fc = task_models("gpt2", reparam="fc", tasks=1)[1][0]
    with pytest.raises(ValueError, match="reparam"):
        dk.stack_adapters([kron, fc])
    small = tiny_config("gpt2")
    for change in ({"vocab_size": VOCAB + 1}, {"n_layer": 3}, {"n_embd": 48}):
        torch.manual_seed(0)
        other = GPT2LMHeadModel(transformers.GPT2Config(**{**small.to_dict(), **change}))
        dk.merge(dk.patch(other.eval(), dk.AoTConfig("kron", r=4)))
        with pytest.raises(ValueError, match="base model"):
            dk.stack_adapters([kron, other])
    drifted = task_models("gpt2", reparam="kron", tasks=1)[1][0]
    with torch.no_grad():
        drifted.transformer.h[1].mlp.c_fc.weight.add_(1e-3)
    with pytest.raises(ValueError, match=r"'transformer\.h\.1\.mlp\.c_fc\.weight' differs"):
        dk.stack_adapters([kron, drifted])
    dk.save_adapter(kron, tmp_path / "kron")
    wide = GPT2LMHeadModel(transformers.GPT2Config(**{**small.to_dict(), "n_embd": 48}))
    with pytest.raises(ValueError, match=r"table has shape \(128, 32\)"):
        dk.stack_adapters([tmp_path / "kron"], model=wide)
    with pytest.raises(ValueError, match="pass model="):
        dk.stack_adapters([tmp_path / "kron"])
    # Adapters of one method stack (tests/test_multitask.py has the prompt methods'), and
    # the deprecated fuse is AoT's.
    prompt = dk.patch(tiny_model("gpt2"), dk.PromptTuningConfig(num_virtual_tokens=2))
    with pytest.raises(ValueError, match="one method"):
        dk.stack_adapters([kron, prompt])
    with pytest.raises(TypeError, match="fuse materialises AoT"), pytest.warns(DeprecationWarning):
        dk.fuse(prompt)
    with pytest.raises(ValueError, match="at least one"):
        dk.stack_adapters([])
    # The encoder-only models serve the prompt methods too (tests/test_encoders_prompt.py).
    for arch in ("bert", "deberta-v2"):
        dk.patch(tiny_model(arch), dk.PromptTuningConfig(num_virtual_tokens=2))


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
def test_ids_are_range_checked_once_per_forward(monkeypatch, fused):
    """The hook checks the ids once; the layers' ops skip the check (on a GPU each one is a
    device sync, so a check per layer would stall every layer). Unfused, the check's flags
    are read with the distinct ids' count (`checked_distinct`)."""
    from dept_kernels.ops import _validate

    model = dk.patch(tiny_model("gpt2"), dk.AoTConfig("kron", r=4))
    randomize(model.dept_adapter)
    if fused:
        dk.merge(model)
    model.eval()
    checked = []
    real = _validate.range_reads

    def counted(ranges):
        checked.extend(r.name for r in ranges)
        return real(ranges)

    # Every range check finds its bounds here (`checked` calls it too).
    monkeypatch.setattr(_validate, "range_reads", counted)
    ids = torch.randint(0, VOCAB, (2, 6))
    with torch.no_grad():
        model(input_ids=ids)
    assert checked == ["input_ids"]
    ids[0, 0] = VOCAB  # and the one check still catches a bad id
    with pytest.raises(IndexError, match="input_ids holds id"):
        model(input_ids=ids)


@pytest.mark.parametrize(("a", "b"), [(12, 12), (16, 8), (8, 16)])
def test_kronecker_factor_heights(a, b):
    """Square factors (a == b) and both unequal orders give the formula's rows: a swap of
    x // b and x % b, or of a and b, shows up in at least one of them."""
    base = tiny_model("gpt2", torch.float32)
    model = dk.patch(copy.deepcopy(base), dk.AoTConfig("kron", r=4, a=a, b=b))
    randomize(model.dept_adapter, 1)
    layer = model.dept_adapter.layers[0]
    assert (layer.w_l.shape[0], layer.w_m.shape[0]) == (a, b)
    ids = batch()
    got = run("gpt2", model, ids)
    tables = formula_tables(model.dept_adapter, base.get_input_embeddings().weight)
    hook_reference(base, "gpt2", [t.detach() for t in tables])
    assert_close(got, run("gpt2", base, ids), torch.float32)
