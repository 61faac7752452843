"""What the tests and benchmarks hold the library to: the formulas as oracles, and the
official DePT baseline (`oracles`)."""

from .oracles import official_dept_embedding, reference_aot_bias_add, reference_dept_embedding

__all__ = ["official_dept_embedding", "reference_aot_bias_add", "reference_dept_embedding"]
