"""EPT: one soft prompt row through an under-parameterised residual linear map.

    p' = p + (p @ W_down) @ W_up        p (1, d), W_down (d, h), W_up (h, d)

`p'` is broadcast to n rows (n = 1 for EPT, 10 for EPT*) as a stride-0 view, so the op reads
one row; after training, `fold()` turns it into a plain (n, d) prompt-tuning adapter, and
`stack` turns several into one stacked prompt-tuning adapter.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from .._engines import embedding_shape
from .base import PromptAdapter, check_embedding, check_int, check_same_kind, init_prompt
from .prompt_tuning import PromptTuningAdapter, PromptTuningConfig


@dataclass(frozen=True)
class EPTConfig:
    """EPT with n = `num_virtual_tokens` broadcast rows and a bottleneck of width `hidden`."""

    num_virtual_tokens: int = 1
    hidden: int = 1
    residual: bool = True

    method: ClassVar[str] = "ept"

    def __post_init__(self) -> None:
        check_int("num_virtual_tokens", self.num_virtual_tokens, 1)
        check_int("hidden", self.hidden, 1)
        if not isinstance(self.residual, bool):
            raise TypeError(f"residual must be a bool, got {type(self.residual).__name__}")


class EPTAdapter(PromptAdapter):
    """Parameters `prompt` (1, d), `w_down` (d, h), `w_up` (h, d).

    Init: `prompt` uniform [-0.5, 0.5], `w_down` Kaiming-uniform (a = sqrt 5), `w_up` zeros,
    so training starts from plain prompt tuning when `residual` is set.
    """

    def __init__(
        self, config: EPTConfig, weight: Tensor, generator: torch.Generator | None = None
    ) -> None:
        super().__init__()
        check_embedding(weight)
        self.config = config
        self.num_virtual_tokens = config.num_virtual_tokens
        d = embedding_shape(weight)[1]  # an engine's shard has its own shape
        self.prompt = nn.Parameter(init_prompt(1, weight, "random", generator=generator))
        # Kaiming on the (h, d) transpose: fan-in d, the input width of p @ W_down.
        w_down = torch.empty(config.hidden, d, dtype=torch.float32)
        nn.init.kaiming_uniform_(w_down, a=math.sqrt(5), generator=generator)
        self.w_down = nn.Parameter(w_down.T.contiguous().to(weight.device, weight.dtype))
        self.w_up = nn.Parameter(
            torch.zeros(config.hidden, d, dtype=weight.dtype, device=weight.device)
        )

    def prompt_row(self) -> Tensor:
        """p' (1, d), computed in fp32."""
        p = self.prompt.float()
        delta = (p @ self.w_down.float()) @ self.w_up.float()
        return p + delta if self.config.residual else delta

    def op_args(self) -> dict:
        row = self.prompt_row()
        return {"prompt": row.expand(self.num_virtual_tokens, row.shape[1])}

    def param_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        return [self.prompt], [self.w_down, self.w_up]

    @torch.no_grad()
    def fold(self) -> PromptTuningAdapter:
        """A prompt-tuning adapter with the (n, d) prompt p' materialised: same outputs."""
        # The table argument only sets width, dtype and device of the random init, then
        # overwritten.
        folded = PromptTuningAdapter(PromptTuningConfig(self.num_virtual_tokens), self.prompt)
        folded.prompt.copy_(self.prompt_row().to(self.prompt.dtype).expand_as(folded.prompt))
        return folded

    @classmethod
    def stack(cls, adapters: Sequence[EPTAdapter]) -> PromptTuningAdapter:
        """A prompt-tuning adapter serving the tasks of `adapters` in order: prompt (T, n, d).

        What a trained EPT adapter serves is its folded (n, d) prompt p', so the stack holds
        each task's p' materialised: the op then reads plain per-task prompts.
        """
        check_same_kind(cls, adapters)
        return PromptTuningAdapter.stack([a.fold() for a in adapters])
