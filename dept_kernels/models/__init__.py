"""One module per Hugging Face architecture: where the embedding lives and how masks,
positions and labels shift when m prompt rows go in front.

Each module has `MODEL_TYPE` (the HF `config.model_type`) and
`install(model, adapter_of) -> list[RemovableHandle]`, which registers the hooks that route
the input embedding through the adapter (`adapter_of()` returns the model's current adapter).
"""

from __future__ import annotations

from types import ModuleType

from torch import nn

from . import gpt2, llama, t5

ARCHITECTURES: dict[str, ModuleType] = {m.MODEL_TYPE: m for m in (t5, gpt2, llama)}


def architecture(model: nn.Module) -> ModuleType:
    """The architecture module for `model`, or a TypeError naming what is supported."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ARCHITECTURES:
        raise TypeError(
            f"unsupported model {type(model).__name__} (model_type={model_type!r}); supported "
            f"model types: {sorted(ARCHITECTURES)}"
        )
    return ARCHITECTURES[model_type]


__all__ = ["ARCHITECTURES", "architecture"]
