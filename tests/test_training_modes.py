"""Patched models in the training modes users switch on.

- Gradient checkpointing as HF offers it (`activation_checkpointing_enable`, formerly
  `gradient_checkpointing_enable`), reentrant or not, and torch's `checkpoint_wrapper`
  around each layer, which re-runs the layer's hooks in backward (as transformers < 5
  does): loss and adapter gradients equal the un-checkpointed step's in fp32.
- bf16 autocast: a training step equals the reference formula under the same autocast.
- `torch.no_grad()` inference, and `eval()` / `train()`: AoT's dropout acts in training
  only, and there equals a seeded reference drawn per distinct id.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import aot, assert_close, models
from helpers.hooks import assert_hook_state_empty, wrap_layers
from torch import nn
from torch.utils.checkpoint import checkpoint

import dept_kernels as dk
from dept_kernels.models import describe

FP32 = torch.float32
BF16 = torch.bfloat16
AOT_ARCHS = ("t5", "gpt2", "llama", "bert", "deberta-v2")


# --------------------------------------------------------------------------- helpers


def enable_hf_checkpointing(model: nn.Module, reentrant: bool) -> None:
    """HF's own switch (named `gradient_checkpointing_enable` before transformers 5)."""
    kwargs = {"use_reentrant": reentrant}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if reentrant:
        # A reentrant checkpoint passes gradients only to inputs that require them: HF 5 makes
        # the embedding output require grad itself, older versions leave it to the user.
        model.enable_input_require_grads()


def count_calls(modules) -> list[int]:
    """A counter of the calls of `modules`, which shows that a recomputation ran."""
    calls = [0]

    def hit(module, args):
        calls[0] += 1

    for module in modules:
        module.register_forward_pre_hook(hit)
    return calls


def first_leaf(layer: nn.Module) -> nn.Module:
    """The first module without children inside `layer` (a norm or projection it calls)."""
    return next(m for m in layer.modules() if not list(m.children()))


def compare_steps(got: tuple, want: tuple) -> None:
    (loss, grads), (ref_loss, ref_grads) = got, want
    assert_close(loss, ref_loss, FP32)
    assert grads.keys() == ref_grads.keys() and grads
    for name, grad in ref_grads.items():
        assert grad.abs().sum() > 0, f"{name}: zero gradient, the comparison is vacuous"
        assert_close(grads[name], grad, FP32)


def prompt_step(
    arch: str, model: nn.Module, inputs: tuple, autocast: torch.dtype | None = None
) -> tuple[torch.Tensor, dict]:
    """One training step; `autocast` wraps the forward only, as PyTorch prescribes."""
    ids, mask, labels = inputs
    with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
        out = model(input_ids=ids, attention_mask=mask, labels=labels if arch == "t5" else ids)
    out.loss.backward()
    return out.loss.detach(), models.grads(model.dept_adapter)


def aot_step(
    arch: str, model: nn.Module, ids: torch.Tensor, seed: int = 3, autocast=None
) -> tuple[torch.Tensor, dict]:
    """One AoT training step; the seed fixes the adapter's dropout (0.1 by default)."""
    torch.manual_seed(seed)
    with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
        loss = aot.scalar(aot.run(arch, model, ids))
    loss.backward()
    return loss.detach(), models.grads(model.dept_adapter)


def aot_pair(arch: str, reparam: str, dropout: float = 0.1):
    """(frozen unpatched base, patched copy with non-zero adapter values)."""
    base = aot.tiny_model(arch)
    model = dk.patch(copy.deepcopy(base), dk.AoTConfig(reparam, r=4, dropout=dropout))
    aot.randomize(model.dept_adapter)
    for p in base.parameters():
        p.requires_grad_(False)
    return base, model


# --------------------------------------------------------------------------- checkpointing

PROMPT_CASES = [(arch, "dept") for arch in models.ARCHS] + [("gpt2", "pt"), ("t5", "ept")]


