"""Adapter files: this library's safetensors format and the official DePT checkpoint format.

`save_adapter` writes `adapter_config.json` (the method name, its config fields and
`num_tasks`, T for a stacked adapter; for AoT also whether it is fused and the vocabulary
size V its tables are indexed by) and
`adapter_model.safetensors` (the adapter's parameters, or an AoT adapter's fused tables,
PEFT style). `load_dept_checkpoint` reads what the official DePT
code saves: `adapter_config.json` with peft_type PROMPT_TUNING_LORA and a torch-saved
`adapter_model.bin` holding `prompt_embeddings` and, unless it was not saved,
`prompt_encoder.lora_embedding_A` / `..._B`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ._engines import (
    fsdp1_wrapper,
    full_shape,
    full_tensors,
    is_deepspeed,
    is_dtensor,
    is_fsdp1_flat,
    is_sharded,
)
from .methods import METHODS, AoTAdapter, AoTConfig, DePTConfig, PromptAdapter
from .patch import adapter as adapter_of
from .patch import attach_adapter, new_adapter, patch

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
OFFICIAL_WEIGHTS_NAME = "adapter_model.bin"
_BY_METHOD = {cls.method: cls for cls in METHODS}


def save_adapter(model: nn.Module, directory: str | os.PathLike) -> None:
    """Write the patched model's adapter to `directory` (config JSON + safetensors).

    `num_tasks` is T for a stacked adapter (`stack_adapters`), else null. AoT adapters also
    record `fused`: a fused adapter saves its (V, d) or (T, V, d) tables instead of its
    reparameterisation, and `vocab_size`: V, which the Kronecker and FC shapes need not show.
    A stacked EPT adapter is a prompt-tuning one and saves as such.

    In a process group, rank 0 writes. An adapter that an engine shards (FSDP2, FSDP1,
    DeepSpeed ZeRO-3) is saved whole: call this on every rank (they gather the full tensors
    together; for FSDP1 pass the FullyShardedDataParallel-wrapped model), and every rank
    returns once the files are written. An unsharded one (DDP) may be saved from rank 0
    alone.
    """
    adapter = adapter_of(model)
    directory = Path(directory)
    sharded = _sharded(adapter)
    with _whole(model, adapter, sharded, writeback=False) as state:
        config = {"method": adapter.config.method, **dataclasses.asdict(adapter.config)}
        if isinstance(adapter, AoTAdapter):
            config["fused"] = adapter.fused
            config["vocab_size"] = adapter.vocab
        config["num_tasks"] = adapter.num_tasks
        names = list(state)
        values = full_tensors([state[n] for n in names])
        tensors = {n: t.cpu().contiguous() for n, t in zip(names, values, strict=True)}
    # One writer: ranks writing the same files at once could interleave them.
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if not distributed or torch.distributed.get_rank() == 0:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    if sharded:
        # The other ranks return once the files exist (they may read them next).
        torch.distributed.barrier()


def _sharded(adapter: nn.Module) -> bool:
    """Whether an engine shards `adapter`'s parameters (then all ranks save and load it)."""
    return is_sharded(adapter.parameters()) and torch.distributed.is_initialized()


@contextlib.contextmanager
def _whole(
    model: nn.Module, adapter: nn.Module, sharded: bool, writeback: bool
) -> Iterator[dict[str, Tensor]]:
    """`adapter`'s state as its Parameters and buffers (`keep_vars`), which within the block
    FSDP1 holds whole (`summon_full_params` on the wrapped `model`); other engines' shards
    are gathered or written by `full_tensors` and `_copy_into`."""
    flat = sharded and any(is_fsdp1_flat(p) for p in adapter.parameters())
    if not flat:
        yield adapter.state_dict(keep_vars=True)
        return
    wrapper = fsdp1_wrapper(model)
    if wrapper is None:
        raise ValueError(
            "the adapter's parameters are FSDP1 shards; pass the FullyShardedDataParallel-"
            f"wrapped model, whose parameters can be gathered, not the {type(model).__name__}"
        )
    with type(wrapper).summon_full_params(wrapper, writeback=writeback):
        yield adapter.state_dict(keep_vars=True)


