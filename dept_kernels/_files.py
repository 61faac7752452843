"""Reading adapter files: the JSON config, safetensors weights and torch-saved state dicts,
each checked before use. Shared by the checkpoint formats (`checkpoint`, `official`) and by
the methods' initialisation from a source adapter (`methods/transfer.py`)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
OFFICIAL_WEIGHTS_NAME = "adapter_model.bin"


def read_json(path: Path) -> dict:
    """The JSON object in `path`; FileNotFoundError or ValueError saying what is wrong."""
    if not path.is_file():
        raise FileNotFoundError(f"no adapter config at {path}")
    try:
        fields = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(fields, dict):
        raise ValueError(f"{path} must hold a JSON object, got a {type(fields).__name__}")
    return fields


def load_weights(directory: Path) -> dict[str, Tensor]:
    """The tensors of `directory`'s safetensors file, each checked (`check_tensor`)."""
    path = directory / WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no adapter weights at {path}")
    try:
        tensors = load_file(str(path))
    except SafetensorError as err:
        raise ValueError(f"{path} is not a readable safetensors file: {err}") from err
    for name, tensor in tensors.items():
        check_tensor(path, name, tensor)
    return tensors


def load_torch_state(weights: Path) -> dict[str, Tensor]:
    """A torch-saved dict of named tensors (the official DePT code's adapter_model.bin),
    read without unpickling code (`weights_only`), each tensor checked."""
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
        check_tensor(weights, name, tensor)
    return state


def check_tensor(path: Path, name: str, tensor: object) -> None:
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


def find_suffix(state: dict[str, Tensor], suffix: str) -> Tensor | None:
    """The one tensor whose name ends with `suffix`, or None; ValueError when several do."""
    keys = [k for k in state if k.endswith(suffix)]
    if len(keys) > 1:
        raise ValueError(f"several tensors end with {suffix!r}: {keys}")
    return state[keys[0]] if keys else None
