"""What the tests and benchmarks hold the library to: the formulas as oracles, the official
DePT baseline (`oracles`), and the per-dtype tolerances with the comparison that uses them
(`compare`)."""

from .compare import MODEL_TOLERANCES, TOLERANCES, assert_close
from .oracles import official_dept_embedding, reference_aot_bias_add, reference_dept_embedding

__all__ = [
    "MODEL_TOLERANCES",
    "TOLERANCES",
    "assert_close",
    "official_dept_embedding",
    "reference_aot_bias_add",
    "reference_dept_embedding",
]
