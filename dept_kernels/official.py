"""The official DePT code's checkpoint format, read onto a model patched with `DePTConfig`.

The official code saves `adapter_config.json` with peft_type PROMPT_TUNING_LORA and a
torch-saved `adapter_model.bin` holding `prompt_embeddings` and, unless it was not saved,
`prompt_encoder.lora_embedding_A` / `..._B`.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor, nn

from .checkpoint import CONFIG_NAME, check_shape, check_tensor, patched_with, read_json
from .methods import DePTConfig
from .methods.base import is_int

OFFICIAL_WEIGHTS_NAME = "adapter_model.bin"


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
    fields = read_json(config_path)
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
    if not is_int(token_dim, 1):
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
    adapter = patched_with(model, config)
    check_shape("prompt_embeddings", prompt, adapter.prompt)
    if lora_a is not None:
        check_shape("lora_embedding_A", lora_a, adapter.lora_a)
    if lora_b is not None:
        check_shape("lora_embedding_B", lora_b, adapter.lora_b)
    with torch.no_grad():
        adapter.prompt.copy_(prompt)
        if lora_a is not None:
            adapter.lora_a.copy_(lora_a)
        if lora_b is not None:
            adapter.lora_b.copy_(lora_b)
        else:
            adapter.lora_b.zero_()
    return model


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
        check_tensor(weights, name, tensor)
    return state


def _find(state: dict[str, Tensor], suffix: str) -> Tensor | None:
    keys = [k for k in state if k.endswith(suffix)]
    if len(keys) > 1:
        raise ValueError(f"several tensors end with {suffix!r}: {keys}")
    return state[keys[0]] if keys else None
