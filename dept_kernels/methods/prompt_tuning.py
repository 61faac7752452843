"""Prompt tuning (Lester et al. 2021): a trainable (l, d) prompt in front of the input."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from .._engines import embedding_shape
from .base import MethodConfig, check_same_kind, register_method, stack_tensors
from .dept import DePTConfig
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
class PromptTuningConfig(MethodConfig):
    """Prompt tuning with `num_virtual_tokens` soft tokens.

    prompt_init: "random" (uniform [-0.5, 0.5]), "vocab" (sampled embedding rows), "text"
    (the embedding rows of `init_text`, a sequence of token ids, repeated/trimmed) or
    "adapter" (transfer: the prompt of the source-task adapter at `init_from`, a
    `save_adapter` directory of prompt tuning or DePT, or an official DePT checkpoint, with
    the same number of rows).
    """

    num_virtual_tokens: int
    prompt_init: str = "random"
    init_text: tuple[int, ...] | None = None
    init_from: str | None = None

    method: ClassVar[str] = "prompt_tuning"

    def __post_init__(self) -> None:
        # At least one row: a prompt-tuning adapter without one would have nothing to train.
        check_prompt_fields(self, minimum_tokens=1)


class PromptTuningAdapter(PromptAdapter):
    """Parameter `prompt` (l, d), or (T, l, d) stacked over tasks (`stack`)."""

    # Lester et al. 2021 train the prompt at 0.3.
    groups: ClassVar[dict[str, float | None]] = {"prompt": 3e-1}

    def __init__(
        self, config: PromptTuningConfig, weight: Tensor, generator: torch.Generator | None = None
    ) -> None:
        super().__init__()
        check_embedding(weight)
        self.config = config
        self.num_virtual_tokens = config.num_virtual_tokens
        if config.prompt_init == TRANSFER_INIT:
            source = read_source(config.init_from, embedding_shape(weight)[1], DePTConfig)
            check_source("num_virtual_tokens", source.num_virtual_tokens, config, source)
            prompt = source.prompt.to(weight.device, weight.dtype)
        else:
            prompt = init_prompt(
                config.num_virtual_tokens, weight, config.prompt_init, config.init_text, generator
            )
        self.prompt = nn.Parameter(prompt)

    def op_args(self) -> dict:
        return {"prompt": self.active_prompt()}

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"prompt": [self.prompt]}

    @classmethod
    def adopt(cls, peft_config: object, encoder: nn.Module, weight: Tensor) -> PromptTuningAdapter:
        """An adapter holding a PEFT prompt-tuning encoder's own Parameter (`embedding`)."""
        adapter = cls(PromptTuningConfig(peft_config.num_virtual_tokens), weight)
        adapter.prompt = peft_parameter(encoder, "embedding")
        return adapter

    @classmethod
    def stack(cls, adapters: Sequence[PromptTuningAdapter]) -> PromptTuningAdapter:
        """One adapter serving the tasks of `adapters` in order: prompt (T, l, d).

        The prompts share their length l. A stacked source contributes all its tasks; the
        prompt takes the first adapter's dtype and device.
        """
        check_same_kind(cls, adapters)
        first = adapters[0]
        for i, other in enumerate(adapters):
            if other.num_virtual_tokens != first.num_virtual_tokens:
                raise ValueError(
                    f"adapter {i} has num_virtual_tokens={other.num_virtual_tokens}, adapter 0 "
                    f"has {first.num_virtual_tokens}: stacked prompts share one length"
                )
            check_same_base(i, "prompt", other.prompt, first.prompt)
        return first.with_parameters(prompt=stack_tensors([a.prompt for a in adapters]))


register_method(PromptTuningConfig, PromptTuningAdapter, peft_types=("PROMPT_TUNING",))