def check_hf_checkpointing(model: nn.Module, step, reentrant: bool) -> None:
    """`step(model)` with HF checkpointing on equals it on an unchecked copy, and the layers
    really were recomputed."""
    model.train()
    plain = copy.deepcopy(model)
    enable_hf_checkpointing(model, reentrant)
    calls, plain_calls = (
        count_calls(first_leaf(layer) for layer in describe(m, "layer_input").layers)
        for m in (model, plain)
    )
    got = step(model)
    want = step(plain)
    # Twice the unchecked step's calls (a leaf may run more than once per layer: DeBERTa-v2's
    # query projection also projects the relative-position embeddings).
    assert calls[0] == 2 * plain_calls[0], "the layers were not recomputed: no checkpointing"
    compare_steps(got, want)
    assert_hook_state_empty(model)


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non_reentrant"])
@pytest.mark.parametrize(("arch", "method"), PROMPT_CASES)
def test_hf_checkpointing_prompt_methods(arch, method, reentrant):
    _, model = models.patched_pair(arch, method)
    inputs = models.batch()
    check_hf_checkpointing(model, lambda m: prompt_step(arch, m, inputs), reentrant)


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non_reentrant"])
@pytest.mark.parametrize("reparam", aot.REPARAMS)
@pytest.mark.parametrize("arch", AOT_ARCHS)
def test_hf_checkpointing_aot(arch, reparam, reentrant):
    """With the adapter's dropout on: the checkpoint restores the RNG for the recomputation."""
    _, model = aot_pair(arch, reparam)
    ids = aot.batch()
    check_hf_checkpointing(model, lambda m: aot_step(arch, m, ids), reentrant)


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non_reentrant"])
@pytest.mark.parametrize("reparam", aot.REPARAMS)
@pytest.mark.parametrize("arch", AOT_ARCHS)
def test_layer_checkpointing_reruns_aot_hooks(arch, reparam, reentrant):
    """The layer hooks run again in backward, after the forward ended, and find the ids the
    forward used through their input tensor."""
    _, model = aot_pair(arch, reparam)
    model.train()
    plain = copy.deepcopy(model)
    wrap_layers(model, reentrant)
    biases = count_calls(model.dept_adapter.layers)
    ids = aot.batch()
    got = aot_step(arch, model, ids)
    assert biases[0] == 2 * len(model.dept_adapter.layers), "the hooks were not re-run"
    compare_steps(got, aot_step(arch, plain, ids))
    assert_hook_state_empty(model)


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non_reentrant"])
def test_interleaved_forwards_recompute_with_their_own_ids(reentrant):
    """Two forwards, then their backwards in reverse order: each recomputation uses its own
    batch's ids (one slot of "the last ids" would hand batch 2's to batch 1)."""
    _, model = aot_pair("gpt2", "kron")
    model.train()
    plain = copy.deepcopy(model)
    wrap_layers(model, reentrant)
    first, second = aot.batch(seed=0), aot.batch(seed=1)
    torch.manual_seed(3)
    loss_1 = aot.scalar(aot.run("gpt2", model, first))
    torch.manual_seed(4)
    loss_2 = aot.scalar(aot.run("gpt2", model, second))
    loss_2.backward()
    loss_1.backward()
    got = models.grads(model.dept_adapter)
    aot_step("gpt2", plain, first, seed=3)
    want_loss, want = aot_step("gpt2", plain, second, seed=4)  # gradients accumulate
    compare_steps((loss_2.detach(), got), (want_loss, want))
    assert_hook_state_empty(model)


@pytest.mark.parametrize("layers_too", [False, True], ids=["model", "model_and_layers"])
def test_checkpoint_around_the_whole_model(layers_too):
    """The recomputation re-runs the whole forward, hooks included, inside the backward
    (with checkpointed layers inside it, nested)."""
    _, model = aot_pair("llama", "fc")
    model.train()
    plain = copy.deepcopy(model)
    if layers_too:
        wrap_layers(model, reentrant=False)
    ids = aot.batch()
    biases = count_calls(model.dept_adapter.layers)
    torch.manual_seed(3)
    loss = checkpoint(
        lambda ids: aot.scalar(aot.run("llama", model, ids)), ids, use_reentrant=False
    )
    loss.backward()
    assert biases[0] >= 2 * len(model.dept_adapter.layers), "nothing was recomputed"
    compare_steps((loss.detach(), models.grads(model.dept_adapter)), aot_step("llama", plain, ids))
    assert_hook_state_empty(model)


def test_recomputation_on_a_copied_input_raises():
    """`save_on_cpu(pin_memory=True)` saves a copy of the checkpoint's input, so the
    recomputation cannot be matched to its forward: a clear error, never other ids."""
    _, model = aot_pair("gpt2", "fc")
    model.train()
    wrap_layers(model, reentrant=False)
    with torch.autograd.graph.save_on_cpu(pin_memory=True):
        loss = aot.scalar(aot.run("gpt2", model, aot.batch()))
        with pytest.raises(RuntimeError, match="no training forward of this model recorded"):
            loss.backward()


