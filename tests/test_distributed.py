"""DistributedDataParallel (gloo, 2 processes on CPU) trains a patched model like 1 process.

Each rank holds half of a batch of equal-length samples, so DDP's average of the ranks'
mean losses is the mean loss of the whole batch; after one backward every rank's adapter
gradients must equal those of a single process on the whole batch.
"""

from __future__ import annotations

import os
import socket
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


def _worker(rank: int, port: int, arch: str, method: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # A bounded wait: if the other rank dies, this one fails instead of hanging CI.
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=120))
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("arch,method", [("gpt2", "dept"), ("t5", "dept"), ("llama", "ept")])
def test_ddp_matches_single_process(tmp_path, arch, method):
    out = str(tmp_path / "grads")
    mp.start_processes(
        _worker, args=(_free_port(), arch, method, out), nprocs=WORLD, start_method="spawn"
    )
    single = patched(arch, method)
    ids, mask = batch()
    loss_of(single, ids, mask).backward()
    for rank in range(WORLD):
        grads = torch.load(f"{out}.{rank}", weights_only=True)
        for name, param in single.dept_adapter.named_parameters():
            torch.testing.assert_close(grads[name], param.grad, atol=1e-5, rtol=1e-4)
