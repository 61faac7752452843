"""dept_kernels: fused kernels for prompt-based parameter-efficient fine-tuning."""

from . import ops
from ._backend import available_backends, current_backend, use_backend
from .ops import dept_embedding, official_dept_embedding

__version__ = "0.1.0"

__all__ = [
    "available_backends",
    "current_backend",
    "dept_embedding",
    "official_dept_embedding",
    "ops",
    "use_backend",
]
