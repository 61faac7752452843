"""The architecture registry: one `Architecture` per Hugging Face `config.model_type`.

Each architecture module registers its entries beside its code (`register`); `lookup` finds
a model's entry for a site, or raises a TypeError naming the model types that serve it. A
model type with no entry at all reaches the generic entry (`register_generic`, `_generic.py`)
for the "input_embedding" site; the "layer_input" site (AoT) needs an entry of its own.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import nn
from torch.utils.hooks import RemovableHandle

from ._hooks import AdapterOf

# Where a method's adapter acts: on the input embedding (the prompt methods' fused op) or on
# the input of every transformer layer (AoT P-tuning's bias).
SITES = ("input_embedding", "layer_input")


@dataclass(frozen=True)
class Architecture:
    """One model type's entry.

    `locate(model) -> (inner, layers)`: the module taking `input_ids` (T5: the encoder
    stack) and the layers a per-layer bias goes before, in order; every site reads it.
    `install(model, adapter_of)`: the hooks for the "input_embedding" site (the prompt
    methods); None where only "layer_input" is wired.
    `reread`: the indices of the layers whose input the model reads again after the layer
    has run (DeBERTa-v2's convolution reads layer 0's); AoT adds their bias out of place.
    """

    model_type: str
    locate: Callable[[nn.Module], tuple[nn.Module, Sequence[nn.Module]]]
    install: Callable[[nn.Module, AdapterOf], list[RemovableHandle]] | None = None
    reread: tuple[int, ...] = ()

    def serves(self, site: str) -> bool:
        return site == "layer_input" or self.install is not None


_ARCHITECTURES: dict[str, Architecture] = {}
# The entry of the model types without one of their own, for the "input_embedding" site.
_GENERIC: list[Architecture] = []


def register(architecture: Architecture) -> Architecture:
    """Add `architecture` to the registry; one entry per model type."""
    if architecture.model_type in _ARCHITECTURES:
        raise ValueError(f"model type {architecture.model_type!r} is already registered")
    _ARCHITECTURES[architecture.model_type] = architecture
    return architecture


def register_generic(architecture: Architecture) -> Architecture:
    """Set the entry that serves site "input_embedding" for unregistered model types."""
    if _GENERIC or architecture.install is None:
        raise ValueError("the generic entry is set once, with an install for the prompt hooks")
    _GENERIC.append(architecture)
    return architecture


def check_site(site: str) -> None:
    if site not in SITES:
        raise ValueError(f"site must be one of {SITES}, got {site!r}")


def model_type(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


def supported(site: str) -> list[str]:
    """The model types whose entry serves `site`, sorted."""
    return sorted(t for t, arch in _ARCHITECTURES.items() if arch.serves(site))


def lookup(model: nn.Module, site: str) -> Architecture:
    """`model`'s entry for `site`, or a TypeError naming the model types that serve it. An
    unregistered model type gets the generic entry for "input_embedding"; a registered one
    that does not serve `site` does not."""
    check_site(site)
    arch = _ARCHITECTURES.get(model_type(model))
    if arch is not None and arch.serves(site):
        return arch
    if arch is None and site == "input_embedding" and _GENERIC:
        return _GENERIC[0]
    unsupported = f"unsupported model {type(model).__name__} (model_type={model_type(model)!r})"
    if site == "input_embedding":
        aot_only = sorted(set(supported("layer_input")) - set(supported(site)))
        also = f" (AoTConfig also: {aot_only})" if aot_only else ""
        raise TypeError(f"{unsupported}; supported model types: {supported(site)}{also}")
    raise TypeError(
        f"{unsupported} for AoT P-tuning; supported model types: {supported('layer_input')}"
    )
