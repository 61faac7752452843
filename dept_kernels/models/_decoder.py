"""Decoder-only models (the rows of `decoders.DECODERS`): their hooks, once the inner model
is located.

The inner transformer (`GPT2Model`, `LlamaModel`, ...) gets a pre-hook. On a first forward (a
cache holding no tokens, or none) it embeds the ids through the adapter, inside the call of
the embedding module (`FusedEmbedding`), so the m prompt rows come first, prepends m ones
to the mask, and moves given positions behind the prompt (`cat([0..m-1], position_ids + m)`);
the given `position_ids` also pick the low-rank rows, so left padding uses each token's
position among real tokens. Later generation steps embed their tokens plainly; only mask and
positions shift by m, since the cache holds the prompt. A generation without the cache
re-runs the whole sequence each step: the tokens past generate's input take no delta.
A stacked adapter's `task_ids` (B,) are popped from the model's call (or taken from the
running `generate`) and reach the first forward's embedding.

The hooks find the cache, mask, positions and embeddings by the installed forward's
signature (`Signature`): transformers 5.24 renamed `past_key_values` to `cache`.

Padding trim: a first forward cuts the leading and trailing columns that the mask marks
padding in every row before the fused op. Positions stay those of the untrimmed columns:
given `position_ids` are cut with the ids, and with none and k leading columns cut, the
tokens take positions (and low-rank rows) k..s-1, as untrimmed. On by default for the
sequence-classification heads: the head pools the inner output re-padded to the caller's s
columns (zeros in the cut ones) at the last token it finds with its own `input_ids`, so a
column is cut only if it holds the pad id in every row. Opt-in (`trim_padding=True`) for
LM heads and base models, whose per-position logits and hidden states come back re-padded
(zeros in the cut columns); there a column is cut only if its labels are -100 in every row,
and a leading cut keeps the column whose logits predict the first kept label. Never while
generating, nor with a cache passed or `use_cache=True` (the cache would hold the trimmed
columns); a trimmed call otherwise returns no cache. With a sliding attention window
(`window`), leading columns are cut only when the prompt and the tokens fit in the window:
the window counts columns, so a cut would bring the prompt within reach of tokens that the
untrimmed call keeps out of it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ._hooks import (
    AdapterOf,
    Cut,
    FusedEmbedding,
    PositionLimit,  # noqa: F401  (models pickled before it moved name it here)
    TaskIds,
    bind,
    cache_length,
    call_keeps_shapes,
    checked_cut,
    extend_mask,
    generation,
    needs_ids,
    restore_outputs,
    row_ids,
    signature,
)
from ._per_thread import HookState, PerThread

HEADS = ("lm", "cls", "base")
_INNER_NEEDS = ("input_ids", "attention_mask", "inputs_embeds", "position_ids", "cache")
_INNER_WANTS = ("cache_position",)
_MODEL_WANTS = ("input_ids", "attention_mask", "position_ids", "cache_position")


def install(
    model: nn.Module,
    inner: nn.Module,
    adapter_of: AdapterOf,
    head: str,
    window: str | None = None,
    *,
    optional: tuple[str, ...] = (),
    embedding: nn.Module | None = None,
    trims: bool = True,
) -> list[RemovableHandle]:
    """Hook `inner` (and `model` for its labels or pooling). head: "lm", "cls" or "base";
    window: the config field of a sliding attention window, if the model has one.
    The generic path (`_generic.py`) passes: `optional`, roles the table's rows must take
    that it reads only where the forwards take them ("position_ids", "cache"); `embedding`,
    the input embedding (default `inner.get_input_embeddings()`); `trims=False`, no padding
    trim whatever `patch` says.

    "lm": labels get m leading -100s (logits keep the prompt rows, as in PEFT).
    "cls": the prompt rows are cut from the inner output, so the head pools over the
    tokens it indexes with its own `input_ids` (its last non-pad token).
    Padding trim (module docstring): in the inner call for "cls" and "base", in the model's
    call for "lm" (its labels and logits are the model's).
    """
    if head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, got {head!r}")
    # Checked before any hook is registered: a missing argument fails the patch, whole.
    inner_args = _signature(type(inner), _INNER_NEEDS, _INNER_WANTS, optional)
    model_args = None
    if head == "lm":
        model_args = _signature(type(model), ("labels", "cache"), _MODEL_WANTS, optional)
    hooks = _DecoderHooks(adapter_of, inner_args, model_args, head, window, embedding, trims)
    handles = hooks.tasks.install(model)
    handles += hooks.fused.install(inner.get_input_embeddings() if embedding is None else embedding)
    handles.append(inner.register_forward_pre_hook(hooks.inner_pre_hook, with_kwargs=True))
    if head != "lm":
        handles.append(inner.register_forward_hook(hooks.trim_hook, always_call=True))
    else:
        handles.append(model.register_forward_pre_hook(hooks.labels_pre_hook, with_kwargs=True))
        handles.append(model.register_forward_hook(hooks.logits_hook, always_call=True))
    return handles


def _signature(cls: type, need: tuple[str, ...], want: tuple[str, ...], optional: tuple[str, ...]):
    """`signature(cls, need, want)` with the `optional` roles of `need` moved to `want`."""
    kept = tuple(r for r in need if r not in optional)
    return signature(cls, kept, tuple(r for r in need if r in optional) + want)


class _DecoderHooks(HookState):
    # Per open call, pushed first thing by the pre-hook and popped by the forward hook
    # (which runs on errors too): of the inner model ("cls", "base"), the rows prepended and
    # the cut; of the model ("lm"), the cut. Each thread's own (`_per_thread`).
    open = PerThread(list)
    lm_cuts = PerThread(list)
    # (ids, position ids, task ids) whose op ranges an LM head's trim read with its mask, for
    # the inner call that receives exactly these tensors; cleared once consumed.
    lm_checked = PerThread()
    # Class defaults: hooks pickled before sliding windows (the generic path) read these.
    window: str | None = None
    embedding: nn.Module | None = None  # None: the inner model's get_input_embeddings()
    trims: bool = True

    def __init__(
        self,
        adapter_of: AdapterOf,
        inner_args,
        model_args,
        head: str,
        window: str | None,
        embedding: nn.Module | None = None,
        trims: bool = True,
    ) -> None:
        self.adapter_of = adapter_of
        self.inner_args = inner_args
        self.model_args = model_args
        self.head = head
        self.window = window
        self.embedding = embedding
        self.trims = trims
        self.tasks = TaskIds()
        self.fused = FusedEmbedding(adapter_of)

    def _trims(self, kw: dict, module: nn.Module, sig) -> bool:
        """Whether this first forward may run on trimmed columns (module docstring)."""
        setting = self.adapter_of.trim_padding
        if not self.trims or not (setting if self.head != "cls" else setting is not False):
            return False
        if sig.get(kw, "cache") is not None or kw.get("use_cache") is True:
            return False
        return generation(self.tasks.model) is None and call_keeps_shapes(kw, module.config)

    def _leading(self, config: object, columns: int) -> bool:
        """Whether a trim may cut leading columns of a first forward of `columns` columns,
        the prompt's included (module docstring: a sliding window counts columns)."""
        size = getattr(config, self.window, None) if self.window is not None else None
        return size is None or columns <= size

    def _cut(
        self, kw: dict, sig, ids: Tensor, rows: Tensor | None, cut: Cut
    ) -> tuple[Tensor, Tensor]:
        """Cut the call's ids, mask, positions and cache positions in `kw` to `cut`'s columns;
        returns (ids, rows): rows are the kept columns' untrimmed positions (None: 0..s'-1)."""
        kept = cut.stop - cut.start
        sig.set(kw, "attention_mask", cut.take(sig.get(kw, "attention_mask")))
        if rows is not None:
            rows = cut.take(rows)
        elif cut.start:
            # With no positions given, the kept tokens keep those of their untrimmed columns.
            rows = torch.arange(cut.start, cut.stop, device=ids.device).expand(len(ids), -1)
        cache_position = sig.get(kw, "cache_position")
        if cache_position is not None:
            # A first forward's cache slots: 0..s'-1, contiguous (the causal mask reads them).
            sig.set(kw, "cache_position", cache_position[:kept])
        kw["use_cache"] = False
        return cut.take(ids), rows

    def inner_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if self.head != "lm":
            self.open.append((0, None))
        sig = self.inner_args
        kw = bind(module, args, kwargs)
        own_tasks = kw.pop("task_ids", None)
        m = self.adapter_of().num_virtual_tokens
        positions = sig.get(kw, "position_ids")
        first = cache_length(sig.get(kw, "cache")) == 0
        cut = None
        lm_checked, self.lm_checked = self.lm_checked, None
        if first:
            ids = needs_ids(kw, type(module).__name__)
            if kw.get("token_type_ids") is not None:
                raise ValueError("token_type_ids are not supported with a soft prompt")
            rows = row_ids(positions, ids)
            task_ids = self.tasks.resolve(own_tasks, ids.shape[0])
            # The LM head's trim read these very tensors' ranges (`_lm_trim`).
            checked = lm_checked is not None and all(
                a is b for a, b in zip(lm_checked, (ids, positions, task_ids), strict=True)
            )
            if self.head != "lm" and self._trims(kw, module, sig):
                pad_id = _pad_token_id(self.tasks.model)
                leading = self._leading(module.config, m + ids.shape[1])
                # The op's id ranges are read with the mask's runs: one read per forward.
                ranges = self.fused.id_ranges(self._embedding(module), ids, rows, task_ids)
                mask = sig.get(kw, "attention_mask")
                if self.head == "base":
                    cut, checked = checked_cut(mask, ranges, leading=leading)
                elif pad_id is not None:
                    # HF pools at the last id that is not pad_token_id (its -1 without one).
                    cut, checked = checked_cut(
                        mask, ranges, leading=leading, ids=ids, pad_token_id=pad_id
                    )
                if cut is not None:
                    ids, rows = self._cut(kw, sig, ids, rows, cut)
            cache_position = sig.get(kw, "cache_position")
            sig.set(kw, "inputs_embeds", self._embed(module, ids, rows, task_ids, checked))
            sig.set(kw, "input_ids", None)
            if rows is not None:
                prompt_pos = torch.arange(m, device=rows.device, dtype=rows.dtype)
                sig.set(
                    kw, "position_ids", torch.cat([prompt_pos.expand(len(rows), m), rows + m], 1)
                )
            if cache_position is not None:
                prompt_pos = torch.arange(m, device=cache_position.device)
                sig.set(
                    kw,
                    "cache_position",
                    torch.cat([prompt_pos.to(cache_position), cache_position + m]),
                )
        else:
            cache_position = sig.get(kw, "cache_position")
            if positions is not None:
                sig.set(kw, "position_ids", positions + m)
            if cache_position is not None:
                sig.set(kw, "cache_position", cache_position + m)
        if self.head != "lm":
            self.open[-1] = (m if first else 0, cut)
        sig.set(kw, "attention_mask", extend_mask(sig.get(kw, "attention_mask"), m))
        return (), kw

    def _embedding(self, module: nn.Module) -> nn.Module:
        return module.get_input_embeddings() if self.embedding is None else self.embedding

    def _embed(
        self,
        module: nn.Module,
        ids: Tensor,
        rows: Tensor | None,
        task_ids: Tensor | None,
        checked: bool = False,
    ) -> Tensor:
        """(B, m + s, d) for a first forward. Under a `generate` that runs without the cache,
        the tokens past its input are generated ones: plain embeddings, no delta (their
        positions may lie past max_length). `checked`: the op's id ranges were read."""
        embedding = self._embedding(module)
        running = generation(self.tasks.model)
        given = ids.shape[1]
        if running is not None and running.input_length is not None:
            given = min(running.input_length, given)
        head_rows = None if rows is None else rows[:, :given]
        embeds = self.fused(embedding, ids[:, :given], head_rows, task_ids, checked=checked)
        if given == ids.shape[1]:
            return embeds
        return torch.cat([embeds, embedding(ids[:, given:])], dim=1)

    def trim_hook(self, module: nn.Module, args: tuple, output):
        """The inner call's output: without the prompt rows ("cls"), at the caller's length."""
        if not self.open:
            return None
        m, cut = self.open.pop()
        if output is None:  # the forward raised
            return None
        if m and self.head == "cls":
            output.last_hidden_state = output.last_hidden_state[:, m:]
            if getattr(output, "hidden_states", None) is not None:
                output.hidden_states = tuple(h[:, m:] for h in output.hidden_states)
        restore_outputs(output, cut, ("last_hidden_state", "hidden_states"))
        return output

    def labels_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        self.lm_cuts.append(None)
        sig = self.model_args
        kw = bind(module, args, kwargs)
        first = cache_length(sig.get(kw, "cache")) == 0
        if first:
            self.lm_cuts[-1] = self._lm_trim(module, kw)
        labels = sig.get(kw, "labels")
        if labels is not None and first:
            m = self.adapter_of().num_virtual_tokens
            ignore = labels.new_full((labels.shape[0], m), -100)
            sig.set(kw, "labels", torch.cat([ignore, labels], dim=1))
        return (), kw

    def _lm_trim(self, module: nn.Module, kw: dict) -> Cut | None:
        """Trim an LM head's first forward in `kw` (ids, mask, positions, labels)."""
        sig = self.model_args
        ids, labels = sig.get(kw, "input_ids"), sig.get(kw, "labels")
        if not isinstance(ids, Tensor) or ids.ndim != 2 or not self._trims(kw, module, sig):
            return None
        mask = sig.get(kw, "attention_mask")
        if not isinstance(mask, Tensor) or mask.shape != ids.shape:
            return None  # left to the inner hook's checks
        if labels is not None and (not isinstance(labels, Tensor) or labels.shape != ids.shape):
            return None
        keep = kw.get("logits_to_keep", 0)
        if not isinstance(keep, int) or keep != 0:
            return None  # logits of the last k columns: those of the trimmed batch differ
        m = self.adapter_of().num_virtual_tokens
        leading = self._leading(module.config, m + ids.shape[1])
        positions = sig.get(kw, "position_ids")
        rows = row_ids(positions, ids)
        # The op's id ranges are read with the mask's runs: the inner call's op, handed
        # exactly these tensors, then reads nothing (one read per forward).
        task_ids = self.tasks.resolve(None, ids.shape[0])
        ranges = self.fused.id_ranges(self._embedding(module), ids, rows, task_ids)
        cut, checked = checked_cut(mask, ranges, leading=leading, labels=labels)
        if cut is not None:
            ids, rows = self._cut(kw, sig, ids, rows, cut)
            positions = rows
            sig.set(kw, "input_ids", ids)
            sig.set(kw, "position_ids", rows)
            if labels is not None:
                sig.set(kw, "labels", cut.take(labels))
        self.lm_checked = (ids, positions, task_ids) if checked else None
        return cut

    def logits_hook(self, module: nn.Module, args: tuple, output) -> None:
        self.lm_checked = None  # unconsumed when the forward raised first
        if self.lm_cuts:
            restore_outputs(output, self.lm_cuts.pop(), ("logits", "hidden_states"))


def _pad_token_id(model: nn.Module) -> int | None:
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text, "pad_token_id", None)
