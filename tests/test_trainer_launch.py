"""The Hugging Face Trainer under 2 processes started by accelerate's `notebook_launcher`
(CPU, gloo DDP) trains a patched model like the Trainer in 1 process.

`accelerate launch --cpu --num_processes 2` starts one process (accelerate's own rule for
the CPU), so a multi-process CPU run comes from `notebook_launcher` (or `--multi_gpu`).
Each rank's Trainer takes its half of the 4-sample batch; its optimizer is AdamW over
`dk.param_groups`. The gradients the step reads and the parameters after it must equal
those of the Trainer in one process on the whole batch (tests/helpers/distributed.py).
The launcher runs in a spawned driver process of its own session, killed with its ranks if
they pass the deadline.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import time

import pytest
import torch
from helpers.distributed import (
    NEEDS_GLOO,
    WORLD,
    adapter_params,
    build,
    check_step,
    trainer_step,
)

ARCHS = ("t5", "gpt2", "llama")

pytestmark = NEEDS_GLOO


def trainer_args(output_dir: str, batch_size: int) -> dict:
    return {
        "output_dir": output_dir,
        "use_cpu": True,
        "per_device_train_batch_size": batch_size,
        "max_steps": 1,
        "max_grad_norm": 0.0,  # no clipping: the step is AdamW's alone
        "report_to": "none",
        "save_strategy": "no",
        "disable_tqdm": True,
        "seed": 0,
    }


def _train(out: str, tmp: str) -> None:
    """One rank of the launch: a Trainer step for each architecture."""
    from transformers import TrainingArguments

    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    results = {}
    for arch in ARCHS:
        args = TrainingArguments(**trainer_args(f"{tmp}/{arch}", 2))
        assert args.world_size == WORLD, args.world_size
        results[arch] = trainer_step(build(arch, "dept"), args)
    torch.save(results, f"{out}.{rank}")


def _driver(out: str, tmp: str, port: int) -> None:
    os.setsid()  # the test kills the session: this process and the ranks it forks
    from accelerate import notebook_launcher

    notebook_launcher(_train, args=(out, tmp), num_processes=WORLD, use_port=str(port))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def launched(tmp_path_factory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("notebook_launcher")
    out = str(tmp / "results")
    driver = multiprocessing.get_context("spawn").Process(
        target=_driver, args=(out, str(tmp), free_port())
    )
    driver.start()
    driver.join(timeout=240)
    if driver.is_alive():
        os.killpg(driver.pid, signal.SIGKILL)
        driver.join()
        pytest.fail("the notebook_launcher ranks did not finish within 240 s")
    assert driver.exitcode == 0, f"the notebook_launcher driver exited with {driver.exitcode}"
    # The files of both ranks, written before the launcher returned.
    deadline = time.monotonic() + 10
    while not all(os.path.exists(f"{out}.{r}") for r in range(WORLD)):
        assert time.monotonic() < deadline, "a rank wrote no results"
        time.sleep(0.1)
    return [torch.load(f"{out}.{rank}", weights_only=True) for rank in range(WORLD)]


@pytest.mark.parametrize("arch", ARCHS)
def test_notebook_launcher_trainer_matches_one_process(launched, arch, tmp_path):
    from transformers import TrainingArguments

    model = build(arch, "dept")
    before = {n: p.detach().clone() for n, p in adapter_params(model).items()}
    want = {
        "before": before,
        **trainer_step(model, TrainingArguments(**trainer_args(str(tmp_path), 4))),
    }
    for rank in range(WORLD):
        check_step(
            launched[rank][arch], want, f"DDP Trainer (notebook_launcher) {arch} rank {rank}"
        )
