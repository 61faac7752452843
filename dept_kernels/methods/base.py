"""What every input-embedding adapter shares: prompt initialisation and the op call."""

from __future__ import annotations

import abc

import torch
from torch import Tensor, nn

from ..ops import dept_embedding

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
    elif init_text is not None:
        raise ValueError(f"init_text is only used with prompt_init='text', got {prompt_init!r}")


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
    (the official DePT TEXT init).
    """
    vocab, d = weight.shape
    if prompt_init == "random":
        out = torch.empty(rows, d, dtype=torch.float32)
        return out.uniform_(-0.5, 0.5, generator=generator).to(weight)
    if prompt_init == "vocab":
        ids = torch.randint(0, vocab, (rows,), generator=generator)
    else:
        bad = [i for i in init_text if not 0 <= i < vocab]
        if bad:
            raise ValueError(f"init_text ids {bad[:5]} are outside the vocabulary [0, {vocab})")
        reps = -(-rows // len(init_text))
        ids = torch.tensor((list(init_text) * reps)[:rows], dtype=torch.long)
    return weight.detach()[ids.to(weight.device)].clone()


class PromptAdapter(nn.Module, abc.ABC):
    """An adapter that rewrites the input embedding through `dept_kernels.ops.dept_embedding`.

    Subclasses give `op_args()`: the op's keyword arguments (prompt, lora_a, lora_b, scaling,
    index), and `param_groups()`: (soft prompt parameters, reparameterisation parameters).
    """

    num_virtual_tokens: int
    # Whether `position_ids` choose the low-rank rows (DePT in position mode).
    uses_position_rows: bool = False

    @abc.abstractmethod
    def op_args(self) -> dict:
        """Keyword arguments of `dept_embedding` besides ids, table and position_ids."""

    @abc.abstractmethod
    def param_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(soft prompt parameters, low-rank / reparameterisation parameters)."""

    def embed(
        self, input_ids: Tensor, weight: Tensor, position_ids: Tensor | None = None
    ) -> Tensor:
        """(B, s) ids and the (V, d) table -> (B, m + s, d) input embeddings."""
        if not self.uses_position_rows:
            position_ids = None
        return dept_embedding(input_ids, weight, position_ids=position_ids, **self.op_args())
