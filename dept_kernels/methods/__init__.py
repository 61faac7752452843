"""Prompt-based PEFT methods: a config dataclass and an adapter module each.

Every adapter is a `PromptAdapter`: it produces the arguments of the fused op
`dept_kernels.ops.dept_embedding`. `METHODS` maps a config class to its adapter class;
a new method plugs in by adding its pair there.
"""

from .base import PromptAdapter
from .dept import DePTAdapter, DePTConfig, equal_budget
from .ept import EPTAdapter, EPTConfig
from .prompt_tuning import PromptTuningAdapter, PromptTuningConfig

METHODS: dict[type, type[PromptAdapter]] = {
    PromptTuningConfig: PromptTuningAdapter,
    DePTConfig: DePTAdapter,
    EPTConfig: EPTAdapter,
}

__all__ = [
    "METHODS",
    "DePTAdapter",
    "DePTConfig",
    "EPTAdapter",
    "EPTConfig",
    "PromptAdapter",
    "PromptTuningAdapter",
    "PromptTuningConfig",
    "equal_budget",
]
