"""Helpers shared by the architecture modules: the hooked forwards' arguments (found by
signature), mask and cache checks, the adapter lookup, the routing of `task_ids` and of
visual rows (`visual_embeds`, `visual_attention_mask`), the running `generate`, and the fused
embedding run inside the embedding module's call.

Hooks are methods of objects (not closures) that reach the adapter through `AdapterOf`: a
`copy.deepcopy` of a patched model copies the hook objects with the model (a closure would be
shared), so the copy's hooks serve the copy's adapter; a pickled model keeps them too.
"""

from __future__ import annotations

import functools
import inspect
import threading
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .._engines import embedding_shape, is_fsdp1_flat
from ..ops._sync_free import sync_free_enabled
from ..ops._validate import Range, check_ids, checked, raise_out_of_range, range_reads
from ._per_thread import HookState, PerThread

# Each thread's running generates (`Generate`): another thread's generate on the same model
# must not lend this thread's forwards its task ids or input length. A threading.local, not
# a ContextVar: torch.compile traces attribute reads but not ContextVar.get.
_GENERATIONS = threading.local()

# The names each argument the hooks read has had across transformers releases, newest
# first. A hooked forward names one of them in its signature; the others are older
# spellings that the forward's deprecation wrapper may still accept from a caller.
ROLES: dict[str, tuple[str, ...]] = {
    "input_ids": ("input_ids",),
    "attention_mask": ("attention_mask",),
    "inputs_embeds": ("inputs_embeds",),
    "position_ids": ("position_ids",),
    "token_type_ids": ("token_type_ids",),
    "cache": ("cache", "past_key_values"),
    "cache_position": ("cache_position",),
    "encoder_outputs": ("encoder_outputs",),
    "labels": ("labels",),
}


def transformers_version() -> str:
    try:
        import transformers
    except ImportError:
        return "not installed"
    return transformers.__version__


def transformers_class(name: str, who: str) -> type:
    """`transformers.<name>`, imported when a model is patched; a TypeError saying that `who`'s
    support needs it when the installed release lacks it."""
    import transformers

    cls = getattr(transformers, name, None)
    if cls is None:
        raise TypeError(
            f"{who} support needs transformers.{name}, which transformers "
            f"{transformers_version()} does not have"
        )
    return cls


class Signature:
    """Where a hooked forward takes the arguments the hooks read, found in the installed
    version's signature (`ROLES`), never by one hard-coded name.

    `need` roles must be there: their absence is a `TypeError` naming the class and the
    transformers version, raised when patching, rather than a hook that computes something
    else. `want` roles are read when present (e.g. `cache_position`, gone in transformers 5).
    """

    def __init__(self, cls: type, need: tuple[str, ...], want: tuple[str, ...] = ()) -> None:
        params = inspect.signature(cls.forward).parameters
        self.cls = cls
        self.names: dict[str, str] = {}
        for role in (*need, *want):
            name = next((n for n in ROLES[role] if n in params), None)
            if name is not None:
                self.names[role] = name
            elif role in need:
                raise TypeError(
                    f"{cls.__name__}.forward (transformers {transformers_version()}) takes no "
                    f"{' / '.join(ROLES[role])} argument, which dept_kernels' hooks need; this "
                    "transformers release is outside the supported range (see the README)"
                )

    def get(self, kw: dict, role: str) -> object:
        """The call's value of `role`: under the signature's name, else an older spelling."""
        name = self.names.get(role)
        if name is not None and name in kw:
            return kw[name]
        return next((kw[alias] for alias in ROLES[role] if alias in kw), None)

    def set(self, kw: dict, role: str, value: object) -> None:
        """Pass `value` as `role` under the signature's name (older spellings dropped)."""
        for alias in ROLES[role]:
            kw.pop(alias, None)
        kw[self.names.get(role, ROLES[role][0])] = value


@functools.cache
def signature(cls: type, need: tuple[str, ...], want: tuple[str, ...] = ()) -> Signature:
    return Signature(cls, need, want)


