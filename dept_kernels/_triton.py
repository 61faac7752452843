"""The `triton` backend: the Triton kernels of `dept_kernels.triton`, one module per op.

Same contract as `dept_kernels.ops._torch_impl`; inputs arrive validated by the ops.
Imported on first use only, since importing defines the kernels, and under
`TRITON_INTERPRET=1` (CPU tests) that must already be set.
"""

from .triton.aot_bias import gather_add
from .triton.dept_embedding import forward, reduce

__all__ = ["forward", "gather_add", "reduce"]
