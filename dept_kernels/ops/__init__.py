"""The ops: per op, the public API and its checks (`dept_embedding`, `aot`), the custom op
with its autograd (`_*_op`), and the gradients (`_grads`); the sync-free switch and its
error record (`_sync_free`). Kernels come from `dept_kernels.backends`."""

import warnings

from ._sync_free import check_errors, set_sync_free, sync_free, sync_free_enabled
from .aot import aot_bias_add, aot_fc_bias, aot_kron_bias, fc_rows, kron_rows
from .dept_embedding import dept_embedding

__all__ = [
    "aot_bias_add",
    "aot_fc_bias",
    "aot_kron_bias",
    "check_errors",
    "dept_embedding",
    "fc_rows",
    "kron_rows",
    "set_sync_free",
    "sync_free",
    "sync_free_enabled",
]

# Moved to `dept_kernels.testing`; importable from here for one release.
_MOVED = ("official_dept_embedding", "reference_aot_bias_add", "reference_dept_embedding")


def __getattr__(name: str):
    if name in _MOVED:
        warnings.warn(
            f"dept_kernels.ops.{name} moved to dept_kernels.testing.{name}",
            DeprecationWarning,
            stacklevel=2,
        )
        from .. import testing

        return getattr(testing, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
