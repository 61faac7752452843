"""The official DePT code's checkpoint format, read onto a model patched with `DePTConfig`.

The official code saves `adapter_config.json` with peft_type PROMPT_TUNING_LORA and a
torch-saved `adapter_model.bin` holding `prompt_embeddings` and, unless it was not saved,
`prompt_encoder.lora_embedding_A` / `..._B` (read and checked by
`methods.transfer.read_official`).
"""

from __future__ import annotations

import os

import torch
from torch import nn

from .checkpoint import check_shape, patched_with
from .methods import DePTConfig
from .methods.transfer import read_official


def load_dept_checkpoint(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load an official DePT checkpoint (directory, or its adapter_model.bin) onto `model`.

    Patches `model` with the matching `DePTConfig` unless it already is. A file without the
    low-rank pair (or a config with `load_lora_embeddings` false) leaves B = 0, the official
    init, so the delta is zero; `load_lora_embedding_B` false loads A only. A file that cannot
    be read, holds B without A, or disagrees with its config raises before `model` changes.
    """
    d = model.get_input_embeddings().weight.shape[1]
    # Read and checked before `model` is patched, so a bad file leaves it as it was.
    official = read_official(path, d, DePTConfig)
    prompt, lora_a, lora_b = official.prompt, official.lora_a, official.lora_b
    adapter = patched_with(model, official.config)
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
