"""Parameter-efficient methods: a config dataclass and an adapter module each.

The prompt methods' adapters are `PromptAdapter`s: they produce the arguments of the fused
op `dept_kernels.ops.dept_embedding`. AoT P-tuning's `AoTAdapter` instead adds a bias before
every transformer layer. `METHODS` maps a config class to its adapter class; a new method
plugs in by adding its pair there.
"""

from torch import nn

from .aot import AoTAdapter, AoTConfig, AoTLayer
from .base import PromptAdapter
from .dept import DePTAdapter, DePTConfig, equal_budget
from .ept import EPTAdapter, EPTConfig
from .prompt_tuning import PromptTuningAdapter, PromptTuningConfig

METHODS: dict[type, type[nn.Module]] = {
    PromptTuningConfig: PromptTuningAdapter,
    DePTConfig: DePTAdapter,
    EPTConfig: EPTAdapter,
    AoTConfig: AoTAdapter,
}

__all__ = [
    "METHODS",
    "AoTAdapter",
    "AoTConfig",
    "AoTLayer",
    "DePTAdapter",
    "DePTConfig",
    "EPTAdapter",
    "EPTConfig",
    "PromptAdapter",
    "PromptTuningAdapter",
    "PromptTuningConfig",
    "equal_budget",
]
