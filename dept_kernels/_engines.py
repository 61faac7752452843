"""What the library needs from engines that shard parameters: FSDP2 (`fully_shard`), FSDP1
(`FullyShardedDataParallel`) and DeepSpeed ZeRO-3.

Such an engine holds a shard of each parameter between module calls and gathers the whole
tensor around the call of the module that owns it. So the library reads a possibly sharded
parameter's shape from the engine (`full_shape`: DeepSpeed's `ds_shape`; a DTensor's shape is
already the global one), gathers its values only through the engine (`full_tensors`,
`gathered_parameters`), and runs its ops inside the calls of the modules that own the
parameters (see `models._hooks.FusedEmbedding`). Nothing here imports an engine that the
model does not use.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import Tensor, nn


def is_deepspeed(t: Tensor) -> bool:
    """Whether `t` is a DeepSpeed ZeRO-3 parameter (partitioned between module calls)."""
    return hasattr(t, "ds_id")


def is_dtensor(t: Tensor) -> bool:
    """Whether `t` is a DTensor (an FSDP2 shard, or another tensor-parallel layout)."""
    if not torch.distributed.is_available():
        return False
    # Imported here: `torch.distributed.tensor` is a submodule `import torch` does not load.
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def is_fsdp1_flat(t: Tensor) -> bool:
    """Whether `t` is a parameter that FSDP1 has flattened into a unit's FlatParameter (its
    own value is then a view of this rank's shard between calls of the unit)."""
    return bool(getattr(t, "_fsdp_flattened", False))


def full_shape(t: Tensor) -> torch.Size:
    """`t`'s shape as the model defines it, whether or not an engine has sharded it."""
    ds_shape = getattr(t, "ds_shape", None)
    if ds_shape is not None:
        return torch.Size(ds_shape)
    return t.shape


def embedding_shape(weight: Tensor) -> tuple[int, int]:
    """(V, d) of an input-embedding table, or a ValueError where its full shape cannot be
    known (FSDP1 has flattened it: patch before wrapping)."""
    shape = full_shape(weight)
    if is_fsdp1_flat(weight):
        raise ValueError(
            f"the model's input embedding weight is an FSDP1 shard (shape {tuple(shape)}): "
            "patch the model before wrapping it in FullyShardedDataParallel"
        )
    if len(shape) != 2:
        raise ValueError(f"the model's input embedding weight has shape {tuple(shape)}, not (V, d)")
    return int(shape[0]), int(shape[1])


def is_sharded(tensors: Iterable[Tensor]) -> bool:
    """Whether any of `tensors` is held sharded by an engine."""
    return any(is_deepspeed(t) or is_dtensor(t) or is_fsdp1_flat(t) for t in tensors)


@contextlib.contextmanager
def gathered_parameters(params: Sequence[Tensor]) -> Iterator[None]:
    """Within the block, DeepSpeed ZeRO-3 `params` hold their full values (read only; every
    rank must enter). Other tensors are left as they are."""
    partitioned = [p for p in params if is_deepspeed(p)]
    if not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
        yield


def full_tensors(tensors: Sequence[Tensor]) -> list[Tensor]:
    """The full value of each of `tensors`, detached (a collective where one is sharded:
    every rank must call). DTensors are gathered (`full_tensor`), DeepSpeed parameters
    through `GatheredParameters`; FSDP1's are whole only within its wrapper's
    `summon_full_params`, where the caller reads them."""
    out: list[Tensor | None] = [None] * len(tensors)
    with gathered_parameters(tensors):
        for i, t in enumerate(tensors):
            if is_dtensor(t):
                out[i] = t.detach().full_tensor()
            else:
                # Copies of gathered values: the engine frees their memory once they are
                # sharded again (FSDP1 on leaving `summon_full_params`).
                gathered = is_deepspeed(t) or is_fsdp1_flat(t)
                out[i] = t.detach().clone() if gathered else t.detach()
    return out


def fsdp1_wrapper(module: nn.Module) -> nn.Module | None:
    """`module` if it is an FSDP1 `FullyShardedDataParallel` wrapper, else None."""
    if not torch.distributed.is_available():
        return None
    from torch.distributed.fsdp import FullyShardedDataParallel

    return module if isinstance(module, FullyShardedDataParallel) else None


def check_embedding_unit(model: nn.Module) -> None:
    """Refuse FSDP1 layouts in which `model`'s input embedding is a unit of its own while its
    weight is tied to a module outside that unit (GPT-2's and T5's LM heads, T5's encoder
    and decoder tables): FSDP1 gathers a parameter only for the unit that owns it, so one
    of them would read a flat shard. The unpatched model fails there too, in torch's ops;
    this names the cause and the fix instead."""
    get = getattr(model, "get_input_embeddings", None)
    embedding = get() if callable(get) else None
    if embedding is None or fsdp1_wrapper(embedding) is None:
        return
    weight = getattr(embedding, "weight", None)
    inside = {id(m) for m in embedding.modules()}
    tied = [
        name
        for name, module in model.named_modules()
        if id(module) not in inside
        and fsdp1_wrapper(module) is None  # a wrapper reads through to its inner module
        and weight is not None
        and any(p is weight for p in module._parameters.values())
    ]
    if tied:
        raise ValueError(
            f"FSDP1 wraps the input embedding ({type(embedding.module).__name__}) as a unit of "
            f"its own, but its weight is tied to {', '.join(tied)}, outside that unit: FSDP1 "
            "gathers a parameter only around the unit that owns it, so the other modules "
            "would read a flat shard (the unpatched model fails there too). Keep the "
            "embedding in the root unit: wrap only the transformer blocks (e.g. "
            "ModuleWrapPolicy({BlockClass})), or use FSDP2: fully_shard([embedding, lm_head])"
        )
