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

from collections.abc import Sequence
from dataclasses import dataclass
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


# Where a method's adapter acts: on the input embedding (the prompt methods' fused op) or on
# the input of every transformer layer (AoT P-tuning's bias).
SITES = ("input_embedding", "layer_input")


@dataclass(frozen=True)
class ModelSpec:
    """What an adapter needs to know of a model: where its input embedding and layers are."""

    model_type: str
    inner: nn.Module  # the module taking input_ids (T5: the encoder stack)
    embedding: nn.Module  # the input embedding module, (V, d) weight
    layers: Sequence[nn.Module]  # where a per-layer bias goes, in order
    hidden_size: int


def _check_site(site: str) -> None:
    if site not in SITES:
        raise ValueError(f"site must be one of {SITES}, got {site!r}")


def describe(model: nn.Module, site: str) -> ModelSpec:
    """Where `model`'s embedding and layers are, for an adapter acting at `site`; a
    TypeError naming the supported model types when the architecture has no entry for it."""
    _check_site(site)
    if site == "input_embedding":
        architecture(model)
    inner, layers = aot_sites(model)
    return ModelSpec(
        _model_type(model),
        inner,
        model.get_input_embeddings(),
        layers,
        model.config.hidden_size,
    )


def install(model: nn.Module, adapter_of: AdapterOf, site: str) -> list[RemovableHandle]:
    """Register the hooks through which `model` runs the adapter `adapter_of()` at `site`."""
    _check_site(site)
    if site == "input_embedding":
        return architecture(model).install(model, adapter_of)
    return install_aot(model, adapter_of)


__all__ = [
    "AOT_ARCHITECTURES",
    "ARCHITECTURES",
    "SITES",
    "AdapterOf",
    "Generate",
    "ModelSpec",
    "aot_sites",
    "architecture",
    "describe",
    "install",
    "install_aot",
]