def test_one_input_tensor_in_two_live_forwards_raises():
    """LLaMA's first layer takes the embedding output itself; made one shared tensor, two
    live forwards with different ids leave the recomputation no way to tell which applies."""
    _, model = aot_pair("llama", "kron")
    model.train()
    wrap_layers(model, reentrant=False)
    shared = torch.randn(3, 9, 32)
    model.model.embed_tokens.register_forward_hook(lambda module, args, out: shared)
    loss_1 = aot.scalar(aot.run("llama", model, aot.batch(seed=0)))
    aot.scalar(aot.run("llama", model, aot.batch(seed=1)))
    with pytest.raises(RuntimeError, match="2 live forwards passed to it"):
        loss_1.backward()


def forward_only(modules) -> None:
    """Make `modules` run `forward` when called, skipping their hooks."""
    for module in modules:

        class ForwardOnly(type(module)):
            def __call__(self, *args, **kwargs):
                return self.forward(*args, **kwargs)

        module.__class__ = ForwardOnly


def test_t5_blocks_called_through_forward_keep_the_bias():
    """transformers < 4.52 checkpoints T5 blocks through `block.forward`, which skips the
    blocks' hooks: the bias sits before each block's first sublayer, whose hooks still run."""
    base, model = aot_pair("t5", "kron")
    model.eval()
    ids = aot.batch()
    with torch.no_grad():
        expected = aot.run("t5", model, ids)
        forward_only(model.encoder.block)
        got = aot.run("t5", model, ids)
        unbiased = aot.run("t5", base.eval(), ids)
    assert not torch.allclose(expected, unbiased), "the bias is zero: the check is vacuous"
    assert_close(got, expected, torch.float32)


def test_layer_called_through_forward_raises():
    """A layer whose hooks are skipped (called through `.forward`) leaves out its bias: an
    error rather than a silent omission."""
    _, model = aot_pair("gpt2", "kron")
    forward_only(model.transformer.h)
    with pytest.raises(RuntimeError, match="ran 0 of its 2 AoT layer hooks"):
        aot.run("gpt2", model, aot.batch())


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_layer_called_outside_a_forward_raises(training):
    _, model = aot_pair("gpt2", "kron")
    model.train(training)
    aot.run("gpt2", model, aot.batch())
    with pytest.raises(RuntimeError, match="ran outside a forward"):
        model.transformer.h[0](torch.randn(3, 9, 32))


# --------------------------------------------------------------------------- bf16 autocast

AUTOCAST_PROMPT_CASES = [(arch, "dept") for arch in models.ARCHS] + [
    ("llama", "pt"),
    ("gpt2", "ept"),
]


@pytest.mark.parametrize(("arch", "method"), AUTOCAST_PROMPT_CASES)
def test_bf16_autocast_prompt_methods(arch, method):
    base, model = models.patched_pair(arch, method)
    model.train()
    inputs = models.batch()
    fp32_loss, _ = prompt_step(arch, copy.deepcopy(model), inputs)
    loss, grads = prompt_step(arch, model, inputs, autocast=BF16)
    model.dept_adapter.zero_grad()
    ids, mask, labels = inputs
    with torch.autocast("cpu", dtype=BF16):
        ref = models.reference_forward(arch, base.train(), model.dept_adapter, ids, mask, labels)
    ref.loss.backward()
    # Autocast is in effect: an fp32 step repeats bit for bit, this one moved.
    assert loss != fp32_loss
    assert_close(loss, ref.loss.detach(), BF16)
    for name, grad in models.grads(model.dept_adapter).items():
        assert grad.abs().sum() > 0, name
        assert_close(grads[name], grad, BF16)


@pytest.mark.parametrize("reparam", aot.REPARAMS)
@pytest.mark.parametrize("arch", AOT_ARCHS)
def test_bf16_autocast_aot(arch, reparam):
    base, model = aot_pair(arch, reparam, dropout=0.0)
    model.train()
    ids = aot.batch()
    fp32_loss, _ = aot_step(arch, copy.deepcopy(model), ids)
    loss, grads = aot_step(arch, model, ids, autocast=BF16)
    model.dept_adapter.zero_grad()
    base.train()
    with torch.autocast("cpu", dtype=BF16):
        tables = aot.formula_tables(model.dept_adapter, base.get_input_embeddings().weight)
        aot.hook_reference(base, arch, tables)
        ref = aot.scalar(aot.run(arch, base, ids))
    ref.backward()
    assert loss != fp32_loss
    assert_close(loss, ref.detach(), BF16)
    for name, grad in models.grads(model.dept_adapter).items():
        assert grad.abs().sum() > 0, name
        assert_close(grads[name], grad, BF16)


