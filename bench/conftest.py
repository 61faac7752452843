"""pytest-benchmark front-ends over `dept_kernels.bench`: settings of the suites' process."""

import torch

# One torch.compile'd function is called at many (shape, dtype, grad mode) combinations;
# dynamo keeps at most `recompile_limit` graphs per code object and beyond that silently
# runs the function eagerly, which would post eager times under a "compile" label. Room for
# every combination, and an error rather than an eager fallback if that is ever exceeded.
torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
torch._dynamo.config.fail_on_recompile_limit_hit = True
