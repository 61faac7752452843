"""Benchmarks: `python -m dept_kernels.bench` is the main job (see `__main__`); the
pytest-benchmark suites in `bench/` are thin front-ends over the modules here.

- `shapes`: the problem sizes (one `Shape`) and the id distribution;
- `_timing`: medians, interquartile ranges and round-robin orders;
- `memory`: bytes saved for backward and peak extra allocation;
- `baselines`: the official AoT formulas; `suite`: the front-ends' device and backends;
- `end_to_end`, `inference`, `serving`, `kernels`: the main job's parts (training, inference
  through the Trainer, multi-task serving, the kernel table); `tables`: its end-to-end
  printout;
- `verdict`: spreads, invariants, and the findings as sentences or a noise warning;
- `ratio_table`: the per-group ratio and memory table `bench/conftest.py` prints after
  pytest-benchmark's own.
"""

from ._timing import interleaved_medians, median_iqr, median_time, rotation
from .kernels import make_problem
from .shapes import AOT_SHAPES, SHAPES, Shape, zipf_ids

__all__ = [
    "AOT_SHAPES",
    "SHAPES",
    "Shape",
    "interleaved_medians",
    "make_problem",
    "median_iqr",
    "median_time",
    "rotation",
    "zipf_ids",
]
