"""Adapter files: config JSON beside safetensors weights, PEFT style, for every method.

`save_adapter` writes `adapter_config.json` (the method name, its config fields and the
adapter's `state_fields`: `num_tasks`, T for a stacked adapter, and what else the tensors'
names and shapes depend on, e.g. whether an AoT adapter is fused and its V) and
`adapter_model.safetensors` (the adapter's state: parameters, or an AoT adapter's fused
tables). Loading builds the adapter class's `skeleton` for those fields and copies the file
into it after checking names and shapes. The official DePT code's format is read by
`dept_kernels.official`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from . import models
from ._engines import (
    fsdp1_wrapper,
    full_shape,
    full_tensors,
    is_deepspeed,
    is_dtensor,
    is_fsdp1_flat,
    is_sharded,
)
from ._files import CONFIG_NAME, WEIGHTS_NAME, load_weights, read_json
from .methods import METHODS, Adapter, MethodConfig, method_config
from .patch import adapter as adapter_of
from .patch import attach_adapter, is_patched, patch


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
        config = {
            "method": adapter.config.method,
            **dataclasses.asdict(adapter.config),
            **adapter.state_fields(),
        }
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

    A patched model must carry the same config and state fields (for AoT: fused or not like
    the file; the number of tasks); shapes are checked before any copy. Into an adapter that
    an engine shards, every rank loads (for FSDP1, pass the wrapped model).
    """
    directory = Path(directory)
    config, fields = _read_config(directory)
    tensors = load_weights(directory)
    if not is_patched(model):
        return attach_adapter(model, _build(model, config, fields, tensors, directory))
    adapter = patched_with(model, config)
    ours = adapter.state_fields()
    for name, value in fields.items():
        # A field an older file lacks (None) is not checked.
        if value is not None and ours.get(name) != value:
            raise ValueError(
                f"{directory / CONFIG_NAME} has {name}={json.dumps(value)} but the model's "
                f"adapter has {name}={json.dumps(ours.get(name))}; call "
                "dept_kernels.unpatch(model) first"
            )
    sharded = _sharded(adapter)
    with _whole(model, adapter, sharded, writeback=True) as state:
        _copy_into(adapter, tensors, directory, config.method, state)
    return model


def read_adapter(model: nn.Module, directory: str | os.PathLike) -> Adapter:
    """The adapter saved in `directory`, built for `model` but not attached to it."""
    directory = Path(directory)
    config, fields = _read_config(directory)
    return _build(model, config, fields, load_weights(directory), directory)


def read_config(directory: str | os.PathLike) -> MethodConfig:
    """The method config saved in `directory` (e.g. `DePTConfig`, `AoTConfig`)."""
    return _read_config(Path(directory))[0]


def _read_config(directory: Path) -> tuple[MethodConfig, dict]:
    """(config, the adapter's state fields) from adapter_config.json."""
    path = directory / CONFIG_NAME
    fields = read_json(path)
    method = fields.pop("method", None)
    try:
        config_cls = method_config(method)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err
    adapter_cls = METHODS[config_cls]
    try:
        state_fields = adapter_cls.read_fields(fields)
        config = config_cls(**fields)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: bad {method} config: {err}") from err
    return config, state_fields


def _build(
    model: nn.Module,
    config: MethodConfig,
    fields: dict,
    tensors: dict[str, Tensor],
    directory: Path,
) -> Adapter:
    """The adapter of `config` for `model` holding the file's `tensors`."""
    cls = METHODS[type(config)]
    spec = models.describe(model, cls.site)
    try:
        adapter = cls.skeleton(config, spec, fields)
    except ValueError as err:
        raise ValueError(f"{directory / CONFIG_NAME}: {err}") from err
    _copy_into(adapter, tensors, directory, config.method, device=spec.embedding.weight.device)
    return adapter


def _copy_into(
    adapter: nn.Module,
    tensors: dict[str, Tensor],
    directory: Path,
    method: str,
    expected: dict[str, Tensor] | None = None,
    device: torch.device | None = None,
) -> None:
    """Copy the file's `tensors` into `adapter`'s state (`expected`, its `keep_vars` state
    by default), checking names and shapes first; engine shards take their part. A
    skeleton's placeholder (a meta tensor, for tables too large to allocate twice) takes the
    file's tensor itself, moved to `device`, in the file's dtype."""
    if expected is None:
        expected = adapter.state_dict(keep_vars=True)
    if set(tensors) != set(expected):
        raise ValueError(
            f"{directory / WEIGHTS_NAME} holds {sorted(tensors)}, the {method} adapter needs "
            f"{sorted(expected)}"
        )
    for name, tensor in tensors.items():
        try:
            check_shape(name, tensor, expected[name])
        except ValueError as err:
            # The expected shapes follow from the config and its state fields (num_tasks,
            # ...) on this model: one of them disagrees with the file's tensors.
            raise ValueError(
                f"{directory / WEIGHTS_NAME}: {err}, from {CONFIG_NAME} and the model"
            ) from None
    placed = {n: t.to(device) for n, t in tensors.items() if expected[n].is_meta}
    if placed:
        adapter.load_state_dict(placed, strict=False, assign=True)
    partitioned = [t for t in expected.values() if is_deepspeed(t)]
    with torch.no_grad(), _gathered_for_writing(partitioned):
        for name, tensor in tensors.items():
            if name in placed:
                continue
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


def check_shape(name: str, tensor: Tensor, target: Tensor) -> None:
    want = tuple(full_shape(target))  # an engine's shard has its own shape
    if tuple(tensor.shape) != want:
        raise ValueError(f"{name} has shape {tuple(tensor.shape)} but the adapter expects {want}")


def patched_with(model: nn.Module, config: object) -> nn.Module:
    """The model's adapter for `config`, patching first when the model is not patched."""
    if not is_patched(model):
        patch(model, config)
    adapter = adapter_of(model)
    if adapter.config != config:
        raise ValueError(
            f"the model is patched with {adapter.config}, the checkpoint needs {config}; "
            "call dept_kernels.unpatch(model) first"
        )
    return adapter