# --------------------------------------------------------------------------- no_grad, eval/train


@pytest.mark.parametrize("arch", models.ARCHS)
def test_no_grad_inference_dept(arch):
    base, model = models.patched_pair(arch, "dept")
    ids, mask, labels = models.batch()
    kw = {"input_ids": ids, "attention_mask": mask, "labels": labels if arch == "t5" else ids}
    with torch.no_grad():
        out = model(**kw).logits
    assert not out.requires_grad
    with torch.no_grad():
        ref = models.reference_forward(arch, base, model.dept_adapter, ids, mask, labels).logits
    assert_close(out, ref, FP32)
    assert_close(out, model(**kw).logits.detach(), FP32)
    assert_hook_state_empty(model)


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
@pytest.mark.parametrize("arch", ["gpt2", "bert", "deberta-v2"])
def test_no_grad_inference_aot(arch, fused):
    base, model = aot_pair(arch, "kron")
    tables = aot.formula_tables(model.dept_adapter, base.get_input_embeddings().weight)
    if fused:
        dk.merge(model)
    ids = aot.batch()
    with torch.no_grad():
        out = aot.run(arch, model, ids)
    assert not out.requires_grad
    aot.hook_reference(base, arch, [t.detach() for t in tables])
    with torch.no_grad():
        assert_close(out, aot.run(arch, base, ids), FP32)
    assert_hook_state_empty(model)


def dropout_reference(base: nn.Module, arch: str, adapter, p: float) -> None:
    """Hooks on the unpatched model adding P_i[ids] with AoT's dropout as docs/design.md §1
    states it: one mask per distinct id (sorted, as `torch.unique` gives them), drawn from
    torch's generator, on P_x (Kronecker) or on E[x] (FC), layer after layer."""
    inner, layers = aot.sites(base, arch)
    embedding = base.get_input_embeddings().weight.detach().float()
    seen = {}

    def record(module, args, kwargs):
        seen["ids"] = kwargs["input_ids"] if kwargs.get("input_ids") is not None else args[0]

    def add(layer):
        def hook(module, args, kwargs):
            used, inverse = torch.unique(seen["ids"], return_inverse=True)
            if adapter.config.reparam == "kron":
                kron = torch.kron(layer.w_l, layer.w_m)[used]
                rows = F.dropout(kron @ layer.w_r, p)
            else:
                x = F.dropout(embedding[used], p)
                rows = F.relu(x @ layer.w1 + layer.b1) @ layer.w2 + layer.b2
            return (args[0] + rows[inverse], *args[1:]), kwargs

        return hook

    inner.register_forward_pre_hook(record, with_kwargs=True)
    for site, layer in zip(layers, adapter.layers, strict=True):
        site.register_forward_pre_hook(add(layer), with_kwargs=True)


@pytest.mark.parametrize("reparam", aot.REPARAMS)
@pytest.mark.parametrize("arch", ["gpt2", "bert", "deberta-v2"])
def test_dropout_follows_eval_and_train(arch, reparam):
    p = 0.3
    base, model = aot_pair(arch, reparam, dropout=p)
    ids = aot.batch()
    tables = aot.formula_tables(model.dept_adapter, base.get_input_embeddings().weight)
    with torch.no_grad():
        plain = aot.run(arch, base, ids)
        handles = aot.hook_reference(base, arch, [t.detach() for t in tables])
        formula = aot.run(arch, base, ids)
        for handle in handles:
            handle.remove()
        dropout_reference(base.train(), arch, model.dept_adapter, p)
        torch.manual_seed(5)
        seeded = aot.run(arch, base, ids)

        model.eval()
        torch.manual_seed(5)
        evaluated = aot.run(arch, model, ids)
        torch.manual_seed(6)
        again = aot.run(arch, model, ids)
        model.train()
        torch.manual_seed(5)
        trained = aot.run(arch, model, ids)
        model.eval()
        back = aot.run(arch, model, ids)
    assert (formula - plain).abs().max() > 0.1 * formula.abs().max()  # the bias matters
    assert_close(evaluated, formula, FP32)
    torch.testing.assert_close(again, evaluated, atol=0, rtol=0)  # eval draws nothing
    torch.testing.assert_close(back, evaluated, atol=0, rtol=0)
    # Dropout moves the output by a hundred times the tolerance `seeded` is matched within.
    assert (trained - formula).abs().max() > 1e-3, "no dropout in training"
    assert_close(trained, seeded, FP32)
