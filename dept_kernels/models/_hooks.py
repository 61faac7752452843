"""Helpers shared by the architecture modules: argument binding, mask and cache checks,
the adapter lookup and the routing of `task_ids`.

Hooks are methods of objects (not closures) that reach the adapter through `AdapterOf`: a
`copy.deepcopy` of a patched model copies the hook objects with the model (a closure would be
shared), so the copy's hooks serve the copy's adapter.
"""

from __future__ import annotations

import functools
import inspect

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

# Attribute of the patched model holding the task_ids (B,) of its running `generate`. A plain
# attribute, not a ContextVar: torch.compile traces attribute reads but not ContextVar.get.
_GENERATION_TASKS = "_dept_kernels_generation_tasks"


class AdapterOf:
    """`adapter_of()`: the adapter attached to `owner` under `name` now.

    Looked up on every call, so replacing the adapter (`fold`, `stack_adapters`) needs no new
    hooks; held as an object so that a deep copy of the model maps `owner` to the copy.
    """

    def __init__(self, owner: nn.Module, name: str) -> None:
        self.owner = owner
        self.name = name

    def __call__(self) -> nn.Module:
        return getattr(self.owner, self.name)


def generate_with_tasks(model: nn.Module, *args, task_ids: Tensor | None = None, **kwargs):
    """`model.generate(..., task_ids=None, ...)` for a patched model (bound to it by `patch`).

    HF's `generate` rejects arguments its forward does not name, so the task ids (B,) are
    held here for the hooks of the whole generation, which repeat them per beam or returned
    sequence as generate repeats the batch (`TaskIds.resolve`).
    """
    ids = args[0] if args else kwargs.get("input_ids", kwargs.get("inputs"))
    # Checked here, before generate repeats the batch per beam: later, task ids for fewer
    # samples would look like ids to repeat the same way.
    if (
        isinstance(task_ids, Tensor)
        and isinstance(ids, Tensor)
        and ids.ndim == 2
        and (task_ids.ndim != 1 or task_ids.shape[0] != ids.shape[0])
    ):
        raise ValueError(
            f"task_ids has {task_ids.shape[0] if task_ids.ndim else 0} entries (shape "
            f"{tuple(task_ids.shape)}) but input_ids has {ids.shape[0]} samples"
        )
    outer = model.__dict__.get(_GENERATION_TASKS)  # a generate nested in a generate
    model.__dict__[_GENERATION_TASKS] = task_ids
    try:
        return type(model).generate(model, *args, **kwargs)
    finally:
        if outer is None:
            model.__dict__.pop(_GENERATION_TASKS, None)
        else:
            model.__dict__[_GENERATION_TASKS] = outer


def _generation_tasks(model: nn.Module, batch_size: int) -> Tensor | None:
    """`model`'s running generate's task ids for a batch of `batch_size` rows (beams included)."""
    task_ids = getattr(model, _GENERATION_TASKS, None)
    if task_ids is None or task_ids.ndim != 1 or task_ids.shape[0] in (0, batch_size):
        return task_ids
    if batch_size % task_ids.shape[0]:
        raise ValueError(
            f"generate got task_ids for {task_ids.shape[0]} samples but runs {batch_size} rows"
        )
    # generate repeats each sample's row for its beams / sequences (repeat_interleave).
    return task_ids.repeat_interleave(batch_size // task_ids.shape[0])


class TaskIds:
    """Carries `task_ids` (B,) from the call that names them to the hook that uses them.

    `install(model)` pops them from the top-level model's call, so the HF forward never sees
    them, and holds them for that call; `resolve` picks, first found: the hooked module's own
    `task_ids`, the top-level call's, the running `generate`'s.
    """

    def __init__(self) -> None:
        self.outer: Tensor | None = None
        self.model: nn.Module | None = None  # the top-level model, whose generate may run

    def install(self, model: nn.Module) -> list[RemovableHandle]:
        """Hook `model`; register this before the hooks on `model` that call `resolve`."""
        self.model = model
        return [
            model.register_forward_pre_hook(self._pop, with_kwargs=True),
            model.register_forward_hook(self._clear, always_call=True),
        ]

    def _pop(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        self.outer = kwargs.pop("task_ids", None)
        return args, kwargs

    def _clear(self, module: nn.Module, args: tuple, output) -> None:
        self.outer = None

    def resolve(self, own: Tensor | None, batch_size: int) -> Tensor | None:
        """The task ids of a batch of `batch_size` rows; `own`: the hooked call's."""
        if own is not None:
            return own
        if self.outer is not None:
            return self.outer
        return _generation_tasks(self.model, batch_size)


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
    if not isinstance(mask, Tensor) or mask.ndim != 2:
        shape = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"{name} must be a 2D (batch, seq) padding mask, got {shape}")
    return torch.cat([mask.new_ones(mask.shape[0], m), mask], dim=1)


def cache_is_empty(cache: object) -> bool:
    """True on a first forward: no cache yet, or an empty one (generate's prefill)."""
    return cache is None or cache.get_seq_length() == 0


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
