"""The one wrapper of the compiled extensions (`csrc/cpu`, `csrc/cuda`) as backends.

Both bind the same three functions (`csrc/common/forward_args.h`), the cpu module two
optional ones (`reduce_lowrank`, `scatter_rows`); this adapts them to the
`Backend` contract and turns a failed build into `BackendUnavailable` with its cause.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

from torch import Tensor

from .. import _build
from ._registry import BackendUnavailable

__all__ = ["CompiledBackend", "compiled_loader"]


class CompiledBackend:
    """A `Backend` whose kernels are those of the compiled extension `module`."""

    def __init__(self, module: ModuleType) -> None:
        self.module = module
        # Optional (`Backend` lists them): the cpu module binds them, the cuda module does not.
        self.reduce_lowrank: Callable[..., list[Tensor]] | None = getattr(
            module, "reduce_lowrank", None
        )
        self.scatter_rows: Callable[..., Tensor] | None = getattr(module, "scatter_rows", None)

    def forward(
        self,
        input_ids: Tensor,
        weight: Tensor,
        prompt: Tensor | None,
        lora_a: Tensor | None,
        lora_b: Tensor | None,
        rows: Tensor | None,
        scaling: float,
        task_ids: Tensor | None = None,
        batch_order: Tensor | None = None,
        visual: Tensor | None = None,
    ) -> Tensor:
        return self.module.forward(
            input_ids,
            weight,
            prompt,
            lora_a,
            lora_b,
            rows,
            float(scaling),
            task_ids,
            batch_order,
            visual,
        )

    def reduce(
        self, grad_out: Tensor, m: int, order: Tensor | None, offsets: Tensor | None
    ) -> Tensor:
        return self.module.reduce(grad_out, int(m), order, offsets)

    def gather_add(self, hidden: Tensor, rows: Tensor, table: Tensor, out: Tensor) -> Tensor:
        return self.module.gather_add(hidden, rows, table, out)

    def __repr__(self) -> str:
        return f"CompiledBackend({self.module.__name__})"


def compiled_loader(build: Callable[[], ModuleType], advice: str) -> Callable[[], CompiledBackend]:
    """A registry loader calling `build` (it builds or imports the module).

    `_build.Unavailable` (a cause the user can act on: a read-only cache, a stuck build)
    keeps its message; any other failure (no compiler, a compile error) is reported with
    `advice` and the end of the compiler's output, where its error is.
    """

    def load() -> CompiledBackend:
        try:
            return CompiledBackend(build())
        except _build.Unavailable as error:
            text = str(error)
            raise BackendUnavailable(f"{text[:1].upper()}{text[1:]}.") from error
        except Exception as error:
            lines = str(error).strip().splitlines()
            detail = "\n".join(lines[-20:])
            raise BackendUnavailable(
                f"Building it failed. {advice} {type(error).__name__}: {detail}"
            ) from error

    return load
