"""The state patch hooks keep between calls, and torch's checkpoint wrapper around AoT layers."""

from __future__ import annotations

import functools

from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointImpl,
    apply_activation_checkpointing,
    checkpoint_wrapper,
)

from dept_kernels.models import describe
from dept_kernels.models._aot import _AoTHooks


def hook_objects(model: nn.Module) -> list[object]:
    """The objects behind the forward hooks a patch registered (bound methods, partials)."""
    found = {}
    for module in model.modules():
        for hook in (*module._forward_pre_hooks.values(), *module._forward_hooks.values()):
            func = hook.func if isinstance(hook, functools.partial) else hook
            owner = getattr(func, "__self__", None)
            if owner is not None and type(owner).__module__.startswith("dept_kernels"):
                found[id(owner)] = owner
    return list(found.values())


def assert_hook_state_empty(model: nn.Module) -> None:
    """No hook holds a finished call's tensors: task ids, AoT ids, checkpointing records."""
    owners = hook_objects(model)
    assert owners, "no patch hooks found"
    for owner in owners:
        tasks = getattr(owner, "tasks", owner)
        assert getattr(tasks, "outer", None) is None, type(owner).__name__
        if isinstance(owner, _AoTHooks):
            assert owner.ids is None and owner.embedding is None and owner.task_ids is None
            assert len(owner.records) == 0, f"{len(owner.records)} checkpointing records left"
        assert not getattr(owner, "prepended", None), "a trimmed prompt length was left"


def wrap_layers(model: nn.Module, reentrant: bool) -> None:
    """torch's `checkpoint_wrapper` around each AoT layer: the layer's `__call__`, hooks
    included, runs again in backward, as transformers < 5 checkpoints layers."""
    layers = set(describe(model, "layer_input").layers)
    impl = CheckpointImpl.REENTRANT if reentrant else CheckpointImpl.NO_REENTRANT
    apply_activation_checkpointing(
        model,
        checkpoint_wrapper_fn=functools.partial(checkpoint_wrapper, checkpoint_impl=impl),
        check_fn=lambda module: module in layers,
    )
    # A recomputed layer would append to the KV cache a second time; HF's own checkpointing
    # turns the cache off for the same reason.
    model.config.use_cache = False
    if reentrant:
        model.enable_input_require_grads()  # as HF's own reentrant checkpointing needs
