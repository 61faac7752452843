"""`stack_adapters`: one model serving T tasks, picked per sample by `task_ids` (B,).

The generic part lives here: resolving models and adapter directories, checking that the
adapters share one base model, putting each in its inference form (`Adapter.merged`) and
attaching the stack. What stacking means is the merged adapter class's (`Adapter.stack`):
prompt tuning and DePT stack their prompts (T, m, d) and low-rank pairs (T, L, r) /
(T, r, d), which `dept_embedding` picks per sample; EPT merges into prompt tuning and stacks
as it does; AoT stacks its fused (T, V, d) tables.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import nn

from .checkpoint import read_adapter, read_config
from .patch import ADAPTER, accelerated, adapter, attach_adapter, is_patched, replace_adapter


def stack_adapters(
    sources: Sequence[nn.Module | str | os.PathLike], model: nn.Module | None = None
) -> nn.Module:
    """Build one model serving the tasks of `sources`, task t being `sources[t]`.

    Args:
        sources: patched models, or directories written by `save_adapter`, all with adapters
            of one method trained on the same base model. Each is stacked in its inference
            form (`merge`: EPT as prompt tuning, AoT fused), the sources left as they are. A
            stacked source contributes all its tasks.
        model: the model to serve from: unpatched (it gets patched), or patched with the
            method of the sources (its adapter is replaced). By default the first model
            among `sources`, whose adapter is replaced in place.

    Returns:
        The serving model; its forward and generate take `task_ids` (B,) in [0, T).
    """
    if isinstance(sources, (str, os.PathLike)):
        # A lone path would otherwise be read character by character as directories.
        raise TypeError(
            f"sources must be a sequence of models or adapter directories, got the single path "
            f"{str(sources)!r}: pass [{str(sources)!r}]"
        )
    if not sources:
        raise ValueError("stack_adapters needs at least one model or adapter directory")
    for i, source in enumerate(sources):
        if not isinstance(source, (nn.Module, str, os.PathLike)):
            raise TypeError(
                f"source {i} is a {type(source).__name__}; sources are patched models or "
                "adapter directories"
            )
    if model is None:
        model = next((s for s in sources if isinstance(s, nn.Module)), None)
        if model is None:
            raise ValueError(
                "all sources are adapter directories: pass model=, the base model they were "
                "trained on"
            )
    for source in sources:
        if isinstance(source, nn.Module):
            adapter(source)  # patched, or a clear error
            _check_not_accelerated(source)
        else:
            read_config(source)  # a readable config, or a clear error, before any tensor
    if is_patched(model):
        _check_not_accelerated(model)
    adapters = []
    for i, source in enumerate(sources):
        if isinstance(source, nn.Module):
            if source is not model:
                _check_same_base(source, model, i)
            adapters.append(adapter(source))
        else:
            adapters.append(read_adapter(model, source))
    kinds = {type(a) for a in adapters}
    if len(kinds) > 1:
        names = sorted(k.__name__ for k in kinds)
        raise ValueError(f"stack_adapters needs adapters of one method, got {names}")
    embedding = model.get_input_embeddings().weight
    served = [a.merged(embedding) for a in adapters]
    stacked = type(served[0]).stack(served)
    if not is_patched(model):
        return attach_adapter(model, stacked)
    # The model's hooks serve any adapter of their site (stacked EPT is prompt tuning).
    current = adapter(model)
    if current.site != stacked.site:
        raise ValueError(
            f"model is patched with a {type(current).__name__}; the stacked adapter is a "
            f"{type(stacked).__name__}"
        )
    return replace_adapter(model, stacked)


def _check_not_accelerated(model: nn.Module) -> None:
    if accelerated(model):
        raise TypeError(
            f"{type(model).__name__} is a PEFT model accelerated by patch(model), whose forward "
            "takes no task_ids: save its adapter (dept_kernels.save_adapter) and stack the "
            "directory onto the base model"
        )


@torch.no_grad()
def _check_same_base(source: nn.Module, model: nn.Module, index: int) -> None:
    """The base weights of `source` equal those of `model` (adapters excluded)."""

    def base(m: nn.Module) -> dict[str, torch.Tensor]:
        return {n: p for n, p in m.state_dict().items() if n.split(".")[0] != ADAPTER}

    got, want = base(source), base(model)
    if type(source) is not type(model) or got.keys() != want.keys():
        raise ValueError(
            f"source {index} is a {type(source).__name__} with different weights than the "
            f"{type(model).__name__} to serve from: adapters must share the base model"
        )
    for name, tensor in want.items():
        other = got[name]
        if other.shape != tensor.shape or not torch.equal(other.to(tensor.device), tensor):
            raise ValueError(
                f"source {index}'s base weight {name!r} differs from the model's: adapters "
                "must share the base model"
            )
