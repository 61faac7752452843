"""Tolerances per dtype and the one comparison the tests and the benchmarks use.

Imported by `tests/helpers` and `dept_kernels.bench`: a tolerance changes here, for both.
"""

from __future__ import annotations

import torch

# Relative to the largest reference magnitude: fp32 is checked to rounding error; half
# types to about two units in the last place of their mantissa.
TOLERANCES: dict[torch.dtype, float] = {
    torch.float32: 1e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 1.6e-2,
}

# Whole-model outputs compared with `torch.testing.assert_close` (logits, losses, adapter
# gradients through every layer): absolute and relative, as half types round at each layer.
MODEL_TOLERANCES: dict[torch.dtype, dict[str, float]] = {
    torch.float32: {"atol": 1e-5, "rtol": 1e-5},
    torch.float16: {"atol": 3e-2, "rtol": 3e-2},
    torch.bfloat16: {"atol": 3e-2, "rtol": 3e-2},
}


def assert_close(
    actual: torch.Tensor,
    expected: torch.Tensor,
    dtype: torch.dtype,
    slack: float = 1.0,
    what: str | None = None,
) -> None:
    """Compare in fp32 with `slack` times the tolerance of `dtype`, absolute part scaled by
    the reference's magnitude (at least 1). Any shapes, as long as the two match.

    `what`, if given, names the compared value at the head of the failure message.
    """
    tol = slack * TOLERANCES[dtype]
    expected = expected.float()
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    try:
        torch.testing.assert_close(actual.float(), expected, atol=tol * scale, rtol=tol)
    except AssertionError as e:
        if what is None:
            raise
        raise AssertionError(f"{what} disagrees with the reference: {e}") from None
