"""`torch.compile(fullgraph=True)` of a patched model's train step.

The step is forward and loss under `torch.compile(fullgraph=True)` (a graph break raises),
then `loss.backward()`, which runs the backward graph AOTAutograd compiled with it. Loss
and adapter gradients must equal the eager step's. Most cases use the `aot_eager` backend,
which traces everything Inductor would (Dynamo, the ops' fake implementations, AOTAutograd's
joint graph) without generating C++; one case per method runs Inductor end to end.

Dropout is 0 throughout: compiled graphs draw random numbers differently from eager.
"""

from __future__ import annotations

import pytest
import torch
from helpers import DEVICE, assert_close
from helpers.aot import randomize
from helpers.models import ARCHS, VOCAB, tiny_model

import dept_kernels as dk

# Below torch 2.13 Dynamo fails building guards on the patch's module hooks (torch 2.11:
# InternalTorchDynamoError, "'function' object has no attribute '__func__'"); README says so.
pytestmark = pytest.mark.skipif(
    tuple(int(x) for x in torch.__version__.split(".")[:2]) < (2, 13),
    reason=f"torch.compile of a patched model needs torch >= 2.13, this is {torch.__version__}",
)

CONFIGS = {
    "dept": dk.DePTConfig(num_virtual_tokens=4, r=3, max_length=16),
    "pt": dk.PromptTuningConfig(num_virtual_tokens=4),
    "aot-kron": dk.AoTConfig("kron", r=4, dropout=0.0),
    "aot-fc": dk.AoTConfig("fc", r=8, dropout=0.0),
}


def patched(arch: str, method: str) -> torch.nn.Module:
    model = tiny_model(arch).to(DEVICE)
    # HF's GPT-2 names no loss type, and its warning about that is a graph break of its own.
    model.loss_type = "ForCausalLM"
    dk.patch(model, CONFIGS[method], generator=torch.Generator().manual_seed(0))
    if method.startswith("aot"):
        randomize(model.dept_adapter)
    elif method == "dept":
        with torch.no_grad():  # B starts at zero; a non-zero one makes A's gradient non-zero
            model.dept_adapter.lora_b.normal_(0, 0.5)
    return model.train()


def batch(arch: str, seed: int, s: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (3, s), generator=gen)
    mask = torch.ones(3, s, dtype=torch.long)
    mask[1, s - 3 :] = 0  # right padding in one row
    labels = torch.randint(2, VOCAB, (3, 5 if arch == "t5" else s), generator=gen)
    inputs = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    return {name: t.to(DEVICE) for name, t in inputs.items()}


def train_step(model: torch.nn.Module, step, inputs: dict) -> tuple[torch.Tensor, dict]:
    model.zero_grad(set_to_none=True)
    loss = step(**inputs)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.dept_adapter.named_parameters()}
    return loss.detach(), grads


# Every architecture with DePT and AoT (Kronecker); the other methods share those hooks and
# run once, on the fastest architecture to trace. Inductor runs one case end to end: the FC
# form, whose distinct-id op has a data-dependent size (tens of seconds of C++ here).
CASES = [(arch, method) for arch in ARCHS for method in ("dept", "aot-kron")] + [
    ("gpt2", "pt"),
    ("gpt2", "aot-fc"),
]
INDUCTOR = {("gpt2", "aot-fc")}


def check_compiled_step(arch: str, method: str, lengths: tuple[int, ...]) -> None:
    torch._dynamo.reset()
    model = patched(arch, method)

    def step(**inputs):
        return model(**inputs).loss

    backend = "inductor" if (arch, method) in INDUCTOR else "aot_eager"
    compiled = torch.compile(step, fullgraph=True, backend=backend)
    for seed, s in enumerate(lengths):
        inputs = batch(arch, seed, s)
        loss, grads = train_step(model, step, inputs)
        c_loss, c_grads = train_step(model, compiled, inputs)
        assert_close(c_loss, loss, torch.float32)
        assert grads.keys() == c_grads.keys() and grads
        for name, grad in grads.items():
            assert grad.abs().sum() > 0, f"{name}: zero gradient, the comparison is vacuous"
            assert_close(c_grads[name], grad, torch.float32)


