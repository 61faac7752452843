"""FSDP1 (`FullyShardedDataParallel`, gloo, 2 processes on CPU) trains a patched model like
1 process.

Layouts (`use_orig_params=True`, which a frozen base with a trainable adapter in one unit
needs):
- "blocks": each transformer block is a unit (`ModuleWrapPolicy`), the rest, embedding and
  adapter included, is the root unit;
- "embedding": the input embedding is a unit of its own too. It works where the embedding
  is not tied to another module (LLaMA): the hooks read its weight inside its own call. With
  a tied embedding (GPT-2's LM head, T5's shared tables) FSDP1 cannot gather the weight for
  the other modules, and the unpatched model fails as well; the patched one raises a
  ValueError naming FSDP1 and the fix (keep the embedding in the root unit).
Each case compares the gathered adapter gradients and the parameters after one AdamW step
with one process on the whole batch (tests/helpers/distributed.py); save_adapter on the
wrapped model writes the whole adapter from rank 0.
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

HAS_FSDP1 = dist.is_available() and hasattr(torch.distributed.fsdp, "FullyShardedDataParallel")

pytestmark = [
    pytest.mark.skipif(
        not HAS_FSDP1,
        reason=f"torch {torch.__version__} has no torch.distributed.fsdp.FullyShardedDataParallel",
    ),
    NEEDS_GLOO,
]

CASES = [
    ("blocks", "llama", "dept"),
    ("blocks", "gpt2", "dept"),
    ("blocks", "t5", "dept"),
    ("blocks", "t5", "aot-fc"),
    ("blocks", "llama", "peft"),
    ("embedding", "llama", "dept"),
    ("embedding", "llama", "aot-fc"),
]
SAVED = [("blocks", "t5", "dept")]
# A tied embedding in a unit of its own: refused, naming FSDP1 and the fix.
REFUSED = [("embedding", "gpt2", "dept"), ("embedding", "t5", "dept")]


def wrap(model: torch.nn.Module, layout: str) -> torch.nn.Module:
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from transformers.models.gpt2.modeling_gpt2 import GPT2Block
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer
    from transformers.models.t5.modeling_t5 import T5Block

    units = {GPT2Block, LlamaDecoderLayer, T5Block}
    if layout == "embedding":
        units.add(type(model.get_input_embeddings()))
    # FSDP1 refuses the CPU unless given it as the device.
    return FullyShardedDataParallel(
        model,
        auto_wrap_policy=ModuleWrapPolicy(units),
        use_orig_params=True,
        device_id=torch.device("cpu"),
    )


def _case(rank: int, layout: str, arch: str, method: str, save: str | None) -> dict:
    from torch.distributed.fsdp import FullyShardedDataParallel

    model = build(arch, method)
    params = adapter_params(model)
    wrapped = wrap(model, layout)
    opt = optimizer(model)
    forward(wrapped, method, half(rank)).loss.backward()
    sharded = all(getattr(p, "_fsdp_flattened", False) for p in params.values())
    with FullyShardedDataParallel.summon_full_params(wrapped, with_grads=True):
        out = {"sharded": sharded, "grads": {n: p.grad.clone() for n, p in params.items()}}
    opt.step()
    with FullyShardedDataParallel.summon_full_params(wrapped):
        out["params"] = {n: p.detach().clone() for n, p in params.items()}
    if save:
        dk.save_adapter(wrapped, save)
    return out


def _refused(rank: int, layout: str, arch: str, method: str) -> dict:
    wrapped = wrap(build(arch, method), layout)
    try:
        forward(wrapped, method, half(rank))
    except ValueError as err:
        return {"message": str(err)}
    return {"message": ""}


def _patch_after_wrapping() -> dict:
    """The embedding is then a flattened FSDP1 shard: no (V, d) to build an adapter for."""
    wrapped = wrap(base_model("llama"), "blocks")
    try:
        dk.patch(wrapped, dk.DePTConfig(4, r=3, max_length=16))
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
    cases.update({name(case): (lambda case=case: _refused(rank, *case)) for case in REFUSED})
    cases["patch-after-wrapping"] = _patch_after_wrapping
    leave(run_cases(rank, cases), out, rank)


@pytest.fixture(scope="module")
def fsdp1_results(tmp_path_factory) -> tuple[list[dict], object]:
    """Both ranks' results for every case, from one launch of the process group."""
    tmp = tmp_path_factory.mktemp("fsdp1")
    return launch(_worker, (str(tmp),), tmp, "FSDP1"), tmp


@pytest.mark.parametrize("case", CASES, ids=name)
def test_fsdp1_matches_single_process(fsdp1_results, case):
    results, _ = fsdp1_results
    _, arch, method = case
    want = single_process(arch, method)
    for rank in range(WORLD):
        got = result(results, name(case), rank)
        assert got["sharded"], f"rank {rank}: FSDP1 did not flatten the adapter"
        check_step(got, want, f"FSDP1 {name(case)} rank {rank}")


@pytest.mark.parametrize("case", REFUSED, ids=name)
def test_tied_embedding_in_its_own_unit_names_fsdp1_and_the_fix(fsdp1_results, case):
    results, _ = fsdp1_results
    for rank in range(WORLD):
        message = result(results, name(case), rank)["message"]
        assert "FSDP1 wraps the input embedding" in message, message
        assert "Keep the embedding in the root unit" in message, message


@pytest.mark.parametrize("case", SAVED, ids=name)
def test_save_adapter_writes_the_whole_adapter(fsdp1_results, case):
    _, tmp = fsdp1_results
    _, arch, method = case
    want = single_process(arch, method)
    fresh = dk.load_adapter(base_model(arch), tmp / name(case))
    compare(adapter_params(fresh), want["params"], "saved after the step")


def test_patch_after_wrapping_is_refused(fsdp1_results):
    results, _ = fsdp1_results
    for rank in range(WORLD):
        message = result(results, "patch-after-wrapping", rank)["message"]
        assert "patch the model before wrapping it in FullyShardedDataParallel" in message
