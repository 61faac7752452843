"""Op contracts: validation, dispatch to a backend, autograd."""

from .aot import (
    aot_bias_add,
    aot_fc_bias,
    aot_kron_bias,
    fc_rows,
    kron_rows,
    reference_aot_bias_add,
)
from .dept_embedding import dept_embedding, official_dept_embedding, reference_dept_embedding

__all__ = [
    "aot_bias_add",
    "aot_fc_bias",
    "aot_kron_bias",
    "dept_embedding",
    "fc_rows",
    "kron_rows",
    "official_dept_embedding",
    "reference_aot_bias_add",
    "reference_dept_embedding",
]
