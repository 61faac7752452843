"""The decoder-only architectures, one `Decoder` row each in `DECODERS`: adding one is one
row, registered below for both sites.

A row names the HF classes, imported from `transformers` by name only when a model of that
type is patched (a release lacking one fails then, saying so), the head kind each class is
(`_decoder.HEADS`), where the base model keeps its layers, and the architecture's quirks:
- `position_table`: the config field sizing a learned absolute position table (GPT-2's
  `wpe`). The prompt takes positions 0..m-1 and the tokens follow from m, so m of its rows go
  to the prompt; a pre-hook says so when a batch needs more (`PositionLimit`),
  where HF would raise a bare IndexError from inside the embedding.
- `sliding_window`: the config field of a sliding attention window (Mistral). The window
  counts columns, the prompt's m included: token j sees prompt row i while m + j - i is
  under the window, as in the reference that feeds the prompt through `inputs_embeds`, so
  past the window the prompt acts only through earlier tokens. A padding trim cuts leading
  columns only when the whole call fits in the window (cutting them would bring the prompt
  nearer the tokens).
Rotary models (LLaMA, Mistral, Qwen2, Gemma) take their positions from `position_ids`,
which the hooks shift as for GPT-2: the prompt at 0..m-1, the tokens from m.
Gemma multiplies its input embeddings by sqrt(d), as PEFT's prompt tuning meets it: the
rows are those of the formula built from the embedding module's output and passed as
`inputs_embeds`. Under transformers 4.x the model scales `inputs_embeds`, so the prompt,
the tokens and the delta are all scaled; under 5.x the embedding module scales its lookup
(`embed_scale`, applied by `_hooks.FusedEmbedding`), so only `E[ids]` is.
The hooks every row shares are in `_decoder.py`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from torch import nn
from torch.utils.hooks import RemovableHandle

from . import _decoder
from ._hooks import AdapterOf, PositionLimit, find_inner, transformers_class
from ._registry import Architecture, register


@dataclass(frozen=True)
class Decoder:
    """One decoder-only architecture.

    heads: transformers class name -> head kind ("lm", "cls" or "base"), exactly one "base"
    (the inner model the heads hold). layers: the base model's attribute holding its layers.
    position_table / sliding_window: config field names of the quirks (module docstring).
    """

    model_type: str
    name: str  # as messages spell it
    heads: Mapping[str, str]
    layers: str
    position_table: str | None = None
    sliding_window: str | None = None

    def __post_init__(self) -> None:
        kinds = list(self.heads.values())
        if not set(kinds) <= set(_decoder.HEADS) or kinds.count("base") != 1:
            raise ValueError(
                f"{self.name}: head kinds must be among {_decoder.HEADS} with one 'base', "
                f"got {dict(self.heads)}"
            )

    def _class(self, name: str) -> type:
        return transformers_class(name, self.name)

    def locate(self, model: nn.Module) -> tuple[nn.Module, nn.ModuleList]:
        """(the base model inside `model`, its layers): where AoT P-tuning adds its bias."""
        base = next(name for name, kind in self.heads.items() if kind == "base")
        inner = find_inner(model, self._class(base))
        # The slice HF's forward runs (LLaMA and Mistral iterate layers[:num_hidden_layers]).
        return inner, getattr(inner, self.layers)[: inner.config.num_hidden_layers]

    def head(self, model: nn.Module) -> str:
        """`model`'s head kind, or a TypeError naming the supported classes."""
        for name, kind in self.heads.items():
            if isinstance(model, self._class(name)):
                return kind
        *first, last = self.heads
        raise TypeError(
            f"{self.name} support covers {', '.join(first)} and {last}, got {type(model).__name__}"
        )

    def install(self, model: nn.Module, adapter_of: AdapterOf) -> list[RemovableHandle]:
        """The prompt methods' hooks on `model` (site "input_embedding")."""
        head = self.head(model)
        inner = model if head == "base" else self.locate(model)[0]
        handles = _decoder.install(model, inner, adapter_of, head, window=self.sliding_window)
        if self.position_table is not None:
            limit = PositionLimit(adapter_of, self.name, self.position_table, inner)
            # First among the inner model's pre-hooks: it reads the caller's ids.
            handles.append(inner.register_forward_pre_hook(limit, with_kwargs=True, prepend=True))
        return handles


DECODERS = (
    Decoder(
        "gpt2",
        "GPT-2",
        {"GPT2LMHeadModel": "lm", "GPT2ForSequenceClassification": "cls", "GPT2Model": "base"},
        layers="h",
        position_table="n_positions",
    ),
    Decoder(
        "llama",
        "LLaMA",
        {"LlamaForCausalLM": "lm", "LlamaForSequenceClassification": "cls", "LlamaModel": "base"},
        layers="layers",
    ),
    Decoder(
        "mistral",
        "Mistral",
        {
            "MistralForCausalLM": "lm",
            "MistralForSequenceClassification": "cls",
            "MistralModel": "base",
        },
        layers="layers",
        sliding_window="sliding_window",
    ),
    Decoder(
        "qwen2",
        "Qwen2",
        {"Qwen2ForCausalLM": "lm", "Qwen2ForSequenceClassification": "cls", "Qwen2Model": "base"},
        layers="layers",
        # None unless config.use_sliding_window.
        sliding_window="sliding_window",
    ),
    Decoder(
        "gemma",
        "Gemma",
        {"GemmaForCausalLM": "lm", "GemmaForSequenceClassification": "cls", "GemmaModel": "base"},
        layers="layers",
    ),
)

for _row in DECODERS:
    register(Architecture(_row.model_type, _row.locate, _row.install))
