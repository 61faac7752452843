"""The generic path: the prompt methods on a model type that has no table entry, as PEFT's
prompt tuning reaches any model whose forward takes `inputs_embeds` and `attention_mask`.

What it needs, found by structure and signature (never by class name), each missing piece a
TypeError naming the model's class, the transformers version and what is missing:
- an input embedding (`get_input_embeddings()`, a (V, d) weight) held as a direct child by
  one module, and a model forward taking input_ids, attention_mask and inputs_embeds;
- decoder-only: that module, the *inner* model, takes input_ids, attention_mask and
  inputs_embeds (OPT's `OPTDecoder`, BLOOM's `BloomModel`, Phi's `PhiModel`);
- encoder-decoder (`config.is_encoder_decoder`): that module takes input_ids,
  attention_mask and encoder_outputs (BART's `BartModel`), its `get_encoder()` takes
  input_ids, attention_mask and inputs_embeds and holds an embedding sharing the input
  embedding's weight; the hooks are `_seq2seq.py`'s.
The fused op runs inside the call of the embedding module the model calls
(`_hooks.FusedEmbedding`), as engines need.
Decoder-only head kinds come from the model: no `labels` argument, the base model (its
output keeps the m prompt rows, as in PEFT); output embeddings (`get_output_embeddings()`),
a causal LM (labels get m leading -100s, logits keep the prompt rows); otherwise a head over
the tokens, such as sequence classification, which reads the inner output without the
prompt rows. The decoder hooks (`_decoder.py`) then do the rest: the rows on a first forward
only (a cache holding no tokens), the mask (and positions, cache positions, where the
forward takes them) shifted by m on later steps, `task_ids` for stacked adapters. Position
ids and the cache are read where the forwards take them: BLOOM takes no positions (ALiBi
reads the mask), so its low-rank rows are the columns 0..s-1, as an encoder's are.
A learned absolute position table (an `nn.Embedding` of the inner model or encoder besides
the input embedding: OPT's, BART's encoder's `embed_positions`) limits prompt and tokens to
`config.max_position_embeddings`: longer calls raise a ValueError (`PositionLimit`).
No padding trim on this path: which columns a head or a position scheme may lose is known
only for the table's rows; `patch(..., trim_padding=True)` is refused.
What this path does not do: AoT P-tuning (its layer sites need a table entry), left-padding
positions beyond what the model itself derives, sliding windows.
"""

from __future__ import annotations

import inspect

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from . import _decoder, _seq2seq
from ._hooks import ROLES, AdapterOf, PositionLimit, transformers_version
from ._registry import Architecture, model_type, register_generic, supported

_NEEDS = ("input_ids", "attention_mask", "inputs_embeds")
# Read where the forwards take them; the table's rows must.
_OPTIONAL = ("position_ids", "cache")
_POSITION_LIMIT = "max_position_embeddings"


def _unsupported(model: nn.Module, why: str) -> TypeError:
    return TypeError(
        f"unsupported model {type(model).__name__} (model_type={model_type(model)!r}) under "
        f"transformers {transformers_version()}: {why}; the generic path serves models whose "
        "forward takes input_ids, attention_mask and inputs_embeds; model types with a table "
        f"entry: {supported('input_embedding')}"
    )


def _lacks(cls: type, roles: tuple[str, ...]) -> str | None:
    """What `cls.forward` lacks of `roles`, as a message; None if it takes them all."""
    params = inspect.signature(cls.forward).parameters
    missing = [ROLES[r][0] for r in roles if not any(n in params for n in ROLES[r])]
    if not missing:
        return None
    plural = "s" if len(missing) > 1 else ""
    return f"{cls.__name__}.forward takes no {', '.join(missing)} argument{plural}"


def _call(model: nn.Module, method: str) -> object:
    get = getattr(model, method, None)
    try:
        return get() if callable(get) else None
    except NotImplementedError:
        return None


def input_embedding(model: nn.Module) -> nn.Module:
    """`model`'s input embedding module, (V, d) weight, or the TypeError saying it has none."""
    embedding = _call(model, "get_input_embeddings")
    weight = getattr(embedding, "weight", None)
    if not isinstance(embedding, nn.Module) or not isinstance(weight, Tensor) or weight.ndim != 2:
        raise _unsupported(
            model, "no input-embedding module found (get_input_embeddings() gives no module "
            "with a (V, d) weight)"
        )  # fmt: skip
    return embedding


