"""DistributedDataParallel (gloo, 2 processes on CPU) trains a patched model like 1 process.

Each rank holds half of a batch of equal-length samples, so DDP's average of the ranks'
mean losses is the mean loss of the whole batch: every rank's adapter gradients, and its
parameters after one AdamW step, must equal those of one process on the whole batch. One
launch of the process group runs every case (tests/helpers/distributed.py).
"""

from __future__ import annotations

import pytest
import torch
from helpers.distributed import (
    NEEDS_GLOO,
    WORLD,
    adapter_params,
    build,
    check_step,
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

pytestmark = NEEDS_GLOO

CASES = [("gpt2", "dept"), ("t5", "dept"), ("llama", "ept")]


def _case(rank: int, arch: str, method: str) -> dict:
    model = build(arch, method)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    params = adapter_params(model)
    opt = optimizer(model)
    forward(ddp, method, half(rank)).loss.backward()
    out = {"grads": {n: p.grad.clone() for n, p in params.items()}}
    opt.step()
    out["params"] = {n: p.detach().clone() for n, p in params.items()}
    return out


def _worker(rank: int, store: str, out: str) -> None:
    init_gloo(rank, store)
    cases = {name(case): (lambda case=case: _case(rank, *case)) for case in CASES}
    leave(run_cases(rank, cases), out, rank)


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory) -> list[dict]:
    """Both ranks' results for every case, from one launch of the process group."""
    tmp = tmp_path_factory.mktemp("ddp")
    return launch(_worker, (), tmp, "DDP")


@pytest.mark.parametrize("case", CASES, ids=name)
def test_ddp_matches_single_process(ddp_results, case):
    want = single_process(*case)
    for rank in range(WORLD):
        check_step(result(ddp_results, name(case), rank), want, f"DDP {name(case)} rank {rank}")
