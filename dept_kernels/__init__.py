"""dept_kernels: fused kernels for prompt-based parameter-efficient fine-tuning."""

from . import ops
from .backends import available_backends, current_backend, set_backend, use_backend
from .checkpoint import load_adapter, save_adapter
from .methods import AoTConfig, DePTConfig, EPTConfig, PromptTuningConfig, equal_budget
from .multitask import stack_adapters
from .official import load_dept_checkpoint
from .ops import check_errors, dept_embedding, set_sync_free, sync_free, sync_free_enabled
from .patch import adapter, fold, fuse, is_patched, merge, param_groups, patch, unpatch
from .testing import official_dept_embedding

__version__ = "0.1.0"

__all__ = [
    "AoTConfig",
    "DePTConfig",
    "EPTConfig",
    "PromptTuningConfig",
    "adapter",
    "available_backends",
    "check_errors",
    "current_backend",
    "dept_embedding",
    "equal_budget",
    "fold",
    "fuse",
    "is_patched",
    "load_adapter",
    "load_dept_checkpoint",
    "merge",
    "official_dept_embedding",
    "ops",
    "param_groups",
    "patch",
    "save_adapter",
    "set_backend",
    "set_sync_free",
    "stack_adapters",
    "sync_free",
    "sync_free_enabled",
    "unpatch",
    "use_backend",
]
