"""What the engine tests share (tests/test_fsdp.py, test_fsdp1.py, test_deepspeed.py,
test_trainer_launch.py): the models and adapters they train, the process launch, and the
comparison with one process.

Each test module launches its 2 gloo ranks once (spawn, a file-store rendezvous, a deadline
after which they are killed) and runs all its cases there; the ranks save what they
gathered to files and leave through os._exit, and the test functions compare those files
with one process trained on the whole batch. Each rank takes half of a batch of 4
equal-length samples, so the ranks' averaged gradients are those of the whole batch.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import dept_kernels as dk
from dept_kernels.patch import attach_adapter, new_adapter

from . import assert_close
from .models import LM_CLASSES, make_config, tiny_config, tiny_model

WORLD = 2
# The ranks talk over gloo (CPU); every engine test module carries this mark.
NEEDS_GLOO = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed was built without the gloo backend",
)
# Learning rates of the one AdamW step (weight decay: param_groups' 0.01).
PROMPT_LR, LOWRANK_LR = 0.3, 1e-2


def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, mask, task_ids) of 4 equal-length samples; rank r takes rows 2r, 2r + 1."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 128, (4, 10), generator=g)
    return ids, torch.ones_like(ids), torch.tensor([0, 1, 1, 0])


def name(case: tuple[str, ...]) -> str:
    """A case's id: its parts joined (the key of its results and its pytest id)."""
    return "-".join(case)


def half(rank: int) -> slice:
    return slice(2 * rank, 2 * rank + 2)


def base_model(arch: str) -> torch.nn.Module:
    """A tiny random model; "gpt2-untied" is GPT-2 with its own LM head."""
    if arch == "gpt2-untied":
        config = tiny_config("gpt2")
        config.tie_word_embeddings = False
        torch.manual_seed(0)
        model = LM_CLASSES["gpt2"](config).eval()
        assert model.lm_head.weight is not model.transformer.wte.weight
        return model
    return tiny_model(arch)


def randomize(adapter: torch.nn.Module, seed: int = 2, add: bool = True) -> None:
    """Non-zero values in every adapter parameter (B, W_up, W_R, W_2 start at zero), so every
    gradient is exercised: added to the initialisation, or replacing it (`add=False`, for
    initialisations that draw from the global generator)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.parameters():
            noise = torch.randn(p.shape, generator=gen) * 0.1
            p.add_(noise) if add else p.copy_(noise * 5)


AOT = {"aot-kron": "kron", "aot-fc": "fc", "aot-fused": "kron"}


def config_of(method: str) -> object:
    if method in AOT:
        # No dropout: each rank would draw its own masks.
        return dk.AoTConfig(AOT[method], r=4, dropout=0.0)
    if method == "dept-text":  # the prompt initialised from rows of the embedding
        return dk.DePTConfig(4, r=3, max_length=16, prompt_init="text", init_text=(5, 6, 7))
    return make_config(method)


def patch_model(model: torch.nn.Module, method: str) -> torch.nn.Module:
    """`model` patched with `method`'s adapter, randomised; "stacked": two DePT tasks
    stacked; "peft": a PEFT prompt-tuning model accelerated by `dk.patch(model)`;
    "aot-fused": a trained-looking Kronecker adapter fused into tables (eval mode)."""
    if method == "peft":
        import peft

        task = "SEQ_2_SEQ_LM" if model.config.is_encoder_decoder else "CAUSAL_LM"
        config = peft.PromptTuningConfig(task_type=task, num_virtual_tokens=6)
        config.num_transformer_submodules = 1
        model = peft.get_peft_model(model, config)
        # PEFT draws its prompt from the global generator, whose state the model's
        # construction (from_pretrained or not) leaves different.
        randomize(model.prompt_encoder, seed=3, add=False)
        return dk.patch(model).train()
    if method == "stacked":
        # Two tasks' adapters for the same base, stacked (no copy of a partitioned model).
        tasks = []
        for seed in (1, 4):
            gen = torch.Generator().manual_seed(seed)
            tasks.append(new_adapter(model, make_config("dept"), generator=gen))
            randomize(tasks[-1], seed=seed + 1)
        return attach_adapter(model, type(tasks[0]).stack(tasks)).train()
    dk.patch(model, config_of(method), generator=torch.Generator().manual_seed(1))
    randomize(model.dept_adapter)
    if method == "aot-fused":
        return dk.merge(model).eval()
    return model.train()


def build(arch: str, method: str) -> torch.nn.Module:
    return patch_model(base_model(arch), method)


def forward(model: torch.nn.Module, method: str, rows: slice):
    """The model's output on `rows` of the batch (labels: the ids)."""
    ids, mask, task_ids = batch()
    kwargs = {"task_ids": task_ids[rows]} if method == "stacked" else {}
    return model(input_ids=ids[rows], attention_mask=mask[rows], labels=ids[rows], **kwargs)


def optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(dk.param_groups(model, prompt_lr=PROMPT_LR, lowrank_lr=LOWRANK_LR))


def adapter_params(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return dict(dk.adapter(model).named_parameters())


def single_process(arch: str, method: str) -> dict[str, dict[str, torch.Tensor]]:
    """What one process gives on the whole batch: the adapter's parameters before, gradients
    and parameters after one AdamW step; for a fused adapter (no parameters) the logits."""
    model = build(arch, method)
    if method == "aot-fused":
        with torch.no_grad():
            return {"logits": {"all": forward(model, method, slice(None)).logits}}
    params = adapter_params(model)
    before = {n: p.detach().clone() for n, p in params.items()}
    opt = optimizer(model)
    forward(model, method, slice(None)).loss.backward()
    grads = {n: p.grad.clone() for n, p in params.items()}
    opt.step()
    after = {n: p.detach().clone() for n, p in params.items()}
    return {"before": before, "grads": grads, "params": after}


def max_relative_difference(got: dict, want: dict) -> float:
    """max |got - want| / max |want| over all tensors of `want` (the table's number)."""
    scale = max(t.abs().max().item() for t in want.values())
    return max((got[n].float() - t.float()).abs().max().item() for n, t in want.items()) / scale


def compare(got: dict, want: dict, what: str) -> float:
    """Assert `got` matches `want` tensor by tensor at fp32 tolerance; the relative difference."""
    assert set(got) == set(want), (what, sorted(got), sorted(want))
    for name, tensor in want.items():
        assert tuple(got[name].shape) == tuple(tensor.shape), (what, name, got[name].shape)
        assert_close(got[name], tensor, torch.float32)
    return max_relative_difference(got, want)


def check_step(got: dict, want: dict, case: str) -> float:
    """A rank's gradients and stepped parameters against one process's: equal at fp32
    tolerance, every gradient non-zero and every parameter moved. Returns the max relative
    gradient difference, which is also printed (the README's table)."""
    for name, grad in want["grads"].items():
        assert grad.abs().sum() > 0, f"{case}: {name} has no gradient: the comparison is empty"
        assert not torch.equal(want["params"][name], want["before"][name]), (case, name)
    rel = compare(got["grads"], want["grads"], f"{case} gradients")
    compare(got["params"], want["params"], f"{case} parameters after the step")
    print(f"{case}: max relative gradient difference {rel:.2e}")
    return rel


def init_gloo(rank: int, store: str) -> None:
    # A file store: no port to pick and race for; the timeout bounds every wait on the peer.
    dist.init_process_group(
        "gloo",
        init_method=f"file://{store}",
        rank=rank,
        world_size=WORLD,
        timeout=timedelta(seconds=60),
    )
    torch.set_num_threads(1)


def run_cases(rank: int, cases: dict[str, Callable[[], dict]]) -> dict[str, dict]:
    """Each case's results on this rank, or its error (the other cases still run)."""
    results = {}
    for name, case in cases.items():
        try:
            results[name] = case()
        except Exception:
            results[name] = {"error": traceback.format_exc()}
    return results


def leave(results: dict, out: str, rank: int) -> None:
    """Save this rank's results and leave without interpreter shutdown."""
    torch.save(results, f"{out}.{rank}")
    if dist.is_initialized():
        dist.destroy_process_group()
    # Under pytest's output capture a rank was seen to finish and then hang in interpreter
    # shutdown; its results are on disk, so it leaves without one.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def launch(worker: Callable, args: tuple, tmp: Path, name: str, deadline: float = 240) -> list:
    """Run `worker(rank, store, out, *args)` on WORLD spawned ranks; their saved results.

    A rank that fails fails the launch; ranks still running at the deadline are killed and
    the test fails, rather than hang the suite.
    """
    out = str(tmp / "results")
    context = mp.start_processes(
        worker, args=(str(tmp / "store"), out, *args), nprocs=WORLD, join=False,
        start_method="spawn",
    )  # fmt: skip
    end = time.monotonic() + deadline
    while not context.join(timeout=5):
        if time.monotonic() > end:
            for process in context.processes:
                process.kill()
            pytest.fail(f"{name} ranks did not finish within {deadline:.0f} s")
    return [torch.load(f"{out}.{rank}", weights_only=True) for rank in range(WORLD)]


def result(results: list[dict], case: str, rank: int) -> dict:
    got = results[rank][case]
    if "error" in got:
        pytest.fail(f"{case} failed on rank {rank}:\n{got['error']}")
    return got


def trainer_step(model: torch.nn.Module, args) -> dict[str, dict[str, torch.Tensor]]:
    """One step of the Hugging Face Trainer with `args` on the 4-sample batch (the ranks
    of a distributed run each take their share of it), its optimizer AdamW over
    `dk.param_groups`: the adapter's gradients as the step reads them, and its parameters
    after the step (gathered under DeepSpeed ZeRO-3)."""
    from transformers import Trainer

    if model.config.is_encoder_decoder:
        # transformers' own issue (its PR #41006 fixes one model): T5's forward takes
        # **kwargs, so the Trainer passes num_items_in_batch and multiplies the loss by the
        # number of processes, but T5's loss is a mean that ignores it: the gradients of 2
        # processes would be twice those of 1, patched or not.
        model.accepts_loss_kwargs = False
    ids, mask, _ = batch()
    data = [
        {"input_ids": i, "attention_mask": m, "labels": i} for i, m in zip(ids, mask, strict=True)
    ]
    params = adapter_params(model)
    grads: dict[str, torch.Tensor] = {}

    def read_grads(*_) -> None:
        grads.update({n: p.grad.detach().clone() for n, p in params.items()})

    class AdapterTrainer(Trainer):
        # Under DeepSpeed the Trainer drops `optimizers=`: this is where the groups go.
        def create_optimizer(self, model=None):
            if self.optimizer is None:
                self.optimizer = optimizer(self.model)
                if not self.is_deepspeed_enabled:
                    self.optimizer.register_step_pre_hook(read_grads)
            return self.optimizer

    trainer = AdapterTrainer(model=model, args=args, train_dataset=data)
    if not trainer.is_deepspeed_enabled:
        trainer.train()
        return {"grads": grads, "params": {n: p.detach().clone() for n, p in params.items()}}
    import deepspeed
    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.utils import safe_get_full_grad

    step = DeepSpeedEngine.step

    def reading_step(engine, *a, **kw):
        # ZeRO-3 holds the reduced gradients in its partitions until the step.
        grads.update({n: safe_get_full_grad(p).detach().clone() for n, p in params.items()})
        return step(engine, *a, **kw)

    DeepSpeedEngine.step = reading_step
    try:
        trainer.train()
    finally:
        DeepSpeedEngine.step = step
    with deepspeed.zero.GatheredParameters(list(params.values())):
        after = {n: p.detach().clone() for n, p in params.items()}
    trainer.model_wrapped.destroy()
    return {"grads": grads, "params": after}


def check_saved(results: list[dict], saved: Path, case: str, arch: str, method: str) -> None:
    """What `save_adapter` wrote under an engine (`saved`/after) is the whole adapter after
    the step, loaded into a fresh unsharded model; each rank's reload into its shards (under
    `case`) holds the values before the step."""
    want = single_process(arch, method)
    fresh = dk.load_adapter(base_model(arch), saved / "after")
    compare(adapter_params(fresh), want["params"], "saved after the step")
    for rank in range(WORLD):
        compare(result(results, case, rank)["reloaded"], want["before"], "reloaded")
