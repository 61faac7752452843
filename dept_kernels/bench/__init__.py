"""Benchmarks: `python -m dept_kernels.bench` is the main job (see `__main__`)."""

from ._timing import interleaved_medians, median_time
from .kernels import SHAPES, Shape, make_problem

__all__ = ["SHAPES", "Shape", "interleaved_medians", "make_problem", "median_time"]
