"""Reading a source-task adapter for transfer: the DePT paper's few-shot setting initialises
the prompt and the low-rank pair from an adapter trained on a source task.

A source is a `save_adapter` directory (DePT or prompt tuning) or an official DePT checkpoint
(a directory, or its adapter_model.bin). `read_official` is also what
`dept_kernels.load_dept_checkpoint` reads.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor

from .._files import (
    CONFIG_NAME,
    OFFICIAL_WEIGHTS_NAME,
    find_suffix,
    load_torch_state,
    load_weights,
    read_json,
)
from .base import MethodConfig, is_int


@dataclass(frozen=True)
class Source:
    """A source adapter's hyperparameters and tensors: `prompt` (m, d), and for DePT
    `lora_a` (L, r) and `lora_b` (r, d), or None where the file holds none."""

    path: Path
    num_virtual_tokens: int
    prompt: Tensor
    r: int | None = None
    max_length: int | None = None
    lora_a: Tensor | None = None
    lora_b: Tensor | None = None


@dataclass(frozen=True)
class Official:
    """An official DePT checkpoint, read and checked: its config and tensors (`lora_a` /
    `lora_b` None where the file holds none or its config says not to load them)."""

    config: MethodConfig  # a DePTConfig
    prompt: Tensor
    lora_a: Tensor | None
    lora_b: Tensor | None


def read_official(path: str | os.PathLike, d: int, config_cls: type[MethodConfig]) -> Official:
    """An official DePT checkpoint for a model of embedding width `d`; every field and shape
    is checked against its config (built as `config_cls`, the DePT config, which this module
    does not import: the DePT module reads sources through it), with errors naming the file."""
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
    token_dim = fields.get("token_dim", d)
    if not is_int(token_dim, 1):
        raise ValueError(f"{config_path}: token_dim must be an int >= 1, got {token_dim!r}")
    if token_dim != d:
        raise ValueError(
            f"checkpoint token_dim={token_dim} does not match the model's embedding dim d={d}"
        )
    try:
        config = config_cls(
            num_virtual_tokens=fields["num_virtual_tokens"],
            r=fields["r"],
            lora_alpha=fields["lora_alpha"],
            max_length=fields["max_length"],
        )
    except (TypeError, ValueError) as err:
        raise ValueError(f"{config_path}: bad DePT config: {err}") from err
    state = load_torch_state(weights)
    if "prompt_embeddings" not in state:
        raise ValueError(f"{weights} has no 'prompt_embeddings' (keys: {sorted(state)})")
    prompt = state["prompt_embeddings"]
    m = config.num_virtual_tokens
    if submodules == 2 and prompt.dim() == 2 and len(prompt) == 2 * m:
        prompt = prompt[:m]
    lora_a = find_suffix(state, "lora_embedding_A")
    lora_b = find_suffix(state, "lora_embedding_B")
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
    expected = {
        "prompt_embeddings": (m, d),
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
    return Official(config, prompt, lora_a, lora_b)


def read_source(path: str | os.PathLike, d: int, config_cls: type[MethodConfig]) -> Source:
    """The source adapter at `path` for a model of embedding width `d` (`config_cls`: the
    DePT config, for official checkpoints)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"init_from: no adapter at {path}")
    directory = path if path.is_dir() else path.parent
    if not (directory / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"init_from: no adapter config at {directory / CONFIG_NAME}")
    fields = read_json(directory / CONFIG_NAME)
    if "peft_type" in fields:
        official = read_official(path, d, config_cls)
        c = official.config
        return Source(
            path, c.num_virtual_tokens, official.prompt, c.r, c.max_length, official.lora_a,
            official.lora_b,
        )  # fmt: skip
    method = fields.get("method")
    if method not in ("dept", "prompt_tuning"):
        raise ValueError(
            f"init_from: {directory} holds a {method!r} adapter; a source for transfer is a "
            "DePT or prompt-tuning adapter (or an official DePT checkpoint)"
        )
    if fields.get("num_tasks") is not None:
        raise ValueError(
            f"init_from: {directory} holds {fields['num_tasks']} stacked tasks; transfer "
            "starts from one source task"
        )
    if method == "dept" and fields.get("index", "position") != "position":
        raise ValueError(f"init_from: {directory} is a token-mode DePT adapter")
    tensors = load_weights(directory)
    prompt = tensors.get("prompt")
    if prompt is None or prompt.dim() != 2 or prompt.shape[1] != d:
        shape = None if prompt is None else tuple(prompt.shape)
        raise ValueError(
            f"init_from: {directory}'s prompt has shape {shape}; the model needs (m, d={d})"
        )
    if method == "prompt_tuning":
        return Source(path, prompt.shape[0], prompt)
    return Source(
        path, prompt.shape[0], prompt, fields.get("r"), fields.get("max_length"),
        tensors.get("lora_a"), tensors.get("lora_b"),
    )  # fmt: skip
