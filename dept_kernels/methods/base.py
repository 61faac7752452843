"""What every input-embedding adapter shares: prompt initialisation, the op call and the
pieces of multi-task stacking."""

from __future__ import annotations

import abc
import copy
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

from .._engines import embedding_shape, full_shape, gathered_parameters, is_dtensor
from ..ops import dept_embedding
from ..ops._validate import FLOAT_DTYPES

PROMPT_INITS = ("random", "vocab", "text")


def check_prompt_init(prompt_init: str, init_text: tuple[int, ...] | None) -> None:
    """Validate the `prompt_init` / `init_text` pair of a config."""
    if prompt_init not in PROMPT_INITS:
        raise ValueError(f"prompt_init must be one of {PROMPT_INITS}, got {prompt_init!r}")
    if prompt_init == "text":
        if not init_text:
            raise ValueError(
                "prompt_init='text' needs init_text: a non-empty sequence of token ids"
            )
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in init_text):
            raise TypeError("init_text must hold int token ids (tokenize the text first)")
        negative = [i for i in init_text if i < 0]
        if negative:
            raise ValueError(f"init_text holds negative token ids {negative[:5]}")
    elif init_text is not None:
        raise ValueError(f"init_text is only used with prompt_init='text', got {prompt_init!r}")


def as_token_ids(init_text: object) -> tuple | None:
    """A config's `init_text` as a tuple (configs are frozen and hashable), or None."""
    if init_text is None:
        return None
    # A str is iterable too, but as characters: the text must be tokenized first.
    if isinstance(init_text, (str, bytes)) or not isinstance(init_text, Iterable):
        raise TypeError(
            f"init_text must be a sequence of int token ids (tokenize the text first), got "
            f"{type(init_text).__name__}"
        )
    return tuple(init_text)


def check_embedding(weight: Tensor) -> None:
    """The model's input embedding table, which `dept_embedding` reads: refused at patch
    time in a dtype the op does not take, rather than at the first forward."""
    if weight.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"the model's input embedding is {weight.dtype}; prompt adapters run on float32, "
            "float16 and bfloat16 models (convert the model first, e.g. model.float())"
        )


def check_int(name: str, value: object, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def init_prompt(
    rows: int,
    weight: Tensor,
    prompt_init: str,
    init_text: tuple[int, ...] | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Initial (rows, d) prompt in `weight`'s dtype and device.

    "random": uniform [-0.5, 0.5] (Lester et al.); "vocab": rows of `weight` at uniformly
    sampled ids; "text": rows of `weight` at `init_text`, repeated then trimmed to `rows`
    (the official DePT TEXT init). A table sharded by an engine (DeepSpeed ZeRO-3, FSDP2) is
    gathered for the rows, which every rank must then call for.
    """
    vocab, d = embedding_shape(weight)
    if prompt_init == "random":
        out = torch.empty(rows, d, dtype=torch.float32)
        return out.uniform_(-0.5, 0.5, generator=generator).to(weight.device, weight.dtype)
    if prompt_init == "vocab":
        ids = torch.randint(0, vocab, (rows,), generator=generator)
    else:
        bad = [i for i in init_text if not 0 <= i < vocab]
        if bad:
            raise ValueError(f"init_text ids {bad[:5]} are outside the vocabulary [0, {vocab})")
        reps = -(-rows // len(init_text))
        ids = torch.tensor((list(init_text) * reps)[:rows], dtype=torch.long)
    with gathered_parameters([weight]):
        # A DTensor's rows need its full table (a collective); ZeRO-3's are whole here.
        table = weight.detach().full_tensor() if is_dtensor(weight) else weight.detach()
        return table[ids.to(table.device)].clone()


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


def check_same_base(index: int, name: str, got: Tensor, want: Tensor) -> None:
    """Adapter `index`'s parameter `name` has adapter 0's per-task shape.

    Called once the configs agree, so a difference is a base model's: its width d, or its
    vocabulary V (token-mode rows).
    """
    got_shape, want_shape = tuple(as_stacked(got).shape[1:]), tuple(as_stacked(want).shape[1:])
    if got_shape != want_shape:
        raise ValueError(
            f"adapter {index}'s {name} has shape {got_shape} per task, adapter 0's {want_shape}: "
            "they were not trained on the same base model"
        )


class PromptAdapter(nn.Module, abc.ABC):
    """An adapter that rewrites the input embedding through `dept_kernels.ops.dept_embedding`.

    Subclasses give `op_args()`: the op's keyword arguments (prompt, lora_a, lora_b, scaling,
    index), and `param_groups()`: (soft prompt parameters, reparameterisation parameters).
    A stacked adapter (`stack`) holds its parameters with a leading task dim T, the prompt
    as (T, m, d), and its `embed` takes `task_ids` (B,).
    """

    num_virtual_tokens: int
    prompt: nn.Parameter
    # Whether `position_ids` choose the low-rank rows (DePT in position mode).
    uses_position_rows: bool = False

    @abc.abstractmethod
    def op_args(self) -> dict:
        """Keyword arguments of `dept_embedding` besides ids, table and position_ids."""

    @abc.abstractmethod
    def param_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(soft prompt parameters, low-rank / reparameterisation parameters)."""

    def active_prompt(self) -> Tensor:
        """The prompt rows the op reads, (m, d) or (T, m, d): the first m. A PEFT seq2seq
        prompt encoder holds m rows per transformer submodule (`num_transformer_submodules=2`,
        PEFT's default), and PEFT's prompt tuning feeds only the first m, to the encoder."""
        prompt = self.prompt
        m = self.num_virtual_tokens
        return prompt if prompt.shape[-2] == m else prompt[..., :m, :]

    @property
    def num_tasks(self) -> int | None:
        """T for a stacked adapter (prompt (T, m, d)); None for a single-task adapter."""
        shape = full_shape(self.prompt)  # an engine's shard has its own shape
        return shape[0] if len(shape) == 3 else None

    def forward(
        self,
        input_ids: Tensor,
        weight: Tensor,
        position_ids: Tensor | None = None,
        task_ids: Tensor | None = None,
    ) -> Tensor:
        """(B, s) ids and the (V, d) table -> (B, m + s, d) input embeddings.

        `task_ids` (B,) in [0, T) pick each sample's task of a stacked adapter; they are
        required there and refused otherwise. The hooks call the adapter as a module (not a
        method of it) so that engines gathering parameters around a module's call (DeepSpeed
        ZeRO-3) gather the adapter's.
        """
        check_task_ids(self.num_tasks, task_ids)
        # The model may have changed dtype since patching (model.double()): say so in its
        # terms rather than in the op's.
        check_embedding(weight)
        if not self.uses_position_rows:
            position_ids = None
        return dept_embedding(
            input_ids, weight, position_ids=position_ids, task_ids=task_ids, **self.op_args()
        )

    @torch.no_grad()
    def with_parameters(self, config: object | None = None, **params: Tensor) -> PromptAdapter:
        """A new adapter like this one holding `params` (e.g. stacked per task), and `config`
        when given, in place of its own."""
        # A copy keeps every attribute the subclass's constructor derived from its config;
        # the parameters it duplicates are small and are replaced right away.
        new = copy.deepcopy(self)
        if config is not None:
            new.config = config
        for name, value in params.items():
            setattr(new, name, nn.Parameter(value))
        return new


def stack_tensors(tensors: Sequence[Tensor]) -> Tensor:
    """The per-task (T, ...) concatenation of single or stacked parameters, detached, in the
    first one's dtype and device."""
    ref = tensors[0]
    return torch.cat([as_stacked(t.detach()).to(ref.device, ref.dtype) for t in tensors])
