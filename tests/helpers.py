"""Shared test helpers: tolerances per dtype and the comparison that uses them."""

import torch

# Tests run on the GPU where there is one (the triton and cuda backends compiled), else on
# the CPU (the cpu backend, and triton under its interpreter).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

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


def randn(*shape: int, gen: torch.Generator | None = None, dtype=torch.float32) -> torch.Tensor:
    """Normal values drawn on the CPU (reproducible everywhere), placed on DEVICE."""
    return torch.randn(shape, generator=gen).to(DEVICE, dtype)


def randint(high: int, *shape: int, gen: torch.Generator | None = None) -> torch.Tensor:
    return torch.randint(0, high, shape, generator=gen).to(DEVICE)


def tensor(data, **kw) -> torch.Tensor:
    return torch.tensor(data, device=DEVICE, **kw)
