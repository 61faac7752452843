"""FSDP2 (`fully_shard`, gloo, 2 processes on CPU) trains a patched model like 1 process.

Layouts:
- "blocks": each transformer block, then the root (the embedding lives in the root unit);
- "titan": torchtitan's, where the input embedding is a unit of its own, gathered only
  around its own call: LLaMA `fully_shard(embed_tokens)`; GPT-2 `fully_shard([wte,
  lm_head])` (tied) or `fully_shard(wte)` and `fully_shard([ln_f, lm_head])` (untied); T5
  its tied group `[shared, encoder.embed_tokens, decoder.embed_tokens, lm_head]`; then each
  block, then the root.
The adapter (in the root unit) is a DTensor shard between calls, gathered around its own
call, which the hooks make inside the embedding's. Each case compares the gathered adapter
gradients and the parameters after one AdamW step with one process on the whole batch (see
tests/helpers/distributed.py), for DePT, PT, EPT, AoT (Kronecker and FC factors, and fused
tables in eval), a stacked multi-task adapter and an accelerated PEFT model. save_adapter
on every rank writes the whole adapter from rank 0, which loads back into the shards and
into a fresh model.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from helpers.distributed import (
    NEEDS_GLOO,
    WORLD,
    adapter_params,
    base_model,
    build,
    check_saved,
    check_step,
    compare,
    forward,
    half,
    init_gloo,
    launch,
    leave,
    name,
    optimizer,
    result,
    run_cases,
    single_process,
)

import dept_kernels as dk

# FSDP2 became public API (`torch.distributed.fsdp.fully_shard`) in torch 2.6.
HAS_FULLY_SHARD = dist.is_available() and hasattr(torch.distributed.fsdp, "fully_shard")

pytestmark = [
    pytest.mark.skipif(
        not HAS_FULLY_SHARD,
        reason=f"torch {torch.__version__} has no torch.distributed.fsdp.fully_shard (FSDP2)",
    ),
    NEEDS_GLOO,
]

CASES = [
    ("blocks", "gpt2", "dept"),
    ("blocks", "llama", "dept"),
    ("titan", "llama", "dept"),
    ("titan", "gpt2", "dept"),
    ("titan", "gpt2-untied", "dept"),
    ("titan", "t5", "dept"),
    ("titan", "llama", "pt"),
    ("titan", "t5", "ept"),
    ("titan", "llama", "aot-kron"),
    ("titan", "gpt2", "aot-fc"),
    ("titan", "t5", "aot-fc"),
    ("titan", "llama", "aot-fused"),
    ("titan", "llama", "stacked"),
    ("titan", "llama", "peft"),
    ("titan", "t5", "peft"),
]
SAVED = [("titan", "t5", "dept"), ("titan", "gpt2", "aot-fc"), ("titan", "llama", "stacked")]


def blocks(model: torch.nn.Module, arch: str) -> list[torch.nn.Module]:
    if arch == "t5":
        return [*model.encoder.block, *model.decoder.block]
    return list(model.transformer.h if arch.startswith("gpt2") else model.model.layers)


def shard(model: torch.nn.Module, arch: str, layout: str) -> None:
    """`fully_shard` `model` in `layout` (a PEFT model: its base model's modules)."""
    from torch.distributed.fsdp import fully_shard

    base = model.base_model if hasattr(model, "peft_config") else model
    if layout == "titan":
        if arch == "t5":
            embedding = base.encoder.embed_tokens
            # transformers 4.x ties the stacks' embeddings as the `shared` module itself, 5.x
            # as separate modules sharing its weight: each module once in the group.
            tied = [base.shared, embedding, base.decoder.embed_tokens, base.lm_head]
            fully_shard(list(dict.fromkeys(tied)))
        elif arch == "gpt2":
            fully_shard([base.transformer.wte, base.lm_head])  # tied: one group
        else:
            fully_shard(base.get_input_embeddings())
    for block in blocks(base, arch):
        fully_shard(block)
    if layout == "titan" and arch == "gpt2-untied":
        fully_shard([base.transformer.ln_f, base.lm_head])
    fully_shard(model)


def full(tensors: dict) -> dict:
    return {n: t.detach().full_tensor() for n, t in tensors.items()}


def _case(rank: int, layout: str, arch: str, method: str, save: str | None) -> dict:
    model = build(arch, method)
    shard(model, arch, layout)
    if method == "aot-fused":
        with torch.no_grad():
            return {"logits": forward(model, method, half(rank)).logits}
    params = adapter_params(model)
    sharded = all(isinstance(p, dist.tensor.DTensor) for p in params.values())
    opt = optimizer(model)
    if save:
        dk.save_adapter(model, f"{save}/before")
    forward(model, method, half(rank)).loss.backward()
    out = {"sharded": sharded, "grads": full({n: p.grad for n, p in params.items()})}
    opt.step()
    out["params"] = full(params)
    if save:
        dk.save_adapter(model, f"{save}/after")
        dk.load_adapter(model, f"{save}/before")  # into the shards
        out["reloaded"] = full(params)
    return out


def _refused(peft: bool) -> dict:
    """patch after fully_shard: a new adapter's parameters would not be managed; an
    accelerated PEFT model's adapter would read the shards of PEFT's prompt."""
    from torch.distributed.fsdp import fully_shard

    if peft:
        model = dk.unpatch(build("llama", "peft"))  # the PEFT model, unaccelerated
        config = None
    else:
        model, config = base_model("llama"), dk.DePTConfig(4, r=3, max_length=16)
    fully_shard(model)
    try:
        dk.patch(model, config)
    except ValueError as err:
        return {"message": str(err)}
    return {"message": ""}


def _worker(rank: int, store: str, out: str, tmp: str) -> None:
    init_gloo(rank, store)
    cases = {
        name(case): (
            lambda case=case: _case(rank, *case, f"{tmp}/{name(case)}" if case in SAVED else None)
        )
        for case in CASES
    }
    cases["refused"] = lambda: _refused(peft=False)
    cases["refused-peft"] = lambda: _refused(peft=True)
    leave(run_cases(rank, cases), out, rank)


@pytest.fixture(scope="module")
def fsdp_results(tmp_path_factory) -> tuple[list[dict], object]:
    """Both ranks' results for every case, from one launch of the process group."""
    tmp = tmp_path_factory.mktemp("fsdp2")
    return launch(_worker, (str(tmp),), tmp, "FSDP2"), tmp


@pytest.mark.parametrize("case", CASES, ids=name)
def test_fully_shard_matches_single_process(fsdp_results, case):
    results, _ = fsdp_results
    _, arch, method = case
    want = single_process(arch, method)
    for rank in range(WORLD):
        got = result(results, name(case), rank)
        if method == "aot-fused":
            compare({"logits": got["logits"]}, {"logits": want["logits"]["all"][half(rank)]}, "")
            continue
        assert got["sharded"], f"rank {rank}: the adapter was not sharded"
        check_step(got, want, f"FSDP2 {name(case)} rank {rank}")


@pytest.mark.parametrize("case", SAVED, ids=name)
def test_save_adapter_writes_the_whole_adapter(fsdp_results, case):
    results, tmp = fsdp_results
    _, arch, method = case
    check_saved(results, tmp / name(case), name(case), arch, method)


@pytest.mark.parametrize("case", ["refused", "refused-peft"])
def test_patch_after_fully_shard_is_refused(fsdp_results, case):
    results, _ = fsdp_results
    for rank in range(WORLD):
        assert "patch the model before fully_shard" in result(results, case, rank)["message"]
