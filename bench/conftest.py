"""pytest-benchmark front-ends over `dept_kernels.bench`: settings of the suites' process,
and the ratio table printed after pytest-benchmark's own (`dept_kernels.bench.ratio_table`).
"""

import contextlib

import pytest
import torch

from dept_kernels.bench import ratio_table
from dept_kernels.bench._timing import kept_freed_memory

# One torch.compile'd function is called at many (shape, dtype, grad mode) combinations;
# dynamo keeps at most `recompile_limit` graphs per code object and beyond that silently
# runs the function eagerly, which would post eager times under a "compile" label. Room for
# every combination, and an error rather than an eager fallback if that is ever exceeded.
torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
torch._dynamo.config.fail_on_recompile_limit_hit = True

_GROUPS = pytest.StashKey[list]()
_MEMORY = pytest.StashKey[tuple[contextlib.ExitStack, str]]()


def pytest_configure(config):
    # Freed outputs stay mapped, so a row's times do not depend on which earlier row's free
    # returned memory to the OS (`dept_kernels.bench._timing.kept_freed_memory`).
    stack = contextlib.ExitStack()
    config.stash[_MEMORY] = stack, stack.enter_context(kept_freed_memory())


def pytest_unconfigure(config):
    if _MEMORY in config.stash:
        config.stash[_MEMORY][0].close()


@pytest.hookimpl(wrapper=True)
def pytest_benchmark_group_stats(config, benchmarks, group_by):
    # pytest-benchmark's grouping, kept for the summary below: [(group name, [bench dicts])].
    groups = yield
    config.stash[_GROUPS] = list(groups)
    return groups


def pytest_benchmark_update_json(config, benchmarks, output_json):
    # The saved JSON carries the ratios too (vs_official_eager, vs_official_compile,
    # fwd_over_copy in each benchmark's extra_info).
    ratio_table.annotate(output_json["benchmarks"])


@pytest.hookimpl(trylast=True)  # after pytest-benchmark's own table
def pytest_terminal_summary(terminalreporter, config):
    lines = ratio_table.summary(config.stash.get(_GROUPS, []))
    if lines:
        terminalreporter.section("ratios to the official formula, and memory")
        terminalreporter.write_line(config.stash[_MEMORY][1])
        for line in lines:
            terminalreporter.write_line(line)
