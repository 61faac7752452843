"""EPT: one soft prompt row through an under-parameterised residual linear map.

    p' = p + (p @ W_down) @ W_up        p (1, d), W_down (d, h), W_up (h, d)

`p'` is broadcast to n rows (n = 1 for EPT, 10 for EPT*) as a stride-0 view, so the op reads
one row. Its inference form (`merged`) is the plain (n, d) prompt-tuning adapter holding
p', which is also what several EPT tasks stack as.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from .._engines import embedding_shape
from .base import MethodConfig, check_int, register_method
from .prompt import PromptAdapter, check_embedding, check_prompt_fields, init_prompt
from .prompt_tuning import PromptTuningAdapter, PromptTuningConfig


@dataclass(frozen=True)
class EPTConfig(MethodConfig):
    """EPT with n = `num_virtual_tokens` broadcast rows and a bottleneck of width `hidden`.

    prompt_init / init_text initialise the one row p as for prompt tuning ("text": the row
    of `init_text[0]`).
    """

    num_virtual_tokens: int = 1
    hidden: int = 1
    residual: bool = True
    prompt_init: str = "random"
    init_text: tuple[int, ...] | None = None

    method: ClassVar[str] = "ept"

    def __post_init__(self) -> None:
        check_prompt_fields(self, minimum_tokens=1)
        check_int("hidden", self.hidden, 1)
        if not isinstance(self.residual, bool):
            raise TypeError(f"residual must be a bool, got {type(self.residual).__name__}")


class EPTAdapter(PromptAdapter):
    """Parameters `prompt` (1, d), `w_down` (d, h), `w_up` (h, d).

    Init: `prompt` by `prompt_init` (uniform [-0.5, 0.5] by default), `w_down`
    Kaiming-uniform (a = sqrt 5), `w_up` zeros, so training starts from plain prompt tuning
    when `residual` is set.
    """

    # The EPT paper gives no learning rates this library could default to.
    groups: ClassVar[dict[str, float | None]] = {"prompt": None, "lowrank": None}

    def __init__(
        self, config: EPTConfig, weight: Tensor, generator: torch.Generator | None = None
    ) -> None:
        super().__init__()
        check_embedding(weight)
        self.config = config
        self.num_virtual_tokens = config.num_virtual_tokens
        d = embedding_shape(weight)[1]  # an engine's shard has its own shape
        self.prompt = nn.Parameter(
            init_prompt(1, weight, config.prompt_init, config.init_text, generator)
        )
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

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"prompt": [self.prompt], "lowrank": [self.w_down, self.w_up]}

    @torch.no_grad()
    def merged(
        self,
        embedding: Tensor | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> PromptTuningAdapter:
        """A prompt-tuning adapter with the (n, d) prompt p' materialised: same outputs.

        `embedding` is not read (p' needs only the adapter); `dtype` and `device` default to
        the prompt's."""
        if embedding is not None:
            self.check_whole(embedding)
        dtype, device = dtype or self.prompt.dtype, device or self.prompt.device
        # The table argument only sets width, dtype and device of the random init, then
        # overwritten.
        table = torch.empty_like(self.prompt, dtype=dtype, device=device)
        merged = PromptTuningAdapter(PromptTuningConfig(self.num_virtual_tokens), table)
        merged.prompt.copy_(self.prompt_row().to(dtype).expand_as(merged.prompt))
        return merged

    def fold(self) -> PromptTuningAdapter:
        """Deprecated name of `merged()`."""
        warnings.warn(
            "EPTAdapter.fold() is deprecated; use merged()", DeprecationWarning, stacklevel=2
        )
        return self.merged()


register_method(EPTConfig, EPTAdapter)
