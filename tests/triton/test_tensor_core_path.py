"""The half-precision tile paths of the Triton forward, and what the interpreter runs of them.

On a GPU both forward kernels (rows and position) form their low-rank tile on the tensor
cores when the factors are fp16 or bf16 (`DOT_FP32` False: half operands, exact products, fp32
accumulation). Triton's interpreter multiplies bf16 tiles as their raw bits, so for bf16
factors the launcher runs the fp32 branch there instead. What runs here, for each kernel:
- fp16 factors: the tensor-core branch itself (`tl.dot(a, b, acc)` on half tiles, the same
  line bf16 takes on a GPU), checked against the formula;
- bf16 factors: the fp32 branch on the bf16 values, checked against the tensor-core math
  written here (bf16 operands, products formed exactly, fp32 sums, one rounding at the end),
  whose premise, that the products of bf16 values are exact in fp32, is checked too.
"""

from __future__ import annotations

import pytest
import torch
from helpers import DEVICE, assert_close

import dept_kernels
from dept_kernels.ops import dept_embedding

pytest.importorskip("triton")
if "triton" not in dept_kernels.available_backends():
    pytest.skip("triton does not run here", allow_module_level=True)

from dept_kernels.triton import dept_embedding as kernels


class _Recorder:
    """Stands in for a kernel: records the compile-time parameters of each launch."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kw):
            self.launches.append({k: v for k, v in kw.items() if k.isupper()})
            return launch(*args, **kw)

        return run


# The kernel each mode launches: per-sample position ids take the rows kernel, rows 0..s-1
# the position kernel.
KERNELS = {"rows": "_fwd_rows_kernel", "position": "_fwd_position_kernel"}


def _problem(dtype: torch.dtype, kernel: str, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    batch, seq, d, vocab, m, r, max_len = 3, 21, 48, 40, 2, 24, 30
    problem = dict(
        input_ids=torch.randint(0, vocab, (batch, seq), generator=g).to(DEVICE),
        weight=torch.randn(vocab, d, generator=g).to(dtype).to(DEVICE),
        prompt=torch.randn(m, d, generator=g).to(dtype).to(DEVICE),
        lora_a=torch.randn(max_len, r, generator=g).to(dtype).to(DEVICE),
        lora_b=torch.randn(r, d, generator=g).to(dtype).to(DEVICE),
    )
    if kernel == "rows":
        problem["position_ids"] = torch.randint(0, max_len, (batch, seq), generator=g).to(DEVICE)
    return problem


def _tensor_core_reference(kw: dict, scaling: float) -> torch.Tensor:
    """[P; E[ids] + scaling * A[rows] @ B] as the tensor cores form it: the half operands'
    products exact (in float64 here), their sum and the scaled add in fp32, one rounding."""
    rows = kw.get("position_ids", torch.arange(kw["input_ids"].shape[1], device=DEVICE))
    a = kw["lora_a"].double()[rows]  # (B, s, r) or (s, r)
    delta = torch.einsum("...r,rd->...d", a, kw["lora_b"].double()).float()
    tokens = kw["weight"].float()[kw["input_ids"]] + scaling * delta
    prompt = kw["prompt"].float().expand(tokens.shape[0], -1, -1)
    return torch.cat([prompt, tokens], dim=1).to(kw["weight"].dtype)


def _run(monkeypatch, kernel: str, kw: dict, scaling: float) -> tuple[torch.Tensor, list[dict]]:
    recorder = _Recorder(getattr(kernels, KERNELS[kernel]))
    monkeypatch.setattr(kernels, KERNELS[kernel], recorder)
    with dept_kernels.use_backend("triton"):
        out = dept_embedding(**kw, scaling=scaling)
    return out, recorder.launches


@pytest.mark.parametrize("kernel", KERNELS)
def test_fp16_factors_run_the_tensor_core_branch(monkeypatch, kernel):
    kw = _problem(torch.float16, kernel)
    out, launches = _run(monkeypatch, kernel, kw, 0.3)
    assert [launch["DOT_FP32"] for launch in launches] == [False]
    assert_close(out, _tensor_core_reference(kw, 0.3), torch.float16)


@pytest.mark.parametrize("kernel", KERNELS)
def test_bf16_factors_match_the_tensor_core_math(monkeypatch, kernel):
    kw = _problem(torch.bfloat16, kernel, seed=1)
    out, launches = _run(monkeypatch, kernel, kw, 0.7)
    # On a GPU the tensor cores; under the interpreter the fp32 branch on the same values.
    assert [launch["DOT_FP32"] for launch in launches] == [kernels.interpreting()]
    meta = kernels.forward_constexprs(torch.bfloat16, torch.bfloat16, kernel == "rows", False)
    assert meta["DOT_FP32"] is False
    assert_close(out, _tensor_core_reference(kw, 0.7), torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_products_are_exact_in_fp32(dtype):
    # 8- or 11-bit significands multiply into at most 22 bits: fp32 (24) holds every product,
    # so fp32 FMAs on half operands form the same products the tensor cores do.
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4096, generator=g).to(dtype)
    y = torch.randn(4096, generator=g).to(dtype)
    exact = x.double() * y.double()
    assert torch.equal((x.float() * y.float()).double(), exact)


def test_only_fp32_factors_take_the_fma_tile():
    # TF32 tensor cores would round fp32 factors; half factors are exact on them.
    for dtype in kernels.FLOATS:
        for factor in kernels.FLOATS:
            for rows_mode in (False, True):
                for tasks in (False, True):
                    meta = kernels.forward_constexprs(dtype, factor, rows_mode, tasks)
                    assert meta["DOT_FP32"] is (factor == torch.float32)
