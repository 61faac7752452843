"""DePT: a short soft prompt plus a low-rank update of the input token embeddings.

    out[b, :m]    = P_s                                         P_s (m, d)
    out[b, m + t] = E[ids[b, t]] + lora_alpha / sqrt(r) * (A[row(b, t)] @ B)   A (L, r), B (r, d)

`row` is the position (the paper and the official code), `position_ids` when given (left
padding), or the token id with `index="token"` (then A is (V, r)).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from .._engines import embedding_shape, full_shape
from ..ops.dept_embedding import INDEX_MODES
from .base import MethodConfig, check_int, check_same_kind, register_method, stack_tensors
from .prompt import (
    TRANSFER_INIT,
    PromptAdapter,
    check_embedding,
    check_prompt_fields,
    check_same_base,
    check_source,
    init_prompt,
    peft_parameter,
)
from .transfer import read_source


@dataclass(frozen=True)
class DePTConfig(MethodConfig):
    """DePT with an (m, d) prompt, rank r and max_length L (rows of A in position mode)."""

    num_virtual_tokens: int
    r: int
    lora_alpha: float = 8
    max_length: int = 256
    index: str = "position"
    prompt_init: str = "random"
    init_text: tuple[int, ...] | None = None
    # prompt_init="adapter": the source-task adapter (a save_adapter directory of DePT or
    # prompt tuning, or an official DePT checkpoint) whose prompt and low-rank pair start
    # training, the paper's few-shot transfer.
    init_from: str | None = None

    method: ClassVar[str] = "dept"

    def __post_init__(self) -> None:
        # m = 0 is the low-rank update alone, which the equal-budget rule reaches at its
        # largest rank; r = 0 is prompt tuning.
        check_prompt_fields(self, minimum_tokens=0)
        check_int("r", self.r, 0)
        check_int("max_length", self.max_length, 1)
        if not isinstance(self.lora_alpha, (int, float)) or isinstance(self.lora_alpha, bool):
            raise TypeError(f"lora_alpha must be a number, got {type(self.lora_alpha).__name__}")
        if not math.isfinite(self.lora_alpha):
            # A NaN or inf scaling would reach every token embedding without an error.
            raise ValueError(f"lora_alpha must be finite, got {self.lora_alpha}")
        if self.index not in INDEX_MODES:
            raise ValueError(f"index must be one of {INDEX_MODES}, got {self.index!r}")

    @property
    def scaling(self) -> float:
        """lora_alpha / sqrt(r), the official code's choice; 0 when r = 0."""
        return self.lora_alpha / math.sqrt(self.r) if self.r else 0.0


def equal_budget(
    prompt_length: int,
    d: int,
    max_length: int,
    *,
    num_virtual_tokens: int | None = None,
    r: int | None = None,
) -> tuple[int, int]:
    """The DePT pair (m, r) with the parameter count of a length-`prompt_length` prompt.

    Solves `l*d = m*d + (L + d)*r` given exactly one of `num_virtual_tokens` (m) or `r`;
    the other is rounded down, so DePT never exceeds the prompt-tuning budget.
    T5-base (d=768), l=100, L=256: m=40 -> r=45; r=45 -> m=40.
    """
    check_int("prompt_length", prompt_length, 1)
    check_int("d", d, 1)
    check_int("max_length", max_length, 1)
    if (num_virtual_tokens is None) == (r is None):
        raise ValueError("give exactly one of num_virtual_tokens or r")
    budget = prompt_length * d
    if r is None:
        check_int("num_virtual_tokens", num_virtual_tokens, 0)
        if num_virtual_tokens > prompt_length:
            raise ValueError(
                f"num_virtual_tokens={num_virtual_tokens} exceeds prompt_length={prompt_length}"
            )
        return num_virtual_tokens, (budget - num_virtual_tokens * d) // (max_length + d)
    check_int("r", r, 0)
    rest = budget - (max_length + d) * r
    if rest < 0:
        raise ValueError(
            f"r={r} alone needs {(max_length + d) * r} parameters, over the budget {budget}"
        )
    return rest // d, r


