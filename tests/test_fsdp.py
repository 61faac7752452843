"""FSDP2 (`fully_shard`, gloo, 2 processes on CPU) trains a patched model like 1 process.

Each layer and the whole model are sharded, so the adapter's parameters are DTensor shards
that FSDP gathers for the forward (the embedding hook reads them outside any sharded
module's own forward) and whose gradients it reduce-scatters. Each rank holds half of a
batch of equal-length samples, so the ranks' averaged gradients are those of one process on
the whole batch; after one AdamW step the gathered parameters must equal that process's.
The process pattern is tests/test_distributed.py's: file-store rendezvous, a deadline,
ranks that leave through os._exit.
"""

from __future__ import annotations

import os
import sys
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import assert_close
from test_distributed import batch, loss_of, patched

import dept_kernels as dk

WORLD = 2
CASES = ("gpt2", "llama")
# FSDP2 became public API (`torch.distributed.fsdp.fully_shard`) in torch 2.6.
HAS_FULLY_SHARD = dist.is_available() and hasattr(torch.distributed.fsdp, "fully_shard")

pytestmark = [
    pytest.mark.skipif(
        not HAS_FULLY_SHARD,
        reason=f"torch {torch.__version__} has no torch.distributed.fsdp.fully_shard (FSDP2)",
    ),
    pytest.mark.skipif(
        HAS_FULLY_SHARD and not dist.is_gloo_available(),
        reason="torch.distributed was built without the gloo backend",
    ),
]


def layers_of(model: torch.nn.Module, arch: str) -> torch.nn.ModuleList:
    return model.transformer.h if arch == "gpt2" else model.model.layers


def optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(dk.param_groups(model, prompt_lr=0.3, lowrank_lr=1e-2))


def _worker(rank: int, store: str, out: str) -> None:
    from torch.distributed.fsdp import fully_shard

    # A file store: no port to pick and race for; the timeout bounds every wait on the peer.
    dist.init_process_group(
        "gloo",
        init_method=f"file://{store}",
        rank=rank,
        world_size=WORLD,
        timeout=timedelta(seconds=60),
    )
    torch.set_num_threads(1)
    try:
        results = {}
        for arch in CASES:
            model = patched(arch, "dept")
            for layer in layers_of(model, arch):
                fully_shard(layer)
            fully_shard(model)
            adapter = model.dept_adapter
            sharded = all(isinstance(p, dist.tensor.DTensor) for p in adapter.parameters())
            ids, mask = batch()
            half = slice(rank * 2, rank * 2 + 2)
            opt = optimizer(model)
            loss_of(model, ids[half], mask[half]).backward()
            grads = {n: p.grad.full_tensor() for n, p in adapter.named_parameters()}
            opt.step()
            params = {n: p.detach().full_tensor() for n, p in adapter.named_parameters()}
            results[arch] = {"sharded": sharded, "grads": grads, "params": params}
        torch.save(results, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()
    # Under pytest's output capture a rank was seen to finish this function and then hang
    # in interpreter shutdown; its results are on disk, so it leaves without one.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@pytest.fixture(scope="module")
def fsdp_results(tmp_path_factory) -> list[dict]:
    """Both ranks' results for every case, from one launch of the process group."""
    tmp = tmp_path_factory.mktemp("fsdp")
    out = str(tmp / "results")
    context = mp.start_processes(
        _worker, args=(str(tmp / "store"), out), nprocs=WORLD, join=False, start_method="spawn"
    )
    # join() returns True once all ranks are done and raises if one failed; a rank that
    # never finishes fails the test after the deadline instead of hanging the suite.
    deadline = time.monotonic() + 240
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("FSDP workers did not finish within 240 s")
    return [torch.load(f"{out}.{rank}", weights_only=True) for rank in range(WORLD)]


@pytest.mark.parametrize("arch", CASES)
def test_fully_shard_matches_single_process(fsdp_results, arch):
    single = patched(arch, "dept")
    adapter = single.dept_adapter
    before = {n: p.detach().clone() for n, p in adapter.named_parameters()}
    opt = optimizer(single)
    ids, mask = batch()
    loss_of(single, ids, mask).backward()
    grads = {n: p.grad.clone() for n, p in adapter.named_parameters()}
    opt.step()
    for rank, results in enumerate(fsdp_results):
        got = results[arch]
        assert got["sharded"], f"rank {rank}: the adapter was not sharded"
        for name, param in adapter.named_parameters():
            assert grads[name].abs().sum() > 0, name
            assert_close(got["grads"][name], grads[name], torch.float32)
            assert not torch.equal(param, before[name]), f"{name}: the step changed nothing"
            assert_close(got["params"][name], param.detach(), torch.float32)
