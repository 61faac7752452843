"""DeepSpeed ZeRO-3 (gloo, 2 processes on CPU, `DS_ACCELERATOR=cpu`) trains a patched model
like 1 process.

ZeRO-3 partitions every parameter (`stage3_param_persistence_threshold: 0`: even the tiny
models' are split) and gathers a module's own parameters around its call, so the hooks run
the fused op inside the call of the input embedding and call the adapter as a module.
Cases, each comparing the gathered adapter gradients and the parameters after one AdamW
step (`dk.param_groups`) with one process on the whole batch (tests/helpers/distributed.py):
- "initialize": `deepspeed.initialize(model=patched model, optimizer=AdamW(...))` for T5,
  GPT-2 and LLaMA with DePT, PT, EPT, AoT (Kronecker and FC factors; fused tables in eval),
  a stacked multi-task adapter and an accelerated PEFT model;
- "zero-init": `dk.patch` (or PEFT + `dk.patch(peft_model)`) after `from_pretrained` under
  an active ZeRO-3 config (`HfDeepSpeedConfig`), so the base weights are partitioned (shape
  (0,)) when the adapter is built, including a prompt initialised from embedding rows;
- "trainer": the Hugging Face `Trainer(args=TrainingArguments(deepspeed=...))` with a
  `create_optimizer` over `dk.param_groups`, the model from `from_pretrained` after the
  arguments (so under ZeRO-3 init); its reference is the Trainer in one process, whose loss
  scaling for causal LMs (`num_items_in_batch`) it shares.
save_adapter on every rank writes the whole adapter from rank 0, which loads back into the
partitions and into a fresh model.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
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
    patch_model,
    result,
    run_cases,
    single_process,
    trainer_step,
)
from helpers.models import LM_CLASSES

import dept_kernels as dk

HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None

pytestmark = [
    pytest.mark.skipif(
        not HAS_DEEPSPEED,
        reason="deepspeed is not installed (pip install 'dept-kernels[distributed]', with "
        "DS_BUILD_OPS=0 on a machine without CUDA)",
    ),
    NEEDS_GLOO,
]

ZERO3 = {"stage": 3, "stage3_param_persistence_threshold": 0}
CONFIG = {
    "train_micro_batch_size_per_gpu": 2,
    "gradient_accumulation_steps": 1,
    "gradient_clipping": 0.0,  # DeepSpeed's default clips at 1.0: the step is AdamW's alone
    "zero_optimization": ZERO3,
    "zero_allow_untested_optimizer": True,  # a torch AdamW over dk.param_groups
}
TRAINER_CONFIG = {
    "train_micro_batch_size_per_gpu": "auto",
    "train_batch_size": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "zero_optimization": ZERO3,
}

CASES = [
    ("initialize", "t5", "dept"),
    ("initialize", "gpt2", "dept"),
    ("initialize", "llama", "dept"),
    ("initialize", "llama", "pt"),
    ("initialize", "t5", "ept"),
    ("initialize", "llama", "aot-kron"),
    ("initialize", "gpt2", "aot-fc"),
    ("initialize", "t5", "aot-fc"),
    ("initialize", "llama", "aot-fused"),
    ("initialize", "gpt2", "stacked"),
    ("initialize", "llama", "peft"),
    ("zero-init", "t5", "dept"),
    ("zero-init", "gpt2", "dept-text"),
    ("zero-init", "llama", "dept"),
    ("zero-init", "llama", "aot-fc"),
    ("zero-init", "t5", "peft"),
]
ARCHS = ("t5", "gpt2", "llama")
TRAINER_CASES = [("trainer", arch, "dept") for arch in ARCHS]
SAVED = [
    ("initialize", "t5", "dept"),
    ("initialize", "gpt2", "aot-fc"),
    ("zero-init", "gpt2", "stacked"),
]
CASES.append(SAVED[-1])


def gathered(params: dict) -> dict:
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(params.values())):
        return {n: p.detach().clone() for n, p in params.items()}


def partitioned(params) -> bool:
    """Every parameter is a ZeRO-3 partition, empty between module calls."""
    return all(hasattr(p, "ds_id") and p.numel() == 0 for p in params)


def _case(rank: int, mode: str, arch: str, method: str, models: str, save: str | None) -> dict:
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    if mode == "zero-init":
        from transformers.integrations import HfDeepSpeedConfig

        active = HfDeepSpeedConfig(CONFIG)  # from_pretrained builds under deepspeed.zero.Init
        base = LM_CLASSES[arch].from_pretrained(f"{models}/{arch}").eval()
        built_partitioned = partitioned([base.get_input_embeddings().weight])
        model = patch_model(base, method)
        del active
    else:
        model = build(arch, method)
    opt = None if method == "aot-fused" else optimizer(model)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=CONFIG)
    out = {"embedding_partitioned": partitioned([model.get_input_embeddings().weight])}
    if mode == "zero-init":
        out["built_partitioned"] = built_partitioned
    if method == "aot-fused":
        with torch.no_grad():
            return {**out, "logits": forward(engine, method, half(rank)).logits}
    params = adapter_params(model)
    out["sharded"] = partitioned(params.values())
    if save:
        dk.save_adapter(model, f"{save}/before")
    engine.backward(forward(engine, method, half(rank)).loss)
    out["grads"] = {n: safe_get_full_grad(p).detach().clone() for n, p in params.items()}
    engine.step()
    out["params"] = gathered(params)
    if save:
        dk.save_adapter(model, f"{save}/after")
        dk.load_adapter(model, f"{save}/before")  # into the partitions
        out["reloaded"] = gathered(params)
    engine.destroy()
    return out


def _trainer_case(rank: int, arch: str, models: str, tmp: str) -> dict:
    from accelerate import PartialState
    from accelerate.state import AcceleratorState
    from transformers import TrainingArguments

    # One DeepSpeed Accelerator per process, unless the previous case's state is dropped.
    AcceleratorState._reset_state()

    # On a CPU, TrainingArguments(deepspeed=...) gives accelerate no backend, so it would
    # train as one process: a gloo DeepSpeed state made first, which the arguments reuse.
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    try:
        PartialState(backend="gloo")
    finally:
        del os.environ["ACCELERATE_USE_DEEPSPEED"]
    # The arguments first: while they live, from_pretrained builds under ZeRO-3 init.
    args = TrainingArguments(
        deepspeed=TRAINER_CONFIG,
        accelerator_config={"use_configured_state": True},
        **trainer_args(f"{tmp}/{arch}", 2),
    )
    assert args.world_size == WORLD, args.world_size
    base = LM_CLASSES[arch].from_pretrained(f"{models}/{arch}").eval()
    built_partitioned = partitioned([base.get_input_embeddings().weight])
    model = patch_model(base, "dept")
    out = trainer_step(model, args)
    return {**out, "built_partitioned": built_partitioned}


def trainer_args(output_dir: str, batch_size: int) -> dict:
    return {
        "output_dir": output_dir,
        "per_device_train_batch_size": batch_size,
        "max_steps": 1,
        "max_grad_norm": 0.0,  # no clipping: the step is AdamW's alone
        "report_to": "none",
        "save_strategy": "no",
        "disable_tqdm": True,
        "seed": 0,
    }


def _worker(rank: int, store: str, out: str, models: str, tmp: str) -> None:
    os.environ["DS_ACCELERATOR"] = "cpu"
    # Accelerate (under the Trainer) and DeepSpeed read the launch from the environment;
    # the gloo group is the one initialised here.
    port = os.environ["DEPT_TEST_PORT"]
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
    )  # fmt: skip
    init_gloo(rank, store)
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    cases = {}
    for case in CASES:
        save = f"{tmp}/{name(case)}" if case in SAVED else None
        cases[name(case)] = lambda case=case, save=save: _case(rank, *case, models, save)
    for case in TRAINER_CASES:
        cases[name(case)] = lambda arch=case[1]: _trainer_case(rank, arch, models, tmp)
    leave(run_cases(rank, cases), out, rank)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ds_results(tmp_path_factory) -> tuple[list[dict], object]:
    """Both ranks' results for every case, from one launch of the process group."""
    tmp = tmp_path_factory.mktemp("deepspeed")
    models = tmp / "models"
    for arch in ARCHS:
        base_model(arch).save_pretrained(models / arch)
    saved = {k: os.environ.get(k) for k in ("DS_ACCELERATOR", "DEPT_TEST_PORT")}
    # Spawned ranks inherit these; DeepSpeed reads DS_ACCELERATOR when first imported.
    os.environ.update(DS_ACCELERATOR="cpu", DEPT_TEST_PORT=str(free_port()))
    try:
        results = launch(_worker, (str(models), str(tmp)), tmp, "DeepSpeed", deadline=300)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return results, tmp


