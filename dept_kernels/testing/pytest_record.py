"""A pytest plugin for runs that may not finish (a crash, a spent budget): it records each
test the moment it starts and each failure the moment it is reported, so what a run found
survives the process (`python -m dept_kernels.gpu_run` loads it with `-p`).

    DEPT_KERNELS_RECORD=<file> pytest -p dept_kernels.testing.pytest_record ...

Appends JSON lines to <file>: `{"start": nodeid}` before a test runs, and
`{"failed": nodeid, "when": phase, "message": text}` for a failed setup, call or teardown,
flushed at once.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # gpu_run reads the records without importing pytest itself
    import pytest

VARIABLE = "DEPT_KERNELS_RECORD"
# Characters of a failure's report kept: the traceback's end, where the error is.
MESSAGE_CHARS = 4000


def _write(entry: dict) -> None:
    path = os.environ.get(VARIABLE)
    if not path:
        return
    with open(path, "a") as file:
        file.write(json.dumps(entry) + "\n")
        file.flush()


def pytest_runtest_logstart(nodeid: str, location: tuple) -> None:
    _write({"start": nodeid})


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.failed:
        text = report.longreprtext
        _write({"failed": report.nodeid, "when": report.when, "message": text[-MESSAGE_CHARS:]})


def read(path: str) -> tuple[list[str], dict[str, str]]:
    """(the ids started, in order; the failures' messages by id) from a record file."""
    started: list[str] = []
    failures: dict[str, str] = {}
    if not os.path.exists(path):
        return started, failures
    with open(path) as file:
        for line in file:
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:  # a line cut by the crash
                continue
            if "start" in entry:
                started.append(entry["start"])
            elif "failed" in entry:
                failures.setdefault(entry["failed"], f"{entry['when']}: {entry['message']}")
    return started, failures
