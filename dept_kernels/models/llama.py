"""LLaMA: the inner model is `.model` (embed_tokens + rotary positions from position_ids).

Rotary positions follow the given or cache-derived `position_ids`, so the prompt sits at
0..m-1 and tokens from m, as in the reference that feeds `inputs_embeds` with the prompt.
"""

from __future__ import annotations

from torch import nn
from torch.utils.hooks import RemovableHandle

from . import _decoder
from ._hooks import AdapterOf, find_inner

MODEL_TYPE = "llama"


def install(model: nn.Module, adapter_of: AdapterOf) -> list[RemovableHandle]:
    from transformers import LlamaForCausalLM, LlamaForSequenceClassification, LlamaModel

    if isinstance(model, LlamaForCausalLM):
        return _decoder.install(model, model.model, adapter_of, head="lm")
    if isinstance(model, LlamaForSequenceClassification):
        return _decoder.install(model, model.model, adapter_of, head="cls")
    if isinstance(model, LlamaModel):
        return _decoder.install(model, model, adapter_of, head="base")
    raise TypeError(
        f"LLaMA support covers LlamaForCausalLM, LlamaForSequenceClassification and LlamaModel, "
        f"got {type(model).__name__}"
    )


def aot_sites(model: nn.Module) -> tuple[nn.Module, nn.ModuleList]:
    """(the LlamaModel inside `model`, its decoder `layers`): where AoT P-tuning adds its bias."""
    from transformers import LlamaModel

    inner = find_inner(model, LlamaModel)
    return inner, inner.layers[: inner.config.num_hidden_layers]