@pytest.mark.parametrize("case", CASES, ids=name)
def test_zero3_matches_single_process(ds_results, case):
    results, _ = ds_results
    mode, arch, method = case
    want = single_process(arch, method)
    for rank in range(WORLD):
        got = result(results, name(case), rank)
        assert got["embedding_partitioned"], f"rank {rank}: the embedding was not partitioned"
        if mode == "zero-init":
            assert got["built_partitioned"], f"rank {rank}: from_pretrained did not partition"
        if method == "aot-fused":
            compare({"logits": got["logits"]}, {"logits": want["logits"]["all"][half(rank)]}, "")
            continue
        assert got["sharded"], f"rank {rank}: the adapter was not partitioned"
        check_step(got, want, f"ZeRO-3 {name(case)} rank {rank}")


@pytest.mark.parametrize("case", TRAINER_CASES, ids=name)
def test_trainer_zero3_matches_single_process_trainer(ds_results, case, tmp_path):
    from transformers import TrainingArguments

    results, _ = ds_results
    arch = case[1]
    model = build(arch, "dept")
    before = {n: p.detach().clone() for n, p in adapter_params(model).items()}
    args = TrainingArguments(use_cpu=True, **trainer_args(str(tmp_path), 4))
    want = {"before": before, **trainer_step(model, args)}
    for rank in range(WORLD):
        got = result(results, name(case), rank)
        assert got["built_partitioned"], f"rank {rank}: from_pretrained did not partition"
        check_step(got, want, f"ZeRO-3 Trainer {name(case)} rank {rank}")


@pytest.mark.parametrize("case", SAVED, ids=name)
def test_save_adapter_writes_the_whole_adapter(ds_results, case):
    results, tmp = ds_results
    _, arch, method = case
    check_saved(results, tmp / name(case), name(case), arch, method)
