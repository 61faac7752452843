"""What every method is: a frozen config dataclass, an adapter module and their registration.

The generic modules (`patch`, `checkpoint`, `multitask`) handle adapters through `Adapter`
only and find a method through `METHODS` / `method_config`, so a new method is its module:
a config subclassing `MethodConfig`, an adapter subclassing `Adapter` (or `PromptAdapter`
for an input-embedding method) and one `register_method(config_cls, adapter_cls)` call at
its end (docs/design.md §5).
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from .._engines import is_sharded

if TYPE_CHECKING:  # the models layer sits above this one; only its record type is named
    from ..models import ModelSpec


@dataclass(frozen=True)
class MethodConfig:
    """Base of the method configs: frozen (hashable, comparable) dataclasses whose fields
    are the method's hyperparameters, saved as JSON with the adapter."""

    # The name a saved adapter's `adapter_config.json` records ("dept", "aot", ...).
    method: ClassVar[str]


class Adapter(nn.Module, abc.ABC):
    """A method's trainable state and its computation, attached to a model by `patch`.

    A subclass says where on the model it acts (`site`, one of `models.SITES`), which
    parameter groups it trains and at which default learning rates (`groups`), how it is
    built for a model (`create`), how several serve as one multi-task adapter (`stack`) and
    what its inference form is (`merged`). The hooks installed for its site call it.
    """

    config: MethodConfig
    # "input_embedding" (the fused embedding op) or "layer_input" (a bias before every layer).
    site: ClassVar[str]
    # Parameter group name -> default learning rate, None where the method's paper gives
    # none (the caller must then pass `<name>_lr` to `param_groups`).
    groups: ClassVar[dict[str, float | None]]
    # Whether `patch(..., trim_padding=...)` applies: the columns the adapter reads must be
    # computable from the untrimmed ones.
    trims_padding: ClassVar[bool] = False

    @classmethod
    @abc.abstractmethod
    def create(
        cls, config: MethodConfig, spec: ModelSpec, generator: torch.Generator | None = None
    ) -> Adapter:
        """A freshly initialised adapter of `config` for the model `spec` describes."""

    @abc.abstractmethod
    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """The trainable parameters by group name (the keys of `groups`)."""

    @property
    @abc.abstractmethod
    def num_tasks(self) -> int | None:
        """T for an adapter serving T stacked tasks (`stack`); None for a single task."""

    @classmethod
    def stack(cls, adapters: Sequence[Adapter]) -> Adapter:
        """One adapter serving the tasks of `adapters` (of exactly this class) in order; a
        stacked source contributes all its tasks. Defined by the classes that are an
        inference form (`merged`): `stack_adapters` stacks merged adapters."""
        raise TypeError(
            f"{cls.__name__} adapters do not stack as they are: stack their merged form "
            "(dept_kernels.stack_adapters merges them first)"
        )

    @abc.abstractmethod
    def check_fits(self, spec: ModelSpec) -> None:
        """Raise ValueError when the adapter's shapes do not fit the model `spec`."""

    def merged(
        self,
        embedding: Tensor,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> Adapter:
        """The adapter's inference form (the same outputs, cheaper to serve), a new module;
        `self` where training and inference forms are one. `embedding` is the model's (V, e)
        input table; `dtype` and `device` place materialised tables."""
        return self

    def state_fields(self) -> dict[str, Any]:
        """JSON fields a saved adapter records besides its config: what its tensors' names
        and shapes depend on (`num_tasks`; for AoT whether it is fused and V)."""
        return {"num_tasks": self.num_tasks}

    @classmethod
    def read_fields(cls, fields: dict[str, Any]) -> dict[str, Any]:
        """Pop and check this method's `state_fields` from a saved config's `fields`;
        ValueError on a bad value. Missing fields read as their default (older files)."""
        num_tasks = fields.pop("num_tasks", None)
        if num_tasks is not None and not is_int(num_tasks, 1):
            raise ValueError(f"num_tasks must be null or an int >= 1, got {num_tasks!r}")
        return {"num_tasks": num_tasks}

    @classmethod
    def skeleton(cls, config: MethodConfig, spec: ModelSpec, fields: dict[str, Any]) -> Adapter:
        """An adapter whose state has the names and shapes a file saved with `fields`
        (`read_fields`) holds; its values are then loaded."""
        adapter = cls.create(config, spec)
        tasks = fields["num_tasks"]
        if tasks is None:
            return adapter
        served = adapter.merged(spec.embedding.weight)
        stacked = type(served).stack([served] * tasks)
        if stacked.config.method != config.method:
            raise ValueError(f"a stacked {config.method} adapter saves as {stacked.config.method}")
        return stacked

    def check_whole(self, embedding: Tensor) -> None:
        """Refuse to build a merged form from parameters an engine shards."""
        if is_sharded([*self.parameters(), embedding]):
            # The new module's tensors would be shards, or buffers an engine managing the
            # parameters (its optimizer, its shards) would not follow.
            raise ValueError(
                "merge needs the whole adapter and embedding, but an engine (FSDP, DeepSpeed "
                "ZeRO-3) shards them: save the adapter (dept_kernels.save_adapter, on every "
                "rank), load it onto an unwrapped model and merge there"
            )


# Config class -> adapter class, filled by `register_method` as each method module loads.
METHODS: dict[type[MethodConfig], type[Adapter]] = {}
# PEFT `peft_type` -> the adapter class that adopts such a model's prompt encoder
# (`adopt(peft_config, encoder, weight)`), for `patch(peft_model)` without a config.
PEFT_TYPES: dict[str, type[Adapter]] = {}


def register_method(
    config_cls: type[MethodConfig],
    adapter_cls: type[Adapter],
    *,
    peft_types: Sequence[str] = (),
) -> None:
    """Make a method known to `patch`, `checkpoint` and `multitask`; `peft_types` name the
    PEFT models whose prompt encoder the adapter class adopts (`adapter_cls.adopt`)."""
    if not (isinstance(config_cls, type) and issubclass(config_cls, MethodConfig)):
        raise TypeError(f"config_cls must subclass MethodConfig, got {config_cls!r}")
    if not (isinstance(adapter_cls, type) and issubclass(adapter_cls, Adapter)):
        raise TypeError(f"adapter_cls must subclass Adapter, got {adapter_cls!r}")
    taken = {c.method: c for c in METHODS}
    if config_cls.method in taken and taken[config_cls.method] is not config_cls:
        raise ValueError(
            f"method name {config_cls.method!r} is taken by {taken[config_cls.method].__name__}"
        )
    for peft_type in peft_types:
        if not callable(getattr(adapter_cls, "adopt", None)):
            raise TypeError(f"{adapter_cls.__name__} needs a classmethod adopt for {peft_type}")
        PEFT_TYPES[peft_type] = adapter_cls
    METHODS[config_cls] = adapter_cls


def method_config(name: str) -> type[MethodConfig]:
    """The config class of the method saved as `name`; ValueError naming the known ones."""
    by_name = {c.method: c for c in METHODS}
    if name not in by_name:
        raise ValueError(f"method must be one of {sorted(by_name)}, got {name!r}")
    return by_name[name]


def adapter_class(config: object) -> type[Adapter]:
    """The adapter class of a config instance; TypeError naming the known configs."""
    if type(config) not in METHODS:
        names = ", ".join(sorted(c.__name__ for c in METHODS))
        raise TypeError(f"config must be one of {names}, got {type(config).__name__}")
    return METHODS[type(config)]


def group_names() -> set[str]:
    """Every parameter group name a registered method trains."""
    return {name for cls in METHODS.values() for name in cls.groups}


def is_int(value: object, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def check_int(name: str, value: object, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def check_task_ids(num_tasks: int | None, task_ids: Tensor | None) -> None:
    """A stacked adapter (T = `num_tasks`) needs `task_ids`; a single-task one (None) takes
    none."""
    if num_tasks is None:
        if task_ids is not None:
            raise ValueError(
                "task_ids were given but the adapter serves one task; build a multi-task "
                "model with dept_kernels.stack_adapters"
            )
    elif task_ids is None:
        raise ValueError(f"the model serves {num_tasks} stacked tasks: pass task_ids (B,)")


def as_stacked(x: Tensor) -> Tensor:
    """A parameter with its leading task dim: (T, ...) as is, one task's (...) as (1, ...)."""
    return x if x.dim() == 3 else x.unsqueeze(0)


def check_same_kind(cls: type, adapters: Sequence[nn.Module]) -> None:
    """`cls.stack` takes adapters of exactly `cls`, at least one."""
    if not adapters:
        raise ValueError(f"{cls.__name__}.stack needs at least one adapter")
    for i, other in enumerate(adapters):
        if type(other) is not cls:
            raise TypeError(
                f"adapter {i} is a {type(other).__name__}; {cls.__name__}.stack stacks "
                f"{cls.__name__}s"
            )


def stack_tensors(tensors: Sequence[Tensor]) -> Tensor:
    """The per-task (T, ...) concatenation of single or stacked parameters, detached, in the
    first one's dtype and device."""
    ref = tensors[0]
    return torch.cat([as_stacked(t.detach()).to(ref.device, ref.dtype) for t in tensors])
