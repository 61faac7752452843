"""Adapter files: this library's safetensors format and the official DePT checkpoint format.

`save_adapter` writes `adapter_config.json` (the method name, its config fields and
`num_tasks`, T for a stacked adapter; for AoT also whether it is fused) and
`adapter_model.safetensors` (the adapter's parameters, or an AoT adapter's fused tables,
PEFT style). `load_dept_checkpoint` reads what the official DePT
code saves: `adapter_config.json` with peft_type PROMPT_TUNING_LORA and a torch-saved
`adapter_model.bin` holding `prompt_embeddings` and, unless it was not saved,
`prompt_encoder.lora_embedding_A` / `..._B`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

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
    reparameterisation. A stacked EPT adapter is a prompt-tuning one and saves as such.
    """
    adapter = adapter_of(model)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = {"method": adapter.config.method, **dataclasses.asdict(adapter.config)}
    if isinstance(adapter, AoTAdapter):
        config["fused"] = adapter.fused
    config["num_tasks"] = adapter.num_tasks
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    tensors = {k: v.detach().cpu().contiguous() for k, v in adapter.state_dict().items()}
    save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})


def load_adapter(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Load an adapter saved by `save_adapter`, patching `model` first if it is not patched.

    A patched model must carry the same config (and, for AoT, be fused or not like the
    file); shapes are checked before any copy.
    """
    directory = Path(directory)
    config, fused, num_tasks = _read_config(directory)
    tensors = load_file(str(directory / WEIGHTS_NAME))
    if getattr(model, "_dept_kernels_patch", None) is None:
        return attach_adapter(model, _build(model, config, fused, num_tasks, tensors, directory))
    adapter = _patched_with(model, config)
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
    _copy_into(adapter, tensors, directory, config.method)
    return model


def read_adapter(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """The adapter saved in `directory`, built for `model` but not attached to it."""
    directory = Path(directory)
    config, fused, num_tasks = _read_config(directory)
    tensors = load_file(str(directory / WEIGHTS_NAME))
    return _build(model, config, fused, num_tasks, tensors, directory)


def read_config(directory: str | os.PathLike) -> object:
    """The method config saved in `directory` (e.g. `DePTConfig`, `AoTConfig`)."""
    return _read_config(Path(directory))[0]


def _read_config(directory: Path) -> tuple[object, bool, int | None]:
    """(config, whether the saved AoT adapter is fused, T or None) from adapter_config.json."""
    fields = _read_json(directory / CONFIG_NAME)
    method = fields.pop("method", None)
    if method not in _BY_METHOD:
        raise ValueError(
            f"{directory / CONFIG_NAME}: method must be one of {sorted(_BY_METHOD)}, got {method!r}"
        )
    # Files written before multi-task prompt adapters have no num_tasks: one task.
    num_tasks = fields.pop("num_tasks", None)
    if num_tasks is not None and (not isinstance(num_tasks, int) or num_tasks < 1):
        raise ValueError(f"{directory / CONFIG_NAME}: num_tasks must be null or >= 1")
    fused = False
    if method == AoTConfig.method:
        fused = bool(fields.pop("fused", False))
    try:
        config = _BY_METHOD[method](**fields)
    except TypeError as err:
        raise ValueError(f"{directory / CONFIG_NAME}: bad {method} config: {err}") from err
    return config, fused, num_tasks


def _build(
    model: nn.Module,
    config: object,
    fused: bool,
    num_tasks: int | None,
    tensors: dict[str, Tensor],
    directory: Path,
) -> nn.Module:
    adapter = new_adapter(model, config)
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
    adapter.load_tables([tensors[n] for n in names])
    return adapter


def _copy_into(adapter: nn.Module, tensors: dict[str, Tensor], directory: Path, method: str):
    expected = adapter.state_dict()
    if set(tensors) != set(expected):
        raise ValueError(
            f"{directory / WEIGHTS_NAME} holds {sorted(tensors)}, the {method} adapter needs "
            f"{sorted(expected)}"
        )
    for name, tensor in tensors.items():
        _check_shape(name, tensor, expected[name])
    with torch.no_grad():
        for name, tensor in tensors.items():
            expected[name].copy_(tensor)


def load_dept_checkpoint(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load an official DePT checkpoint (directory, or its adapter_model.bin) onto `model`.

    Patches `model` with the matching `DePTConfig` unless it already is. A file without the
    low-rank pair (or a config with `load_lora_embeddings` false) leaves B = 0, the official
    init, so the delta is zero; `load_lora_embedding_B` false loads A only.
    """
    path = Path(path)
    directory = path if path.is_dir() else path.parent
    weights = path if path.is_file() else directory / OFFICIAL_WEIGHTS_NAME
    fields = _read_json(directory / CONFIG_NAME)
    peft_type = fields.get("peft_type")
    if peft_type != "PROMPT_TUNING_LORA":
        raise ValueError(
            f"{directory / CONFIG_NAME}: peft_type must be 'PROMPT_TUNING_LORA' (official DePT), "
            f"got {peft_type!r}"
        )
    missing = [
        k for k in ("num_virtual_tokens", "r", "lora_alpha", "max_length") if k not in fields
    ]
    if missing:
        raise ValueError(f"{directory / CONFIG_NAME} lacks {missing}")
    d = model.get_input_embeddings().weight.shape[1]
    if fields.get("token_dim", d) != d:
        raise ValueError(
            f"checkpoint token_dim={fields['token_dim']} does not match the model's embedding "
            f"dim d={d}"
        )
    config = DePTConfig(
        num_virtual_tokens=fields["num_virtual_tokens"],
        r=fields["r"],
        lora_alpha=fields["lora_alpha"],
        max_length=fields["max_length"],
    )
    if not weights.is_file():
        raise FileNotFoundError(f"no {OFFICIAL_WEIGHTS_NAME} at {weights}")
    state = torch.load(weights, map_location="cpu", weights_only=True)
    if "prompt_embeddings" not in state:
        raise ValueError(f"{weights} has no 'prompt_embeddings' (keys: {sorted(state)})")
    prompt = state["prompt_embeddings"][: config.num_virtual_tokens]
    lora_a = _find(state, "lora_embedding_A")
    lora_b = _find(state, "lora_embedding_B")
    if not fields.get("load_lora_embeddings", True):
        lora_a = lora_b = None
    elif not fields.get("load_lora_embedding_B", True):
        lora_b = None
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
    return json.loads(path.read_text())


def _find(state: dict[str, Tensor], suffix: str) -> Tensor | None:
    keys = [k for k in state if k.endswith(suffix)]
    if len(keys) > 1:
        raise ValueError(f"several tensors end with {suffix!r}: {keys}")
    return state[keys[0]] if keys else None


def _check_shape(name: str, tensor: Tensor, target: Tensor) -> None:
    if tuple(tensor.shape) != tuple(target.shape):
        raise ValueError(
            f"{name} has shape {tuple(tensor.shape)} but the adapter expects {tuple(target.shape)}"
        )


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
