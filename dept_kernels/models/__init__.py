"""Where a Hugging Face model's embedding and layers are, and the hooks through which it
runs an adapter: the seam the methods use (`describe`, `install`).

Every architecture registers one `Architecture` per `config.model_type` beside its code
(`_registry.py`): the decoder-only models as rows of one table (`decoders.py`), T5
(`t5.py`), BERT, RoBERTa and DeBERTa-v2 as rows of another (`encoders.py`). An entry locates the
module taking `input_ids` and its layers, which every site reads, and installs the prompt
methods' hooks (site "input_embedding"); AoT P-tuning's hooks ("layer_input") are shared
(`_aot.py`). A model type with no entry at all gets the generic entry (`_generic.py`) for
the prompt methods: any decoder-only model whose forward, and the module holding its input
embedding, take input_ids, attention_mask and inputs_embeds (OPT, BLOOM, Phi, ...), with the
decoder hooks, and encoder-decoder models whose encoder does (BART, ...), with
`_seq2seq.py`'s; no padding trim there, and AoT still needs an entry.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import nn
from torch.utils.hooks import RemovableHandle

# The architecture modules register their entries on import.
from . import _aot, _generic, decoders, encoders, t5  # noqa: F401
from ._hooks import AdapterOf, Generate
from ._registry import SITES, Architecture, check_site, lookup, model_type


@dataclass(frozen=True)
class ModelSpec:
    """What an adapter needs to know of a model: where its input embedding and layers are."""

    model_type: str
    inner: nn.Module  # the module taking input_ids (T5: the encoder stack)
    embedding: nn.Module  # the input embedding module, (V, d) weight
    layers: Sequence[nn.Module]  # where a per-layer bias goes, in order
    hidden_size: int


def describe(model: nn.Module, site: str) -> ModelSpec:
    """Where `model`'s embedding and layers are, for an adapter acting at `site`; a
    TypeError naming the supported model types when the architecture has no entry for it."""
    inner, layers = lookup(model, site).locate(model)
    return ModelSpec(
        model_type(model),
        inner,
        model.get_input_embeddings(),
        layers,
        model.config.hidden_size,
    )


def _install_prompt(
    arch: Architecture, model: nn.Module, adapter_of: AdapterOf
) -> list[RemovableHandle]:
    return arch.install(model, adapter_of)


def _install_layer_bias(
    arch: Architecture, model: nn.Module, adapter_of: AdapterOf
) -> list[RemovableHandle]:
    inner, layers = arch.locate(model)
    if len(adapter_of().layers) != len(layers):
        raise ValueError(
            f"the AoT adapter has {len(adapter_of().layers)} layers, "
            f"{type(model).__name__} has {len(layers)}"
        )
    return _aot.install(model, adapter_of, inner, layers, arch.reread)


_INSTALLERS: dict[str, Callable[..., list[RemovableHandle]]] = {
    "input_embedding": _install_prompt,
    "layer_input": _install_layer_bias,
}


def install(model: nn.Module, adapter_of: AdapterOf, site: str) -> list[RemovableHandle]:
    """Register the hooks through which `model` runs the adapter `adapter_of()` at `site`."""
    check_site(site)
    return _INSTALLERS[site](lookup(model, site), model, adapter_of)


__all__ = [
    "SITES",
    "AdapterOf",
    "Generate",
    "ModelSpec",
    "describe",
    "install",
]
