"""Parameter-efficient methods: a config dataclass and an adapter module each.

`base` defines the interface every method implements (`MethodConfig`, `Adapter`) and the
registry (`register_method`); each method module registers its pair as it loads. The prompt
methods' adapters are `PromptAdapter`s (`prompt`): they produce the arguments of the fused op
`dept_kernels.ops.dept_embedding`. AoT P-tuning's `AoTAdapter` instead adds a bias before
every transformer layer.
"""

from .aot import AoTAdapter, AoTConfig, AoTLayer
from .base import (
    METHODS,
    PEFT_TYPES,
    Adapter,
    MethodConfig,
    adapter_class,
    group_names,
    method_config,
    register_method,
)
from .dept import DePTAdapter, DePTConfig, equal_budget
from .ept import EPTAdapter, EPTConfig
from .prompt import PromptAdapter
from .prompt_tuning import PromptTuningAdapter, PromptTuningConfig

__all__ = [
    "METHODS",
    "PEFT_TYPES",
    "Adapter",
    "AoTAdapter",
    "AoTConfig",
    "AoTLayer",
    "DePTAdapter",
    "DePTConfig",
    "EPTAdapter",
    "EPTConfig",
    "MethodConfig",
    "PromptAdapter",
    "PromptTuningAdapter",
    "PromptTuningConfig",
    "adapter_class",
    "equal_budget",
    "group_names",
    "method_config",
    "register_method",
]