@pytest.mark.parametrize(("arch", "method"), CASES)
def test_compiled_train_step_equals_eager(arch, method):
    check_compiled_step(arch, method, lengths=(9,))


@pytest.mark.parametrize("method", ["dept", "aot-kron"])
def test_compiled_step_across_lengths(method):
    """A second batch length recompiles (or runs a dynamic graph) and stays exact."""
    check_compiled_step("gpt2", method, lengths=(9, 12, 5))


def test_compiled_model_still_checks_ids():
    """Range checks that read the ids run inside the ops' custom ops, so a compiled model
    rejects out-of-range ids at run time, as the eager one does."""
    torch._dynamo.reset()
    model = patched("llama", "aot-kron")
    compiled = torch.compile(lambda **kw: model(**kw).loss, fullgraph=True, backend="aot_eager")
    inputs = batch("llama", 0, 9)
    compiled(**inputs)
    inputs["input_ids"][0, 0] = VOCAB
    with pytest.raises(IndexError, match="input_ids holds id"):
        compiled(**inputs)


@pytest.mark.parametrize("method", ["dept", "aot-fc"])
def test_compiled_stacked_adapter_with_task_ids(method):
    """Multi-task batches: task_ids reach the hooks through the compiled call too."""
    torch._dynamo.reset()
    tasks = []
    for seed in (0, 1):
        task = tiny_model("gpt2").to(DEVICE)
        dk.patch(task, CONFIGS[method], generator=torch.Generator().manual_seed(seed))
        if method.startswith("aot"):
            randomize(task.dept_adapter, seed=seed + 1)
            dk.merge(task)
        tasks.append(task)
    model = dk.stack_adapters(tasks)
    model.loss_type = "ForCausalLM"
    model.eval()
    inputs = batch("gpt2", 0, 9)
    task_ids = torch.tensor([1, 0, 1], device=DEVICE)

    def logits(**kw):
        return model(**kw).logits

    compiled = torch.compile(logits, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        expected = logits(**inputs, task_ids=task_ids)
        actual = compiled(**inputs, task_ids=task_ids)
    assert_close(actual, expected, torch.float32)


def test_compiled_op_with_visual_rows():
    """The visual rows go through the custom op's schema, fake and autograd under
    fullgraph=True: output (B, m + s + n_v, d) and every gradient, d_visual included, equal
    the eager op's."""
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(0)

    def leaf(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(DEVICE).requires_grad_()

    ids = torch.randint(0, 20, (3, 6), generator=gen).to(DEVICE)
    params = [leaf(20, 12), leaf(4, 12), leaf(8, 3), leaf(3, 12)]
    # Non-contiguous, as a projection's transposed output would be.
    visual_leaf = leaf(3, 12, 5)

    def step(weight, prompt, lora_a, lora_b, visual):
        return dk.ops.dept_embedding(
            ids, weight, prompt, lora_a, lora_b, scaling=0.5, visual=visual.transpose(1, 2)
        )

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    leaves = [*params, visual_leaf]
    grad_out = torch.randn(3, 4 + 6 + 5, 12, generator=gen).to(DEVICE)
    results = []
    for fn in (step, compiled):
        out = fn(*leaves)
        results.append((out, torch.autograd.grad(out, leaves, grad_out)))
    (eager, eager_grads), (out, grads) = results
    assert out.shape == (3, 15, 12)
    assert_close(out, eager, torch.float32)
    for got, want in zip(grads, eager_grads, strict=True):
        assert_close(got, want, torch.float32)
    assert torch.equal(grads[-1], grad_out[:, 10:].transpose(1, 2))
