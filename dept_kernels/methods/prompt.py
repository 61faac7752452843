"""What the input-embedding (prompt) methods share: prompt initialisation, the fused op call,
the model fit check and the pieces of multi-task stacking."""

from __future__ import annotations

import abc
import copy
import dataclasses
import os
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from .._engines import embedding_shape, full_shape, gathered_parameters, is_dtensor
from ..ops._dept_embedding_op import value_ranges
from ..ops._validate import FLOAT_DTYPES, ID_DTYPES, Range
from ..ops.dept_embedding import OP_DEFAULTS, embed
from .base import Adapter, MethodConfig, as_stacked, check_int, check_task_ids

if TYPE_CHECKING:
    from ..models import ModelSpec

PROMPT_INITS = ("random", "vocab", "text")
# "adapter": from a source-task adapter (`init_from`), for the configs with that field.
TRANSFER_INIT = "adapter"


def check_prompt_fields(config: MethodConfig, minimum_tokens: int) -> None:
    """Validate a prompt config's `num_virtual_tokens` (>= `minimum_tokens`), its
    `prompt_init` / `init_text` pair and, where the config has it, `init_from`, storing
    `init_text` as a tuple and `init_from` as a str (configs are frozen and hashable)."""
    check_int("num_virtual_tokens", config.num_virtual_tokens, minimum_tokens)
    object.__setattr__(config, "init_text", as_token_ids(config.init_text))
    prompt_init, init_text = config.prompt_init, config.init_text
    inits = PROMPT_INITS
    if hasattr(config, "init_from"):
        inits = (*PROMPT_INITS, TRANSFER_INIT)
        init_from = config.init_from
        if init_from is not None and not isinstance(init_from, (str, os.PathLike)):
            raise TypeError(f"init_from must be a path, got {type(init_from).__name__}")
        if (prompt_init == TRANSFER_INIT) != (init_from is not None):
            raise ValueError(
                "prompt_init='adapter' and init_from (a saved adapter directory or an official "
                "DePT checkpoint) go together"
            )
        object.__setattr__(config, "init_from", None if init_from is None else str(init_from))
    if prompt_init not in inits:
        raise ValueError(f"prompt_init must be one of {inits}, got {prompt_init!r}")
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
    """A config's `init_text` as a tuple, or None."""
    if init_text is None:
        return None
    # A str is iterable too, but as characters: the text must be tokenized first.
    if isinstance(init_text, (str, bytes)) or not isinstance(init_text, Iterable):
        raise TypeError(
            f"init_text must be a sequence of int token ids (tokenize the text first), got "
            f"{type(init_text).__name__}"
        )
    return tuple(init_text)


def check_source(name: str, value: object, config: MethodConfig, source: object) -> None:
    """The source adapter's `name` (m, r, max_length) equals the config's: transfer copies
    its tensors, whose shapes they fix."""
    want = getattr(config, name)
    if value != want:
        raise ValueError(
            f"init_from: the source adapter {source.path} has {name}={value}, the config "
            f"{want}: a transferred adapter keeps the source's {name}"
        )


def check_embedding(weight: Tensor) -> None:
    """The model's input embedding table, which `dept_embedding` reads: refused at patch
    time in a dtype the op does not take, rather than at the first forward."""
    if weight.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"the model's input embedding is {weight.dtype}; prompt adapters run on float32, "
            "float16 and bfloat16 models (convert the model first, e.g. model.float())"
        )


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


def peft_parameter(encoder: nn.Module, name: str) -> nn.Parameter:
    """A PEFT prompt encoder's attribute as its Parameter (nn.Embedding and nn.Linear hold
    theirs in `.weight`), which the adopting adapter shares, not copies."""
    value = getattr(encoder, name, None)
    value = getattr(value, "weight", value)
    if not isinstance(value, nn.Parameter):
        raise TypeError(
            f"prompt encoder attribute {name!r} is not a Parameter or a module with one"
        )
    return value


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


