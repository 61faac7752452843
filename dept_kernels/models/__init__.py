"""One module per Hugging Face architecture: where the embedding lives and how masks,
positions and labels shift when m prompt rows go in front, and where AoT's layers are.

A prompt-method module has `MODEL_TYPE` (the HF `config.model_type`) and
`install(model, adapter_of) -> list[RemovableHandle]`, which registers the hooks that route
the input embedding through the adapter (`adapter_of()`, an `AdapterOf`, returns the model's
current adapter) and `task_ids` to it (`TaskIds`).
Every module has `aot_sites(model) -> (inner, layers)`: the module taking `input_ids` and the
layers AoT P-tuning biases; `install_aot` hooks them (`_aot.py`).
"""

from __future__ import annotations

from types import ModuleType

from torch import nn
from torch.utils.hooks import RemovableHandle

from . import _aot, bert, gpt2, llama, t5
from ._hooks import AdapterOf, Generate

ARCHITECTURES: dict[str, ModuleType] = {m.MODEL_TYPE: m for m in (t5, gpt2, llama)}
AOT_ARCHITECTURES: dict[str, ModuleType] = {
    **ARCHITECTURES,
    **dict.fromkeys(bert.MODEL_TYPES, bert),
}


def _model_type(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


def architecture(model: nn.Module) -> ModuleType:
    """The prompt methods' architecture module for `model`, or a TypeError naming what is
    supported."""
    model_type = _model_type(model)
    if model_type not in ARCHITECTURES:
        raise TypeError(
            f"unsupported model {type(model).__name__} (model_type={model_type!r}); supported "
            f"model types: {sorted(ARCHITECTURES)} (AoTConfig also: {sorted(bert.MODEL_TYPES)})"
        )
    return ARCHITECTURES[model_type]


def aot_sites(model: nn.Module) -> tuple[nn.Module, nn.ModuleList]:
    """(module taking input_ids, its layers) for AoT P-tuning, or a TypeError."""
    model_type = _model_type(model)
    if model_type not in AOT_ARCHITECTURES:
        raise TypeError(
            f"unsupported model {type(model).__name__} (model_type={model_type!r}) for AoT "
            f"P-tuning; supported model types: {sorted(AOT_ARCHITECTURES)}"
        )
    return AOT_ARCHITECTURES[model_type].aot_sites(model)


def install_aot(model: nn.Module, adapter_of: AdapterOf) -> list[RemovableHandle]:
    """Register AoT P-tuning's hooks on `model` (see `_aot.py`)."""
    inner, layers = aot_sites(model)
    if len(adapter_of().layers) != len(layers):
        raise ValueError(
            f"the AoT adapter has {len(adapter_of().layers)} layers, "
            f"{type(model).__name__} has {len(layers)}"
        )
    return _aot.install(model, adapter_of, inner, layers)


__all__ = [
    "AOT_ARCHITECTURES",
    "ARCHITECTURES",
    "AdapterOf",
    "Generate",
    "aot_sites",
    "architecture",
    "install_aot",
]