class AdapterOf:
    """`adapter_of()`: the adapter attached to `owner` under `name` now.

    Looked up on every call, so replacing the adapter (`fold`, `stack_adapters`) needs no new
    hooks; held as an object so that a deep copy of the model maps `owner` to the copy.

    `trim_padding` is `patch`'s switch, read by the hooks on every call: None (the default)
    trims the padding columns where the caller's outputs keep their shapes and values, True
    also where per-position outputs come back re-padded (decoder-only LM and base models),
    False never.
    """

    # A class default: objects pickled before the switch existed read None.
    trim_padding: bool | None = None

    def __init__(self, owner: nn.Module, name: str, trim_padding: bool | None = None) -> None:
        self.owner = owner
        self.name = name
        self.trim_padding = trim_padding

    def __call__(self) -> nn.Module:
        return getattr(self.owner, self.name)


VISUAL_ARGS = ("visual_embeds", "visual_attention_mask")


@dataclass(frozen=True)
class Visual:
    """Visual rows appended after a batch's tokens (CLIP-T5, docs/design.md §1): `embeds`
    (B, n_v, d), and their padding mask (B, n_v) or None (every row attended)."""

    embeds: Tensor
    mask: Tensor | None = None

    def repeated(self, batch_size: int) -> Visual:
        """The rows of a batch that `generate` expanded to `batch_size` (beams, sequences)."""
        return Visual(
            _repeat_rows(self.embeds, batch_size, "visual_embeds"),
            None if self.mask is None else _repeat_rows(self.mask, batch_size, "visual mask"),
        )

    def extend_mask(self, mask: Tensor | None, length: int) -> Tensor | None:
        """(B, length) padding mask of the tokens (None: all attended) -> (B, length + n_v)
        with the visual columns after them; None when every column is attended."""
        if mask is not None:
            check_padding_mask(mask)
        if self.mask is None:
            if mask is None:
                return None
            return torch.cat([mask, mask.new_ones(mask.shape[0], self.embeds.shape[1])], 1)
        dtype = self.mask.dtype if mask is None else mask.dtype
        if mask is None:
            mask = torch.ones(self.mask.shape[0], length, dtype=dtype, device=self.mask.device)
        return torch.cat([mask, self.mask.to(dtype)], 1)


def visual_inputs(
    embeds: object,
    mask: object,
    batch_size: int | None,
    width: int | None = None,
    device: torch.device | None = None,
) -> Visual | None:
    """`visual_embeds` (B, n_v, d) and `visual_attention_mask` (B, n_v) checked, with the
    argument named, before any kernel reads them; None without visual rows. `batch_size`,
    `width` (d) and `device` (the embedding table's) are checked when known."""
    if embeds is None:
        if mask is not None:
            raise ValueError("visual_attention_mask was given without visual_embeds")
        return None
    if not isinstance(embeds, Tensor) or not embeds.is_floating_point():
        got = embeds.dtype if isinstance(embeds, Tensor) else type(embeds).__name__
        raise TypeError(f"visual_embeds must be a floating-point tensor, got {got}")
    if embeds.ndim != 3:
        raise ValueError(
            f"visual_embeds must be 3-D (batch, n_v, d), got shape {tuple(embeds.shape)}"
        )
    if batch_size is not None and embeds.shape[0] != batch_size:
        raise ValueError(
            f"visual_embeds has {embeds.shape[0]} samples but input_ids has {batch_size}"
        )
    if width is not None and embeds.shape[2] != width:
        raise ValueError(
            f"visual_embeds has width {embeds.shape[2]}; the model's embeddings have d={width}"
        )
    if device is not None and embeds.device != device:
        raise ValueError(
            f"visual_embeds is on {embeds.device} but the model's embeddings are on {device}"
        )
    if mask is not None:
        want = tuple(embeds.shape[:2])
        if not isinstance(mask, Tensor) or tuple(mask.shape) != want:
            got = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
            raise ValueError(
                f"visual_attention_mask must have shape (batch, n_v) = {want} like "
                f"visual_embeds, got {got}"
            )
        if mask.device != embeds.device:
            raise ValueError(
                f"visual_attention_mask is on {mask.device} but visual_embeds is on {embeds.device}"
            )
    return Visual(embeds, mask)


