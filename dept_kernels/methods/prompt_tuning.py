"""Prompt tuning (Lester et al. 2021): a trainable (l, d) prompt in front of the input."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from .base import (
    PromptAdapter,
    as_token_ids,
    check_embedding,
    check_int,
    check_prompt_init,
    check_same_base,
    check_same_kind,
    init_prompt,
    stack_tensors,
)


@dataclass(frozen=True)
class PromptTuningConfig:
    """Prompt tuning with `num_virtual_tokens` soft tokens.

    prompt_init: "random" (uniform [-0.5, 0.5]), "vocab" (sampled embedding rows) or "text"
    (the embedding rows of `init_text`, a sequence of token ids, repeated/trimmed).
    """

    num_virtual_tokens: int
    prompt_init: str = "random"
    init_text: tuple[int, ...] | None = None

    method: ClassVar[str] = "prompt_tuning"

    def __post_init__(self) -> None:
        check_int("num_virtual_tokens", self.num_virtual_tokens, 1)
        object.__setattr__(self, "init_text", as_token_ids(self.init_text))
        check_prompt_init(self.prompt_init, self.init_text)


class PromptTuningAdapter(PromptAdapter):
    """Parameter `prompt` (l, d), or (T, l, d) stacked over tasks (`stack`)."""

    def __init__(
        self, config: PromptTuningConfig, weight: Tensor, generator: torch.Generator | None = None
    ) -> None:
        super().__init__()
        check_embedding(weight)
        self.config = config
        self.num_virtual_tokens = config.num_virtual_tokens
        self.prompt = nn.Parameter(
            init_prompt(
                config.num_virtual_tokens, weight, config.prompt_init, config.init_text, generator
            )
        )

    def op_args(self) -> dict:
        return {"prompt": self.active_prompt()}

    def param_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        return [self.prompt], []

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