class DePTAdapter(PromptAdapter):
    """Parameters `prompt` (m, d), `lora_a` (L, r) or (V, r) in token mode, `lora_b` (r, d);
    with a leading task dim T when stacked (`stack`).

    Init (official code): A Kaiming-uniform with a = sqrt(5), B zeros, so the delta starts at 0.
    """

    # The paper's two learning rates: alpha_1 for the prompt, alpha_2 for the pair.
    groups: ClassVar[dict[str, float | None]] = {"prompt": 3e-1, "lowrank": 1e-4}

    def __init__(
        self, config: DePTConfig, weight: Tensor, generator: torch.Generator | None = None
    ) -> None:
        super().__init__()
        check_embedding(weight)
        self.config = config
        self.num_virtual_tokens = config.num_virtual_tokens
        self.uses_position_rows = config.index == "position"
        vocab, d = embedding_shape(weight)  # an engine's shard has its own shape
        rows = config.max_length if config.index == "position" else vocab
        source = None
        if config.prompt_init == TRANSFER_INIT:
            source = read_source(config.init_from, d, DePTConfig)
            check_source("num_virtual_tokens", source.num_virtual_tokens, config, source)
            if config.index != "position":
                raise ValueError("prompt_init='adapter' initialises position-mode DePT only")
            if source.lora_a is not None:
                check_source("r", source.r, config, source)
                check_source("max_length", source.max_length, config, source)
            prompt = source.prompt
        else:
            prompt = init_prompt(
                config.num_virtual_tokens, weight, config.prompt_init, config.init_text, generator
            )
        self.prompt = nn.Parameter(prompt.to(weight.device, weight.dtype))
        lora_a = torch.empty(rows, config.r, dtype=torch.float32)
        if config.r:
            nn.init.kaiming_uniform_(lora_a, a=math.sqrt(5), generator=generator)
        lora_b = torch.zeros(config.r, d, dtype=torch.float32)
        # A source without the pair (prompt tuning; an official file saved without it) leaves
        # the official init, B = 0: the transfer is the prompt's.
        if source is not None and source.lora_a is not None:
            lora_a = source.lora_a
            lora_b = source.lora_b if source.lora_b is not None else lora_b
        self.lora_a = nn.Parameter(lora_a.to(weight.device, weight.dtype))
        self.lora_b = nn.Parameter(lora_b.to(weight.device, weight.dtype))

    def op_args(self) -> dict:
        return {
            "prompt": self.active_prompt() if self.num_virtual_tokens else None,
            "lora_a": self.lora_a,
            "lora_b": self.lora_b,
            "scaling": self.config.scaling,
            "index": self.config.index,
        }

    def lowrank_layout(self) -> tuple[int | None, str]:
        return full_shape(self.lora_a)[-2], self.config.index

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"prompt": [self.prompt], "lowrank": [self.lora_a, self.lora_b]}

    @classmethod
    def adopt(cls, peft_config: object, encoder: nn.Module, weight: Tensor) -> DePTAdapter:
        """An adapter holding the official DePT code's prompt encoder Parameters (its PEFT
        fork's PROMPT_TUNING_LORA: `embedding`, `lora_embedding_A`, `lora_embedding_B`)."""
        config = DePTConfig(
            num_virtual_tokens=peft_config.num_virtual_tokens,
            r=peft_config.r,
            lora_alpha=peft_config.lora_alpha,
            max_length=peft_config.max_length,
        )
        scaling = getattr(encoder, "scaling", config.scaling)
        if abs(scaling - config.scaling) > 1e-12 * max(1.0, abs(config.scaling)):
            raise ValueError(
                f"prompt encoder scaling {scaling} differs from lora_alpha / sqrt(r) = "
                f"{config.scaling}"
            )
        expected = {
            "lora_embedding_A": (config.max_length, config.r),
            "lora_embedding_B": (config.r, embedding_shape(weight)[1]),
        }
        found = {name: peft_parameter(encoder, name) for name in expected}
        for name, tensor in found.items():
            # Shapes from the engine where it partitions the parameters (DeepSpeed ZeRO-3).
            if tuple(full_shape(tensor)) != expected[name]:
                raise ValueError(
                    f"{name} has shape {tuple(full_shape(tensor))}, expected {expected[name]} "
                    "from peft_config (max_length, r, token_dim)"
                )
        adapter = cls(config, weight)
        adapter.prompt = peft_parameter(encoder, "embedding")
        adapter.lora_a, adapter.lora_b = found["lora_embedding_A"], found["lora_embedding_B"]
        return adapter

    @classmethod
    def stack(cls, adapters: Sequence[DePTAdapter]) -> DePTAdapter:
        """One adapter serving the tasks of `adapters` in order: prompt (T, m, d), lora_a
        (T, L, r) or (T, V, r), lora_b (T, r, d).

        The adapters share m, r, the index mode and, in position mode, max_length: they fix
        the op's shapes and which row a token reads. lora_alpha may differ, being a training
        choice: the op takes one scaling, so each task's own is folded into its B
        (`B_k * scaling_k / scaling`, in fp32, exact up to one rounding of B in its dtype, and
        bit-exact where the scalings agree). The stack keeps the first non-zero lora_alpha. A
        stacked source contributes all its tasks; tensors take the first adapter's dtype and
        device.
        """
        check_same_kind(cls, adapters)
        first = adapters[0]
        shared = ["num_virtual_tokens", "r", "index"]
        if first.config.index == "position":
            shared.append("max_length")
        for i, other in enumerate(adapters):
            for name in shared:
                got, want = getattr(other.config, name), getattr(first.config, name)
                if got != want:
                    raise ValueError(
                        f"adapter {i} has {name}={got!r}, adapter 0 has {want!r}: stacked DePT "
                        f"adapters share {', '.join(shared)} (lora_alpha may differ)"
                    )
            for name in ("prompt", "lora_a", "lora_b"):
                check_same_base(i, name, getattr(other, name), getattr(first, name))
        alpha = next((a.config.lora_alpha for a in adapters if a.config.lora_alpha), 0)
        config = dataclasses.replace(first.config, lora_alpha=alpha)
        lora_b = []
        for other in adapters:
            ratio = other.config.scaling / config.scaling if config.scaling else 1.0
            b = other.lora_b.detach()
            lora_b.append(b if ratio == 1.0 else (b.float() * ratio).to(b.dtype))
        return first.with_parameters(
            config,
            prompt=stack_tensors([a.prompt for a in adapters]),
            lora_a=stack_tensors([a.lora_a for a in adapters]),
            lora_b=stack_tensors(lora_b),
        )


register_method(DePTConfig, DePTAdapter, peft_types=("PROMPT_TUNING_LORA",))
