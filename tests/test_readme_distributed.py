"""The README's "Distributed training" blocks run as written under 2 processes.

They are fenced as `python torchrun` (tests/test_readme.py runs the plain `python` blocks in
one process, where they could not start). Here 2 spawned gloo ranks get torchrun's
environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) and run each block in turn, with
`from_pretrained` loading a tiny model of the named architecture saved to disk (so that a
ZeRO-3 config still loads it partitioned). Every block ends with `dk.save_adapter(model,
"adapter/")`: what rank 0 wrote must load onto a fresh model with the full shapes.
"""

from __future__ import annotations

import importlib.util
import os
import re
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from helpers.distributed import NEEDS_GLOO, WORLD, base_model, launch, leave

import dept_kernels as dk

ROOT = Path(__file__).resolve().parents[1]
ARCHS = {"LlamaForCausalLM": "llama", "T5ForConditionalGeneration": "t5"}


def blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = re.search(r"\n## Distributed training\n(.*?)\n## ", text, re.S).group(1)
    return re.findall(r"```python torchrun\n(.*?)```", section, re.S)


def arch_of(block: str) -> str:
    return next(arch for name, arch in ARCHS.items() if name in block)


pytestmark = NEEDS_GLOO


def _worker(rank: int, store: str, out: str, models: str, ports: list[int], tmp: str) -> None:
    from transformers import PreTrainedModel

    torch.set_num_threads(1)
    load = PreTrainedModel.from_pretrained.__func__

    def local(cls, name, *args, **kwargs):
        return load(cls, f"{models}/{cls.config_class.model_type}", *args, **kwargs)

    PreTrainedModel.from_pretrained = classmethod(local)
    results = {}
    for i, (block, port) in enumerate(zip(blocks(), ports, strict=True)):
        os.environ.update(
            RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD),
            LOCAL_WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
        )  # fmt: skip
        os.makedirs(f"{tmp}/block{i}", exist_ok=True)
        os.chdir(f"{tmp}/block{i}")
        try:
            exec(compile(block, f"README.md distributed block {i}", "exec"), {"__name__": "rd"})
            results[i] = {"ok": True}
        except Exception:
            results[i] = {"error": traceback.format_exc()}
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
    leave(results, out, rank)


def free_ports(count: int) -> list[int]:
    import socket

    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.fixture(scope="module")
def ran(tmp_path_factory) -> tuple[list[dict], Path]:
    tmp = tmp_path_factory.mktemp("readme_distributed")
    for arch in ARCHS.values():
        base_model(arch).save_pretrained(tmp / "models" / arch)
    saved = os.environ.get("DS_ACCELERATOR")
    os.environ["DS_ACCELERATOR"] = "cpu"  # the ranks inherit it; DeepSpeed reads it on import
    try:
        args = (str(tmp / "models"), free_ports(len(blocks())), str(tmp))
        results = launch(_worker, args, tmp, "README distributed blocks", deadline=240)
    finally:
        if saved is None:
            os.environ.pop("DS_ACCELERATOR")
        else:
            os.environ["DS_ACCELERATOR"] = saved
    return results, tmp


def test_readme_has_distributed_blocks():
    assert len(blocks()) == 4
    assert all("dk.save_adapter(model" in block for block in blocks())


@pytest.mark.parametrize("index", range(len(blocks())))
def test_readme_distributed_block_runs(ran, index):
    results, tmp = ran
    block = blocks()[index]
    if "deepspeed" in block.split("\n\n")[0] and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed (pip install 'dept-kernels[distributed]')")
    for rank in range(WORLD):
        got = results[rank][index]
        assert "error" not in got, f"rank {rank}:\n{got['error']}"
    # The whole adapter, as rank 0 wrote it: it loads onto an unsharded model.
    model = dk.load_adapter(base_model(arch_of(block)), tmp / f"block{index}" / "adapter")
    width = model.get_input_embeddings().weight.shape[1]
    assert dk.adapter(model).prompt.shape == (40, width)
