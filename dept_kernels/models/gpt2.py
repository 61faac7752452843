"""GPT-2: the inner model is `.transformer` (wte + learned absolute positions wpe).

Positions matter here: they index `wpe`, so the prompt takes positions 0..m-1 and the tokens
follow from m, both on the first forward and through the KV cache. The m prompt rows use m
of the table's `n_positions` rows: a pre-hook says so when a batch would need more, where
HF would raise a bare IndexError from inside the embedding.
"""

from __future__ import annotations

from torch import nn
from torch.utils.hooks import RemovableHandle

from . import _decoder
from ._hooks import AdapterOf, bind, cache_length, find_inner, signature

MODEL_TYPE = "gpt2"


def install(model: nn.Module, adapter_of: AdapterOf) -> list[RemovableHandle]:
    from transformers import GPT2ForSequenceClassification, GPT2LMHeadModel, GPT2Model

    if isinstance(model, GPT2LMHeadModel):
        inner, head = model.transformer, "lm"
    elif isinstance(model, GPT2ForSequenceClassification):
        inner, head = model.transformer, "cls"
    elif isinstance(model, GPT2Model):
        inner, head = model, "base"
    else:
        raise TypeError(
            "GPT-2 support covers GPT2LMHeadModel, GPT2ForSequenceClassification and "
            f"GPT2Model, got {type(model).__name__}"
        )
    handles = _decoder.install(model, inner, adapter_of, head=head)
    # Registered first among the inner model's pre-hooks: it reads the caller's ids.
    limit = _PositionLimit(adapter_of, inner.config.n_positions, type(inner))
    handles.append(inner.register_forward_pre_hook(limit, with_kwargs=True, prepend=True))
    return handles


class _PositionLimit:
    """Refuses a forward whose prompt rows and tokens need more than `n_positions` positions."""

    def __init__(self, adapter_of: AdapterOf, limit: int, inner_cls: type) -> None:
        self.adapter_of = adapter_of
        self.limit = limit
        self.args = signature(inner_cls, ("input_ids", "cache"))

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        kw = bind(module, args, kwargs)
        ids = self.args.get(kw, "input_ids")
        if ids is None or ids.dim() != 2:
            return
        past = cache_length(self.args.get(kw, "cache"))
        m = self.adapter_of().num_virtual_tokens
        needed = past + ids.shape[1] + (m if past == 0 else 0)
        if needed > self.limit:
            cached = f", after {past} cached," if past else ""
            raise ValueError(
                f"the prompt's {m} rows and {ids.shape[1]} tokens{cached} need {needed} "
                f"positions, but GPT-2's position table (config.n_positions) has {self.limit}: "
                f"the soft prompt pushes the sequence past it; keep inputs to "
                f"{self.limit - m} tokens or fewer"
            )


def aot_sites(model: nn.Module) -> tuple[nn.Module, nn.ModuleList]:
    """(the GPT2Model inside `model`, its blocks `h`): where AoT P-tuning adds its bias."""
    from transformers import GPT2Model

    inner = find_inner(model, GPT2Model)
    return inner, inner.h