@dataclass(frozen=True)
class Generation:
    """A running `generate` as the hooks see it: its samples' task ids (B,), the length
    of the input it was given (later tokens were generated: they take no prompt, no delta),
    and its samples' visual rows."""

    task_ids: Tensor | None
    input_length: int | None
    visual: Visual | None = None


class Generate:
    """`model.generate(..., task_ids=None, ...)` of a patched model, set by `patch`.

    An object in the instance's `__dict__` rather than a bound method: a pickled or
    deep-copied model keeps it (a bound method pickles as a lookup of its function's name on
    the model, which fails on load). `hooked` is the model whose hooks run (the base model
    under a PEFT wrapper), whose class `generate` runs.

    HF's `generate` rejects arguments its forward does not name, so the task ids and the
    visual rows (`visual_embeds`, `visual_attention_mask`) are held on `hooked` for the hooks
    of the whole generation (`TaskIds` repeats them per beam or returned sequence as
    generate repeats the batch), with the input's length.
    """

    def __init__(self, hooked: nn.Module) -> None:
        self.hooked = hooked

    def __call__(
        self,
        *args,
        task_ids: Tensor | None = None,
        visual_embeds: Tensor | None = None,
        visual_attention_mask: Tensor | None = None,
        **kwargs,
    ):
        hooked = self.hooked
        ids = args[0] if args else kwargs.get("input_ids", kwargs.get("inputs"))
        ids = ids if isinstance(ids, Tensor) and ids.ndim == 2 else None
        if isinstance(task_ids, Tensor):
            # Checked here, before generate repeats the batch per beam: later, task ids for
            # fewer samples would look like ids to repeat the same way.
            if task_ids.ndim != 1:
                raise ValueError(
                    "task_ids must be a 1-D tensor of one task id per sample, got shape "
                    f"{tuple(task_ids.shape)}"
                )
            if ids is not None and task_ids.shape[0] != ids.shape[0]:
                raise ValueError(
                    f"task_ids has {task_ids.shape[0]} entries but input_ids has "
                    f"{ids.shape[0]} samples"
                )
        # Checked here for the same reason: generate repeats the batch before the hooks run.
        batch_size = None if ids is None else ids.shape[0]
        visual = visual_inputs(visual_embeds, visual_attention_mask, batch_size)
        running = _generations()
        outer = running.get(id(hooked))  # a generate nested in a generate
        length = None if ids is None else ids.shape[1]
        running[id(hooked)] = Generation(task_ids, length, visual)
        try:
            return type(hooked).generate(hooked, *args, **kwargs)
        finally:
            if outer is None:
                running.pop(id(hooked), None)
            else:
                running[id(hooked)] = outer


def _generations() -> dict[int, Generation]:
    """This thread's running generates, by the id of the hooked model they run on (a model
    runs in one generate at a time per thread; its id is stable while it runs)."""
    running = _GENERATIONS.__dict__.get("by_model")
    if running is None:
        running = _GENERATIONS.__dict__["by_model"] = {}
    return running


def generation(model: nn.Module) -> Generation | None:
    """The `generate` running on hooked `model` in this thread, if any."""
    return _generations().get(id(model))


def _generation_tasks(model: nn.Module, batch_size: int) -> Tensor | None:
    """`model`'s running generate's task ids for a batch of `batch_size` rows (beams included)."""
    running = generation(model)
    task_ids = None if running is None else running.task_ids
    if task_ids is None or task_ids.ndim != 1:
        return task_ids
    return _repeat_rows(task_ids, batch_size, "task_ids")