class PromptAdapter(Adapter):
    """An adapter that rewrites the input embedding through `dept_kernels.ops.dept_embedding`.

    Subclasses are built from `(config, weight, generator)`, `weight` being the model's
    (V, d) input table, and give `op_args()`: the op's keyword arguments (prompt, lora_a,
    lora_b, scaling, index). A stacked adapter (`stack`) holds its parameters with a leading
    task dim T, the prompt as (T, m, d), and takes `task_ids` (B,).
    """

    site: ClassVar[str] = "input_embedding"
    trims_padding: ClassVar[bool] = True
    num_virtual_tokens: int
    prompt: nn.Parameter
    # Whether `position_ids` choose the low-rank rows (DePT in position mode).
    uses_position_rows: bool = False

    @classmethod
    def create(
        cls, config: MethodConfig, spec: ModelSpec, generator: torch.Generator | None = None
    ) -> PromptAdapter:
        return cls(config, spec.embedding.weight, generator=generator)

    @classmethod
    def skeleton(cls, config: MethodConfig, spec: ModelSpec, fields: dict[str, Any]) -> Adapter:
        if getattr(config, "prompt_init", None) != TRANSFER_INIT:
            return super().skeleton(config, spec, fields)
        # The file's values replace the initial ones: the source adapter is not read (it may
        # be gone by now); the config keeps where the adapter started from.
        shapes = dataclasses.replace(config, prompt_init="random", init_from=None)
        adapter = super().skeleton(shapes, spec, fields)
        adapter.config = config
        return adapter

    @abc.abstractmethod
    def op_args(self) -> dict:
        """Keyword arguments of `dept_embedding` besides ids, table and position_ids."""

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

    def check_fits(self, spec: ModelSpec) -> None:
        d = embedding_shape(spec.embedding.weight)[1]
        width = full_shape(self.prompt)[-1]  # an engine's shard has its own shape
        if width != d:
            raise ValueError(
                f"the {type(self).__name__}'s prompt has width {width}; the model's embeddings "
                f"have d={d}"
            )

    def forward(
        self,
        input_ids: Tensor,
        weight: Tensor,
        position_ids: Tensor | None = None,
        task_ids: Tensor | None = None,
        visual: Tensor | None = None,
        *,
        _ids_checked: bool = False,
    ) -> Tensor:
        """(B, s) ids and the (V, d) table -> (B, m + s, d) input embeddings, or
        (B, m + s + n_v, d) with the visual rows `visual` (B, n_v, d) after the tokens.

        `task_ids` (B,) in [0, T) pick each sample's task of a stacked adapter; they are
        required there and refused otherwise. `visual` in another floating dtype than the
        table's (an fp32 projection feeding a bf16 model) is cast to the table's dtype, as
        concatenating it with the model's `inputs_embeds` would need: differentiably, so its
        gradient reaches the projection in the projection's dtype. The hooks call the adapter
        as a module (not a method of it) so that engines gathering parameters around a
        module's call (DeepSpeed ZeRO-3) gather the adapter's. `_ids_checked` is the
        library's own: its hooks read the ranges of `id_ranges` already.
        """
        check_task_ids(self.num_tasks, task_ids)
        # The model may have changed dtype since patching (model.double()): say so in its
        # terms rather than in the op's.
        check_embedding(weight)
        if not self.uses_position_rows:
            position_ids = None
        if isinstance(visual, Tensor) and visual.is_floating_point():
            visual = visual.to(weight.dtype)
        args = dict(OP_DEFAULTS, input_ids=input_ids, weight=weight, position_ids=position_ids)
        args.update(task_ids=task_ids, visual=visual, **self.op_args())
        return embed(args, ids_checked=_ids_checked)

    def lowrank_layout(self) -> tuple[int | None, str]:
        """`(L, index)`: the rows of the op's lora_a (None without low-rank factors) and how
        tokens pick them, from the parameters' full shapes (an engine's shard has its own)."""
        return None, "position"

    def id_ranges(
        self,
        input_ids: Tensor,
        vocab: int,
        position_ids: Tensor | None = None,
        task_ids: Tensor | None = None,
    ) -> list[Range] | None:
        """The id ranges the op checks when `forward` gets these arguments and a (`vocab`, d)
        table, for a caller that reads them in a transfer it makes anyway (the padding
        trim's) and passes `_ids_checked`; None where `forward` or the op refuses an argument
        before reading (they then raise as usual)."""
        tasks = self.num_tasks
        if (task_ids is None) != (tasks is None) or not _index_tensor(input_ids, 2):
            return None
        if not self.uses_position_rows:
            position_ids = None
        if position_ids is not None and not (
            _index_tensor(position_ids, 2) and position_ids.shape == input_ids.shape
        ):
            return None
        if task_ids is not None and not (
            _index_tensor(task_ids, 1) and task_ids.shape[0] == input_ids.shape[0]
        ):
            return None
        rows, index = self.lowrank_layout()
        if (
            rows is not None
            and index == "position"
            and position_ids is None
            and (input_ids.shape[1] > rows)
        ):
            return None  # the op's error: s > L
        return value_ranges(input_ids, vocab, rows, position_ids, task_ids, tasks or 0, index)

    @torch.no_grad()
    def with_parameters(
        self, config: MethodConfig | None = None, **params: Tensor
    ) -> PromptAdapter:
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


def _index_tensor(x: object, ndim: int) -> bool:
    return isinstance(x, Tensor) and x.dtype in ID_DTYPES and x.dim() == ndim