def load_adapter(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Load an adapter saved by `save_adapter`, patching `model` first if it is not patched.

    A patched model must carry the same config (and, for AoT, be fused or not like the
    file); shapes are checked before any copy. Into an adapter that an engine shards, every
    rank loads (for FSDP1, pass the wrapped model).
    """
    directory = Path(directory)
    config, fused, num_tasks, vocab = _read_config(directory)
    tensors = _load_weights(directory)
    if getattr(model, "_dept_kernels_patch", None) is None:
        adapter = _build(model, config, fused, num_tasks, vocab, tensors, directory)
        return attach_adapter(model, adapter)
    adapter = _patched_with(model, config)
    _check_vocab(adapter, vocab, directory)
    if getattr(adapter, "fused", False) != fused:
        state = "a fused" if fused else "an unfused"
        raise ValueError(
            f"{directory} holds {state} AoT adapter but the model's adapter is "
            f"{'fused' if adapter.fused else 'unfused'}; call dept_kernels.unpatch(model) first"
        )
    if adapter.num_tasks != num_tasks:
        raise ValueError(
            f"{directory} holds an adapter for num_tasks={num_tasks} but the model's adapter "
            f"serves num_tasks={adapter.num_tasks}; call dept_kernels.unpatch(model) first"
        )
    sharded = _sharded(adapter)
    with _whole(model, adapter, sharded, writeback=True) as state:
        _copy_into(adapter, tensors, directory, config.method, state)
    return model


def read_adapter(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """The adapter saved in `directory`, built for `model` but not attached to it."""
    directory = Path(directory)
    config, fused, num_tasks, vocab = _read_config(directory)
    return _build(model, config, fused, num_tasks, vocab, _load_weights(directory), directory)


def read_config(directory: str | os.PathLike) -> object:
    """The method config saved in `directory` (e.g. `DePTConfig`, `AoTConfig`)."""
    return _read_config(Path(directory))[0]


def _read_config(directory: Path) -> tuple[object, bool, int | None, int | None]:
    """(config, whether the saved AoT adapter is fused, T or None, the AoT adapter's V or None)
    from adapter_config.json."""
    path = directory / CONFIG_NAME
    fields = _read_json(path)
    method = fields.pop("method", None)
    if method not in _BY_METHOD:
        raise ValueError(f"{path}: method must be one of {sorted(_BY_METHOD)}, got {method!r}")
    # Files written before multi-task prompt adapters have no num_tasks: one task.
    num_tasks = fields.pop("num_tasks", None)
    if num_tasks is not None and not _is_int(num_tasks, 1):
        raise ValueError(f"{path}: num_tasks must be null or an int >= 1, got {num_tasks!r}")
    fused, vocab = False, None
    if method == AoTConfig.method:
        fused = fields.pop("fused", False)
        # A string such as "false" would read as true: only JSON booleans are taken.
        if not isinstance(fused, bool):
            raise ValueError(f"{path}: fused must be true or false, got {fused!r}")
        # Files written before vocab_size was recorded skip its check.
        vocab = fields.pop("vocab_size", None)
        if vocab is not None and not _is_int(vocab, 1):
            raise ValueError(f"{path}: vocab_size must be an int >= 1, got {vocab!r}")
    try:
        config = _BY_METHOD[method](**fields)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: bad {method} config: {err}") from err
    return config, fused, num_tasks, vocab


def _is_int(value: object, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _build(
    model: nn.Module,
    config: object,
    fused: bool,
    num_tasks: int | None,
    vocab: int | None,
    tensors: dict[str, Tensor],
    directory: Path,
) -> nn.Module:
    adapter = new_adapter(model, config)
    _check_vocab(adapter, vocab, directory)
    if isinstance(adapter, PromptAdapter) and num_tasks is not None:
        # The stacked shapes, from T copies of a fresh adapter; the saved values follow.
        adapter = type(adapter).stack([adapter] * num_tasks)
        if adapter.config != config:
            raise ValueError(
                f"{directory / CONFIG_NAME}: a stacked {config.method} adapter saves as "
                f"{adapter.config.method}"
            )
    if not fused:
        _copy_into(adapter, tensors, directory, config.method)
        return adapter
    names = [f"layers.{i}.table" for i in range(len(adapter.layers))]
    if set(tensors) != set(names):
        raise ValueError(
            f"{directory / WEIGHTS_NAME} holds {sorted(tensors)}, the fused AoT adapter of "
            f"{type(model).__name__} needs {names}"
        )
    tables = [tensors[n] for n in names]
    # The config's num_tasks and the tables' leading dim must agree, or the model would
    # serve one task where the file describes T (or the reverse).
    for name, table in zip(names, tables, strict=True):
        stacked = table.dim() == 3
        if stacked != (num_tasks is not None) or (stacked and table.shape[0] != num_tasks):
            raise ValueError(
                f"{directory / WEIGHTS_NAME}: {name} has shape {tuple(table.shape)} but "
                f"{CONFIG_NAME} has num_tasks={num_tasks}"
            )
    adapter.load_tables(tables)
    return adapter


def _check_vocab(adapter: nn.Module, vocab: int | None, directory: Path) -> None:
    """An AoT adapter saved for V rows goes only onto a model with V input ids."""
    if vocab is not None and isinstance(adapter, AoTAdapter) and adapter.vocab != vocab:
        raise ValueError(
            f"{directory / CONFIG_NAME} holds an AoT adapter for a vocabulary of V={vocab}, the "
            f"model's has V={adapter.vocab}: they were not trained on the same base model"
        )


def _copy_into(
    adapter: nn.Module,
    tensors: dict[str, Tensor],
    directory: Path,
    method: str,
    expected: dict[str, Tensor] | None = None,
) -> None:
    """Copy the file's `tensors` into `adapter`'s state (`expected`, its `keep_vars` state
    by default), checking names and shapes first; engine shards take their part."""
    if expected is None:
        expected = adapter.state_dict(keep_vars=True)
    if set(tensors) != set(expected):
        raise ValueError(
            f"{directory / WEIGHTS_NAME} holds {sorted(tensors)}, the {method} adapter needs "
            f"{sorted(expected)}"
        )
    for name, tensor in tensors.items():
        _check_shape(name, tensor, expected[name])
    partitioned = [t for t in expected.values() if is_deepspeed(t)]
    with torch.no_grad(), _gathered_for_writing(partitioned):
        for name, tensor in tensors.items():
            target = expected[name]
            if is_dtensor(target):
                # Each rank keeps its part of the whole tensor (all ranks read the file).
                from torch.distributed.tensor import distribute_tensor

                whole = tensor.to(target.device, target.dtype)
                tensor = distribute_tensor(whole, target.device_mesh, target.placements)
            target.detach().copy_(tensor)


@contextlib.contextmanager
def _gathered_for_writing(params: list[Tensor]) -> Iterator[None]:
    """DeepSpeed ZeRO-3 `params` whole within the block; rank 0's values are partitioned
    again on exit (every rank writes the same values)."""
    if not params:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
        yield


def load_dept_checkpoint(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load an official DePT checkpoint (directory, or its adapter_model.bin) onto `model`.

    Patches `model` with the matching `DePTConfig` unless it already is. A file without the
    low-rank pair (or a config with `load_lora_embeddings` false) leaves B = 0, the official
    init, so the delta is zero; `load_lora_embedding_B` false loads A only. A file that cannot
    be read, holds B without A, or disagrees with its config raises before `model` changes.
    """
    path = Path(path)
    directory = path if path.is_dir() else path.parent
    weights = path if path.is_file() else directory / OFFICIAL_WEIGHTS_NAME
    config_path = directory / CONFIG_NAME
    fields = _read_json(config_path)
    peft_type = fields.get("peft_type")
    if peft_type != "PROMPT_TUNING_LORA":
        raise ValueError(
            f"{config_path}: peft_type must be 'PROMPT_TUNING_LORA' (official DePT), "
            f"got {peft_type!r}"
        )
    missing = [
        k for k in ("num_virtual_tokens", "r", "lora_alpha", "max_length") if k not in fields
    ]
    if missing:
        raise ValueError(f"{config_path} lacks {missing}")
    # With 2 (PEFT's seq2seq default), the file holds m rows per submodule; the official code,
    # like PEFT's prompt tuning, feeds only the first m, to the encoder: they are the prompt.
    submodules = fields.get("num_transformer_submodules", 1)
    if submodules not in (1, 2) or isinstance(submodules, bool):
        raise ValueError(
            f"{config_path}: num_transformer_submodules={submodules!r}; the official code "
            "saves 1 or 2"
        )
    d = model.get_input_embeddings().weight.shape[1]
    token_dim = fields.get("token_dim", d)
    if not _is_int(token_dim, 1):
        raise ValueError(f"{config_path}: token_dim must be an int >= 1, got {token_dim!r}")
    if token_dim != d:
        raise ValueError(
            f"checkpoint token_dim={token_dim} does not match the model's embedding dim d={d}"
        )
    try:
        config = DePTConfig(
            num_virtual_tokens=fields["num_virtual_tokens"],
            r=fields["r"],
            lora_alpha=fields["lora_alpha"],
            max_length=fields["max_length"],
        )
    except (TypeError, ValueError) as err:
        raise ValueError(f"{config_path}: bad DePT config: {err}") from err
    state = _load_official_state(weights)
    if "prompt_embeddings" not in state:
        raise ValueError(f"{weights} has no 'prompt_embeddings' (keys: {sorted(state)})")
    prompt = state["prompt_embeddings"]
    m = fields["num_virtual_tokens"]
    if submodules == 2 and isinstance(m, int) and prompt.dim() == 2 and len(prompt) == 2 * m:
        prompt = prompt[:m]
    lora_a = _find(state, "lora_embedding_A")
    lora_b = _find(state, "lora_embedding_B")
    if not fields.get("load_lora_embeddings", True):
        lora_a = lora_b = None
    elif not fields.get("load_lora_embedding_B", True):
        lora_b = None
    if lora_b is not None and lora_a is None:
        # B without its A would pair with a random A: a delta nobody trained.
        raise ValueError(
            f"{weights} holds lora_embedding_B but no lora_embedding_A; a checkpoint carries "
            "both low-rank factors, or A alone, or neither"
        )
    # Checked against the config before `model` is patched, so a bad file leaves it as it was.
    expected = {
        "prompt_embeddings": (config.num_virtual_tokens, d),
        "lora_embedding_A": (config.max_length, config.r),
        "lora_embedding_B": (config.r, d),
    }
    for name, tensor in (
        ("prompt_embeddings", prompt),
        ("lora_embedding_A", lora_a),
        ("lora_embedding_B", lora_b),
    ):
        if tensor is not None and tuple(tensor.shape) != expected[name]:
            raise ValueError(
                f"{name} has shape {tuple(tensor.shape)} but {config_path} needs "
                f"{expected[name]} (num_virtual_tokens, max_length, r and d={d})"
            )
    adapter = _patched_with(model, config)
    _check_shape("prompt_embeddings", prompt, adapter.prompt)
    if lora_a is not None:
        _check_shape("lora_embedding_A", lora_a, adapter.lora_a)
    if lora_b is not None:
        _check_shape("lora_embedding_B", lora_b, adapter.lora_b)
    with torch.no_grad():
        adapter.prompt.copy_(prompt)
        if lora_a is not None:
            adapter.lora_a.copy_(lora_a)
        if lora_b is not None:
            adapter.lora_b.copy_(lora_b)
        else:
            adapter.lora_b.zero_()
    return model


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"no adapter config at {path}")
    try:
        fields = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(fields, dict):
        raise ValueError(f"{path} must hold a JSON object, got a {type(fields).__name__}")
    return fields


def _load_weights(directory: Path) -> dict[str, Tensor]:
    """The tensors of `directory`'s safetensors file, each checked (`_check_tensor`)."""
    path = directory / WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no adapter weights at {path}")
    try:
        tensors = load_file(str(path))
    except SafetensorError as err:
        raise ValueError(f"{path} is not a readable safetensors file: {err}") from err
    for name, tensor in tensors.items():
        _check_tensor(path, name, tensor)
    return tensors


def _load_official_state(weights: Path) -> dict[str, Tensor]:
    """The official checkpoint's state dict, each tensor checked (`_check_tensor`)."""
    if not weights.is_file():
        raise FileNotFoundError(f"no {OFFICIAL_WEIGHTS_NAME} at {weights}")
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as err:
        # torch.load fails on a truncated or foreign file in many ways (zip, pickle, EOF);
        # what they share is that the file cannot be read.
        detail = (str(err).strip().splitlines() or [""])[0]
        raise ValueError(
            f"{weights} is not a readable torch checkpoint: {type(err).__name__}: {detail}"
        ) from err
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise ValueError(f"{weights} must hold a dict of named tensors, got {type(state).__name__}")
    for name, tensor in state.items():
        _check_tensor(weights, name, tensor)
    return state


def _check_tensor(path: Path, name: str, tensor: object) -> None:
    """A floating tensor of finite values: adapter parameters are never integers, and a NaN
    or inf would reach every output without an error."""
    if not isinstance(tensor, Tensor):
        raise ValueError(f"{path}: {name!r} is a {type(tensor).__name__}, not a tensor")
    if not tensor.is_floating_point():
        raise ValueError(
            f"{path}: {name!r} has dtype {tensor.dtype}; adapter parameters are floating point"
        )
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"{path}: {name!r} holds non-finite values (NaN or inf)")


def _find(state: dict[str, Tensor], suffix: str) -> Tensor | None:
    keys = [k for k in state if k.endswith(suffix)]
    if len(keys) > 1:
        raise ValueError(f"several tensors end with {suffix!r}: {keys}")
    return state[keys[0]] if keys else None


def _check_shape(name: str, tensor: Tensor, target: Tensor) -> None:
    want = tuple(full_shape(target))  # an engine's shard has its own shape
    if tuple(tensor.shape) != want:
        raise ValueError(f"{name} has shape {tuple(tensor.shape)} but the adapter expects {want}")


def _patched_with(model: nn.Module, config: object) -> nn.Module:
    """The model's adapter for `config`, patching first when the model is not patched."""
    if getattr(model, "_dept_kernels_patch", None) is None:
        patch(model, config)
    adapter = adapter_of(model)
    if adapter.config != config:
        raise ValueError(
            f"the model is patched with {adapter.config}, the checkpoint needs {config}; "
            "call dept_kernels.unpatch(model) first"
        )
    return adapter