def _repeat_rows(t: Tensor, batch_size: int, name: str) -> Tensor:
    """`t`'s per-sample rows for a batch that `generate` expanded to `batch_size` rows."""
    if t.shape[0] in (0, batch_size):
        return t
    if batch_size % t.shape[0]:
        raise ValueError(f"generate got {name} for {t.shape[0]} samples but runs {batch_size} rows")
    # generate repeats each sample's row for its beams / sequences (repeat_interleave).
    return t.repeat_interleave(batch_size // t.shape[0], dim=0)


class TaskIds(HookState):
    """Carries `task_ids` (B,), and visual rows where the architecture takes them, from the
    call that names them to the hook that uses them.

    `install(model)` pops them from the top-level model's call, so the HF forward never sees
    them, and holds them for that call; `resolve` (task ids) and `visual` pick, first found:
    the hooked module's own, the top-level call's, the running `generate`'s. With
    `visual=False` (the architectures without visual rows) a call or generate given them is
    refused, rather than run without them.
    """

    # Class default: objects pickled before visual rows existed take none.
    takes_visual = False
    # The running top-level call's task ids and visual rows: each thread's own.
    outer = PerThread()
    outer_visual = PerThread(lambda: (None, None))

    def __init__(self, visual: bool = False) -> None:
        self.model: nn.Module | None = None  # the top-level model, whose generate may run
        self.takes_visual = visual

    def install(self, model: nn.Module) -> list[RemovableHandle]:
        """Hook `model`; register this before the hooks on `model` that call `resolve`."""
        self.model = model
        return [
            model.register_forward_pre_hook(self._pop, with_kwargs=True),
            model.register_forward_hook(self._clear, always_call=True),
        ]

    def _pop(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        self.outer = kwargs.pop("task_ids", None)
        self._refuse_visual(type(module).__name__, *(kwargs.get(k) for k in VISUAL_ARGS))
        self.outer_visual = tuple(kwargs.pop(k, None) for k in VISUAL_ARGS)
        return args, kwargs

    def _clear(self, module: nn.Module, args: tuple, output) -> None:
        self.outer = None
        self.outer_visual = (None, None)

    def _refuse_visual(self, where: str, *given: object) -> None:
        if not self.takes_visual and any(v is not None for v in given):
            raise TypeError(
                f"{where} got {' / '.join(VISUAL_ARGS)}: visual rows are supported on the "
                "patched T5 models only"
            )

    def resolve(self, own: Tensor | None, batch_size: int) -> Tensor | None:
        """The task ids of a batch of `batch_size` rows; `own`: the hooked call's."""
        running = generation(self.model)
        if running is not None:
            self._refuse_visual(f"{type(self.model).__name__}.generate", running.visual)
        if own is not None:
            return own
        if self.outer is not None:
            return self.outer
        return _generation_tasks(self.model, batch_size)

    def visual(
        self, kw: dict, batch_size: int, width: int | None, device: torch.device | None = None
    ) -> Visual | None:
        """The visual rows of a batch of `batch_size` rows, checked (`visual_inputs`); pops
        the hooked call's own `visual_embeds` / `visual_attention_mask` from its `kw`."""
        own = tuple(kw.pop(k, None) for k in VISUAL_ARGS)
        for given in (own, self.outer_visual):
            if any(v is not None for v in given):
                return visual_inputs(*given, batch_size, width, device)
        running = generation(self.model)
        if running is None or running.visual is None:
            return None
        visual = running.visual.repeated(batch_size)
        return visual_inputs(visual.embeds, visual.mask, batch_size, width, device)


class FusedEmbedding(HookState):
    """Runs the adapter's op inside the call of the model's input-embedding module.

    Engines that shard parameters (FSDP2, DeepSpeed ZeRO-3) gather a module's weight around
    that module's own call and free it after; a hook that read the weight from outside would
    see a shard. So `__call__` calls the embedding module itself: its pre-hook swaps the ids
    for an empty tensor (the module's own lookup then costs nothing) and its forward hook,
    registered first so that it runs before an engine's post-forward hook releases the
    weight, returns the fused `[P; E[ids] + delta]` computed from the gathered weight.
    Calls that this object did not start pass through untouched (generation steps).
    """

    # Each thread's own: (ids, position ids, task ids, visual rows, ids checked) of each call
    # started, and whether the pre-hook swapped the ids of the call it started.
    pending = PerThread(list)
    armed = PerThread(lambda: False)

    def __init__(self, adapter_of: AdapterOf) -> None:
        self.adapter_of = adapter_of

    def install(self, embedding: nn.Module) -> list[RemovableHandle]:
        return [
            # Both first: an engine's pre-hook (DeepSpeed ZeRO-3) replaces the inputs by
            # detached aliases, which the identity test of `_pre_hook` would not recognise.
            embedding.register_forward_pre_hook(self._pre_hook, prepend=True),
            embedding.register_forward_hook(self._hook, prepend=True),
        ]

    def __call__(
        self,
        embedding: nn.Module,
        ids: Tensor,
        position_ids: Tensor | None,
        task_ids: Tensor | None,
        visual: Tensor | None = None,
        checked: bool = False,
    ) -> Tensor:
        """(B, m + s [+ n_v], d): the adapter's embedding of `ids` (B, s) by `embedding`'s
        weight, then the visual rows (B, n_v, d) when given, written by the same op.
        `checked`: the ranges of `id_ranges` for these tensors (or tensors they are columns
        of) were read (`checked_cut`), so the op does not read them again."""
        entry = (ids, position_ids, task_ids, visual, checked)
        self.pending.append(entry)
        try:
            out = embedding(ids)
        except BaseException:
            self._discard(entry)
            raise
        if self._discard(entry):
            raise RuntimeError(
                f"the hooks dept_kernels put on {type(embedding).__name__} did not run: its "
                "call was replaced or its hooks removed, so the prompt would be missing"
            )
        return out

    def _discard(self, entry: tuple) -> bool:
        """Drop `entry` if the hooks left it (they did not run); True if they did leave it."""
        if self.pending and self.pending[-1] is entry:
            self.pending.pop()
            self.armed = False
            return True
        return False

    def _pre_hook(self, module: nn.Module, args: tuple) -> tuple | None:
        if not self.pending or not args or args[0] is not self.pending[-1][0]:
            return None
        self.armed = True
        # int64 whatever the ids' dtype: the op, not the module's lookup, judges the ids.
        return (torch.empty(0, dtype=torch.long, device=args[0].device),)

    def _hook(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
        # The call whose pre-hook swapped the ids (no other call of the module can run in
        # between); its empty ids may arrive as an engine's alias of the swapped tensor.
        if not self.armed or not args or args[0].numel() != 0:
            return None
        self.armed = False
        ids, position_ids, task_ids, visual, ids_checked = self.pending.pop()
        # The adapter module is called, not a method of it: engines gather its parameters
        # around its own call, as they do the embedding's.
        adapter = self.adapter_of()
        scale = _embed_scale(module)
        if scale is None:
            return adapter(
                ids,
                module.weight,
                position_ids=position_ids,
                task_ids=task_ids,
                visual=visual,
                _ids_checked=ids_checked,
            )
        return _scaled_lookup(
            adapter, module.weight, scale, ids, position_ids, task_ids, visual, ids_checked
        )

    def id_ranges(
        self,
        embedding: nn.Module,
        ids: Tensor,
        position_ids: Tensor | None,
        task_ids: Tensor | None,
    ) -> list[Range] | None:
        """The ranges the adapter's op would read for this call (`PromptAdapter.id_ranges`;
        a scaled lookup's too, `_scaled_lookup`), sized from the table's full shape (a
        sharded one is not gathered yet); None where the op reads them itself: arguments
        its checks refuse, ids on another device than the table, or a table whose full shape
        is not known outside its unit's call (FSDP1's flattened shard)."""
        weight = embedding.weight
        if weight.device != ids.device or is_fsdp1_flat(weight):
            return None
        vocab = embedding_shape(weight)[0]
        return self.adapter_of().id_ranges(ids, vocab, position_ids, task_ids)


def _embed_scale(module: nn.Module) -> Tensor | float | None:
    """The scalar by which `module` multiplies its lookup (transformers 5's Gemma, BART, ...
    keep it as `embed_scale`, cast to the table's dtype as their forward casts it); None
    for a plain lookup."""
    scale = getattr(module, "embed_scale", None)
    if isinstance(scale, Tensor):
        if scale.numel() != 1:
            raise TypeError(
                f"{type(module).__name__}.embed_scale has shape {tuple(scale.shape)}; the "
                "fused embedding supports a scalar scale only"
            )
        return scale.to(module.weight.dtype)
    return None if scale is None or scale == 1 else scale


def _scaled_lookup(
    adapter: nn.Module,
    weight: Tensor,
    scale: Tensor | float,
    ids: Tensor,
    position_ids: Tensor | None,
    task_ids: Tensor | None,
    visual: Tensor | None = None,
    ids_checked: bool = False,
) -> Tensor:
    """(B, m + s [+ n_v], d) `[P; scale * E[ids] + delta; V]`: the formula's rows built from
    what the embedding module gives (`scale * E[ids]`), the prompt and the visual rows
    unscaled, as PEFT's prompt tuning concatenates the prompt with the module's output. The
    op has no scale argument, so the scaled lookup (B, s, d) is its table, one row per token,
    read once: rounded once, as the reference. A delta whose rows are token ids
    (`index="token"`) cannot read them from that table's row numbers: it is added to the
    unscaled lookup and corrected, in fp32.

    The ids index the lookup here, before the op: they are checked first, with the op's
    other ranges (position and task ids) in the same read, and the op then reads nothing;
    `ids_checked`: the caller's read covered them already (the padding trim's)."""
    if not ids_checked and not tracing():
        vocab = weight.shape[0]
        ranges = (
            None if sync_free_enabled() else adapter.id_ranges(ids, vocab, position_ids, task_ids)
        )
        if ranges is None:  # the op checks the rest; sync-free: the ids come back clamped
            (ids,) = checked(Range("input_ids", ids, vocab))
        else:
            checked(*ranges)
            ids_checked = True
    tokens = nn.functional.embedding(ids, weight) * scale  # the module's own output
    extra = {"position_ids": position_ids, "task_ids": task_ids, "visual": visual}
    extra["_ids_checked"] = ids_checked
    if adapter.op_args().get("index") == "token":
        out = adapter(ids, weight, **extra)
        plain = nn.functional.embedding(ids, weight)
        start = out.shape[1] - ids.shape[1] - (0 if visual is None else visual.shape[1])
        rows = out[:, start : start + ids.shape[1]]
        rows.copy_(rows.float() + tokens.float() - plain.float())
        return out
    batch, s = ids.shape
    rows_of = torch.arange(batch * s, device=ids.device).view(batch, s)
    table = tokens.reshape(batch * s, -1)
    return adapter(rows_of, table, **extra)


_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


@functools.cache
def positional_names(cls: type) -> tuple[str, ...]:
    params = inspect.signature(cls.forward).parameters.values()
    return tuple(p.name for p in params if p.kind in _POSITIONAL)[1:]  # without self


def bind(module: nn.Module, args: tuple, kwargs: dict) -> dict:
    """The call's arguments as one keyword dict (HF heads pass input_ids positionally)."""
    names = positional_names(type(module))
    if len(args) > len(names):
        raise TypeError(f"{type(module).__name__}.forward got {len(args)} positional arguments")
    bound = dict(zip(names, args, strict=False))
    bound.update(kwargs)
    return bound


def extend_mask(mask: Tensor | None, m: int, name: str = "attention_mask") -> Tensor | None:
    """Prepend m ones (the prompt's columns) to a (B, s) padding mask."""
    if mask is None or m == 0:
        return mask
    check_padding_mask(mask, name)
    return torch.cat([mask.new_ones(mask.shape[0], m), mask], dim=1)


def check_padding_mask(mask: object, name: str = "attention_mask") -> None:
    if not isinstance(mask, Tensor) or mask.ndim != 2:
        shape = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"{name} must be a 2D (batch, seq) padding mask, got {shape}")


def cache_length(cache: object) -> int:
    """Tokens a KV cache holds (0 for none): a `Cache`'s own count, or a legacy tuple's."""
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    if isinstance(cache, (tuple, list)):
        return int(cache[0][0].shape[-2]) if cache else 0
    raise TypeError(f"unrecognised KV cache of type {type(cache).__name__}")


def row_ids(position_ids: Tensor | None, input_ids: Tensor) -> Tensor | None:
    """`position_ids` broadcast to the ids' (B, s) shape, as the op wants them."""
    if position_ids is None:
        return None
    batch, s = input_ids.shape
    if (
        position_ids.ndim != 2
        or position_ids.shape[0] not in (1, batch)
        or position_ids.shape[1] != s
    ):
        raise ValueError(
            f"position_ids must have shape ({batch}, {s}) or (1, {s}) like input_ids, got "
            f"{tuple(position_ids.shape)}"
        )
    return position_ids.expand(input_ids.shape[0], -1)


def needs_ids(kw: dict, where: str) -> Tensor:
    ids = kw.get("input_ids")
    if ids is None:
        raise ValueError(
            f"the patched {where} needs input_ids (the adapter builds the input embeddings from "
            f"them); inputs_embeds cannot carry the prompt"
        )
    # The op checks these too; here first, before the hooks index the ids' shape.
    check_ids("input_ids", ids, ndim=2)
    if ids.shape[0] == 0:
        raise ValueError(f"input_ids is an empty batch (B=0, shape {tuple(ids.shape)})")
    mask = kw.get("attention_mask")
    if isinstance(mask, Tensor) and mask.ndim == 2 and mask.shape != ids.shape:
        raise ValueError(
            f"attention_mask has shape {tuple(mask.shape)} but input_ids has shape "
            f"{tuple(ids.shape)}; a (batch, seq) padding mask must match the ids"
        )
    return ids


def find_inner(model: nn.Module, cls: type | tuple[type, ...]) -> nn.Module:
    """The first `cls` module inside `model` (the model itself included)."""
    inner = next((m for m in model.modules() if isinstance(m, cls)), None)
    if inner is None:
        names = " or ".join(c.__name__ for c in (cls if isinstance(cls, tuple) else (cls,)))
        raise TypeError(f"no {names} inside {type(model).__name__}")
    return inner


class PositionLimit:
    """Pre-hook of the module taking the ids (decoders, encoders, the generic path): refuses
    a forward whose prompt rows and tokens need more positions than a learned position table
    has (`config.<field>` rows, of which the first `reserved` precede position 0, as
    RoBERTa's do): HF would raise a bare IndexError."""

    # A class default: objects pickled before `reserved` existed read 0.
    reserved: int = 0

    def __init__(
        self, adapter_of: AdapterOf, name: str, field: str, inner: nn.Module, reserved: int = 0
    ) -> None:
        self.adapter_of = adapter_of
        self.name = name  # the architecture, as messages spell it
        self.field = field
        self.reserved = reserved
        self.limit = getattr(inner.config, field) - reserved
        # Encoders take no cache (DeBERTa-v2's forward names none).
        self.args = signature(type(inner), ("input_ids",), ("cache",))

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
            reserved = (
                f" (its first {self.reserved} rows precede position 0)" if self.reserved else ""
            )
            raise ValueError(
                f"the prompt's {m} rows and {ids.shape[1]} tokens{cached} need {needed} "
                f"positions, but {self.name}'s position table (config.{self.field}) has "
                f"{self.limit}{reserved}: the soft prompt pushes the sequence past it; keep "
                f"inputs to {self.limit - m} tokens or fewer"
            )


# --------------------------------------------------------------------------- padding trim


@dataclass(frozen=True)
class Cut:
    """The columns `[start, stop)` of a caller's (B, `length`) batch that a trimmed forward
    keeps; the others are padding in every row."""

    start: int
    stop: int
    length: int

    def take(self, t: Tensor, dim: int = 1) -> Tensor:
        """`t`'s kept columns along `dim` (a view)."""
        return t.narrow(dim, self.start, self.stop - self.start)

    def restore(self, t: Tensor, offset: int = 0, dim: int = 1) -> Tensor:
        """`t`, whose `dim` holds `offset` leading rows (the prompt's) then the kept columns,
        at the caller's length again: zeros stand in the cut columns."""
        shape = list(t.shape)
        parts = [t.narrow(dim, 0, offset)]
        shape[dim] = self.start
        parts.append(t.new_zeros(shape))
        parts.append(t.narrow(dim, offset, t.shape[dim] - offset))
        shape[dim] = self.length - self.stop
        parts.append(t.new_zeros(shape))
        return torch.cat(parts, dim)


def tracing() -> bool:
    """Whether the forward is being compiled, exported or traced: its shapes must not depend
    on the mask's values there (Dynamo would break the graph at the read)."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


def checked_cut(
    mask: object,
    ranges: list[Range] | None,
    *,
    leading: bool,
    ids: Tensor | None = None,
    pad_token_id: int | None = None,
    labels: Tensor | None = None,
) -> tuple[Cut | None, bool]:
    """`(cut, read)`. The cut: the columns of a (B, s) batch a forward needs, all but the
    runs of columns at the end (and at the start, with `leading`) that `mask` marks padding
    in every row; None when nothing is cut: no 2D mask, no such column, or every column such.

    Extra conditions keep outputs that read the cut columns unchanged:
    - `ids` (a head that pools the last token whose id is not `pad_token_id`, as HF's
      sequence-classification heads do): cut columns hold `pad_token_id` in every row, and
      nothing is cut at the start when a row is all padding (HF pools its column 0);
    - `labels` (causal LM, (B, s)): cut columns have label -100 in every row, and so has the
      first kept column after a leading cut (the last cut column's logits predict it).

    Reads the mask once (one device sync on a GPU), so it cuts nothing in sync-free mode.
    The bounds of `ranges` (the op's id ranges, `FusedEmbedding.id_ranges`) cross in that
    same read, so a trimmed forward reads the device once; an id out of range raises its
    IndexError here, before any kernel runs. `read` says whether `ranges` were read (the op
    then need not)."""
    if sync_free_enabled() or not isinstance(mask, Tensor) or mask.ndim != 2 or mask.shape[1] == 0:
        return None, False
    s = mask.shape[1]
    pad = ~mask.bool().any(0)
    lead_ok = pad
    if ids is not None:
        is_pad = ids == pad_token_id
        pad = pad & is_pad.all(0)
        lead_ok = pad & ~is_pad.all(1).any()
    if labels is not None:
        ignored = (labels == -100).all(0)
        pad = pad & ignored
        lead_ok = lead_ok & ignored & torch.cat([ignored[1:], ignored.new_ones(1)])
    runs = [pad.flip(0).long().cumprod(0).sum()]
    if leading:
        runs.append(lead_ok.long().cumprod(0).sum())
    # Ranges on another device than the mask's are left to the op (one transfer per device).
    if ranges is not None and any(r.ids.device != mask.device for r in ranges):
        ranges = None
    counts = torch.stack([*runs, *range_reads(ranges or [])]).tolist()
    if ranges is not None:
        raise_out_of_range(ranges, counts[len(runs) :])
    trail, lead = counts[0], (counts[1] if leading else 0)
    read = ranges is not None
    if trail == s or lead + trail == 0:
        return None, read
    return Cut(lead, s - trail, s), read


def call_keeps_shapes(kw: dict, config: object) -> bool:
    """Whether a forward called with `kw` can run on trimmed columns and give its caller
    outputs of the caller's shapes: not while tracing, not for attention maps (their every
    axis is per column) and not for tuple outputs (their fields cannot be told apart)."""
    if tracing():
        return False
    if kw.get("output_attentions") or getattr(config, "output_attentions", False):
        return False
    return_dict = kw.get("return_dict")
    if return_dict is None:
        return_dict = getattr(config, "return_dict", True)
    return return_dict is not False


def restore_outputs(output: object, cut: Cut | None, fields: tuple[str, ...]) -> None:
    """Give `output`'s per-column `fields` (tensors, or tuples of them, e.g. hidden states)
    the caller's length again, in place. Whatever rows precede the kept columns (the
    prompt's) stay first."""
    if cut is None or output is None:
        return
    kept = cut.stop - cut.start

    def one(t: Tensor) -> Tensor:
        return cut.restore(t, offset=t.shape[1] - kept)

    for name in fields:
        value = getattr(output, name, None)
        if isinstance(value, Tensor):
            setattr(output, name, one(value))
        elif isinstance(value, tuple) and value and all(isinstance(v, Tensor) for v in value):
            setattr(output, name, tuple(one(v) for v in value))
