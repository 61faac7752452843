"""DistributedDataParallel (gloo, 2 processes on CPU) trains a patched model like 1 process.

Each rank holds half of a batch of equal-length samples, so DDP's average of the ranks'
mean losses is the mean loss of the whole batch; after one backward every rank's adapter
gradients must equal those of a single process on the whole batch.
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
from test_patch import make_config, tiny_model

import dept_kernels as dk

WORLD = 2


def batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 128, (4, 10), generator=g)
    return ids, torch.ones_like(ids)


def patched(arch: str, method: str):
    model = dk.patch(
        tiny_model(arch), make_config(method), generator=torch.Generator().manual_seed(1)
    )
    with torch.no_grad():  # non-zero low-rank factors, so every gradient is exercised
        for p in model.dept_adapter.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(2)) * 0.1)
    return model.train()


def loss_of(model, ids, mask):
    return model(input_ids=ids, attention_mask=mask, labels=ids).loss


def _worker(rank: int, store: str, arch: str, method: str, out: str) -> None:
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
        ddp = torch.nn.parallel.DistributedDataParallel(patched(arch, method))
        ids, mask = batch()
        half = slice(rank * 2, rank * 2 + 2)
        loss_of(ddp, ids[half], mask[half]).backward()
        grads = {n: p.grad for n, p in ddp.module.dept_adapter.named_parameters()}
        torch.save(grads, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()
    # Under pytest's output capture a rank was seen to finish this function and then hang
    # in interpreter shutdown; its results are on disk, so it leaves without one.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@pytest.mark.parametrize("arch,method", [("gpt2", "dept"), ("t5", "dept"), ("llama", "ept")])
def test_ddp_matches_single_process(tmp_path, arch, method):
    out = str(tmp_path / "grads")
    context = mp.start_processes(
        _worker,
        args=(str(tmp_path / "store"), arch, method, out),
        nprocs=WORLD,
        join=False,
        start_method="spawn",
    )
    # join() returns True once all ranks are done and raises if one failed; a rank that
    # never finishes fails the test after the deadline instead of hanging the suite.
    deadline = time.monotonic() + 240
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("DDP workers did not finish within 240 s")
    single = patched(arch, method)
    ids, mask = batch()
    loss_of(single, ids, mask).backward()
    for rank in range(WORLD):
        grads = torch.load(f"{out}.{rank}", weights_only=True)
        for name, param in single.dept_adapter.named_parameters():
            torch.testing.assert_close(grads[name], param.grad, atol=1e-5, rtol=1e-4)
