"""Helpers shared by the architecture modules: argument binding, mask and cache checks."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..methods import PromptAdapter

AdapterGetter = Callable[[], PromptAdapter]

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
    if position_ids.ndim != 2 or position_ids.shape[1] != input_ids.shape[1]:
        raise ValueError(
            f"position_ids must have shape (batch, {input_ids.shape[1]}) like input_ids, got "
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
    return ids


def find_inner(model: nn.Module, cls: type | tuple[type, ...]) -> nn.Module:
    """The first `cls` module inside `model` (the model itself included)."""
    inner = next((m for m in model.modules() if isinstance(m, cls)), None)
    if inner is None:
        names = " or ".join(c.__name__ for c in (cls if isinstance(cls, tuple) else (cls,)))
        raise TypeError(f"no {names} inside {type(model).__name__}")
    return inner