def _owner(model: nn.Module, embedding: nn.Module) -> nn.Module:
    """The first module inside `model` holding `embedding` as a direct child."""
    owner = next((m for m in model.modules() if any(c is embedding for c in m.children())), None)
    if owner is None:
        raise _unsupported(
            model, f"no module inside it holds its input embedding ({type(embedding).__name__}) "
            "as a direct child"
        )  # fmt: skip
    return owner


def _encoder(model: nn.Module, seq2seq: nn.Module, embedding: nn.Module):
    """(the encoder that `seq2seq` runs, the encoder's input embedding: its child sharing
    `embedding`'s weight)."""
    lacks = _lacks(type(seq2seq), _seq2seq.SEQ2SEQ_NEEDS)
    if lacks:
        raise _unsupported(
            model, f"the encoder-decoder module holding its input embedding: {lacks}"
        )
    encoder = _call(seq2seq, "get_encoder")
    if not isinstance(encoder, nn.Module) or encoder is seq2seq:
        raise _unsupported(model, f"{type(seq2seq).__name__}.get_encoder() gives no encoder")
    own = next(
        (
            c
            for c in encoder.children()
            if c is embedding or getattr(c, "weight", None) is embedding.weight
        ),
        None,
    )
    if own is None:
        raise _unsupported(
            model, f"its encoder {type(encoder).__name__} holds no embedding sharing the input "
            "embedding's weight as a direct child"
        )  # fmt: skip
    lacks = _lacks(type(encoder), _seq2seq.ENCODER_NEEDS)
    if lacks:
        raise _unsupported(model, f"its encoder: {lacks}")
    return encoder, own


def _is_seq2seq(model: nn.Module) -> bool:
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def _parts(model: nn.Module) -> tuple[nn.Module, nn.Module, nn.Module | None]:
    """(the inner model: the module holding the input embedding, or an encoder-decoder's
    encoder; the embedding the inner model calls; the encoder-decoder module, or None), or
    the TypeError saying what `model` lacks."""
    embedding = input_embedding(model)
    lacks = _lacks(type(model), _NEEDS)
    if lacks:
        raise _unsupported(model, lacks)
    owner = _owner(model, embedding)
    if _is_seq2seq(model):
        encoder, own = _encoder(model, owner, embedding)
        return encoder, own, owner
    lacks = _lacks(type(owner), _NEEDS)
    if lacks:
        raise _unsupported(model, f"the module holding its input embedding: {lacks}")
    return owner, embedding, None


def locate(model: nn.Module) -> tuple[nn.Module, tuple[()]]:
    """(the inner model (`_parts`); no layers: they are AoT's sites, which need a table
    entry)."""
    return _parts(model)[0], ()


def head(model: nn.Module) -> str:
    """`model`'s head kind (`_decoder.HEADS`), from its forward's arguments and modules."""
    if _lacks(type(model), ("labels",)):
        return "base"
    return "lm" if isinstance(_call(model, "get_output_embeddings"), nn.Module) else "cls"


def _position_table(inner: nn.Module, embedding: nn.Module) -> bool:
    """Whether `inner` holds a learned position table sized by its config."""
    config = getattr(inner, "config", None)
    if not isinstance(getattr(config, _POSITION_LIMIT, None), int):
        return False
    return any(isinstance(c, nn.Embedding) and c is not embedding for c in inner.children())


def install(model: nn.Module, adapter_of: AdapterOf) -> list[RemovableHandle]:
    """The prompt methods' hooks on `model` (site "input_embedding")."""
    if adapter_of.trim_padding:
        raise ValueError(
            f"trim_padding=True: {type(model).__name__} runs on the generic path (its model "
            f"type {model_type(model)!r} has no table entry), which does not trim padding"
        )
    inner, embedding, seq2seq = _parts(model)
    if seq2seq is not None:
        handles = _seq2seq.install(model, seq2seq, inner, embedding, adapter_of)
    else:
        handles = _decoder.install(
            model, inner, adapter_of, head(model), optional=_OPTIONAL, embedding=embedding,
            trims=False,
        )  # fmt: skip
    if _position_table(inner, embedding):
        name = type(inner).__name__
        limit = PositionLimit(adapter_of, name, _POSITION_LIMIT, inner)
        # First among the inner model's pre-hooks: it reads the caller's ids.
        handles.append(inner.register_forward_pre_hook(limit, with_kwargs=True, prepend=True))
    return handles


register_generic(Architecture("generic", locate, install))
