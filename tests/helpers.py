"""Shared test helpers: tolerances per dtype and the comparison that uses them."""

import torch

# Relative to the largest reference magnitude: fp32 is checked to rounding error; half
# types to about two units in the last place of their mantissa.
TOLERANCES = {
    torch.float32: 1e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 1.6e-2,
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """Compare in fp32 with the tolerance of `dtype`, scaled by the reference's magnitude."""
    tol = TOLERANCES[dtype]
    expected = expected.float()
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(actual.float(), expected, atol=tol * scale, rtol=tol)
