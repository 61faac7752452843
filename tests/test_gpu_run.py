"""The one-command GPU run: its stages, byte counts, the default-backend rule, the budget,
and a clean exit without a GPU. The kernel table runs here on the CPU (host timers) at a tiny
shape, the same code the GPU runs with device events."""

import json
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from dept_kernels import gpu_run
from dept_kernels.bench import SHAPES
from dept_kernels.bench.shapes import AOT_SHAPES, Shape

TINY = Shape("tiny", 2, 5, 8, 50, 3, 2, 5)


def test_exits_cleanly_without_a_gpu(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert gpu_run.main([]) == 0
    assert "no CUDA GPU" in capsys.readouterr().out


def test_help_names_the_stages_in_order(capsys):
    with pytest.raises(SystemExit) as stop:
        gpu_run.main(["--help"])
    assert stop.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    names = ("kernels", "overhead", "tests", "suite", "bench", "main-job")
    positions = [text.index(f"{name} (") for name in names]
    assert positions == sorted(positions)
    assert "suite (--suite)" in text and "bench (--bench)" in text
    assert "main-job (--main-job)" in text


def test_stages_chosen_by_flags():
    parse = gpu_run._parser().parse_args
    default = ["kernels", "overhead", "tests"]
    assert gpu_run._chosen(parse([])) == default
    assert gpu_run._chosen(parse(["--bench", "--suite"])) == [*default, "suite", "bench"]
    assert gpu_run._chosen(parse(["--main-job"])) == [*default, "main-job"]
    assert gpu_run._chosen(parse(["--stages", "bench,kernels"])) == ["kernels", "bench"]
    with pytest.raises(SystemExit, match="unknown"):
        gpu_run._chosen(parse(["--stages", "kernel"]))


def test_forward_min_bytes_is_what_the_op_must_touch():
    """The floor, counted from the tensors the op reads and writes (on the meta device, so
    nothing is allocated): the int64 ids, one embedding row per token, the output."""
    shape = SHAPES["llama-2-7b"]
    b, s, d, m = shape.batch, shape.seq, shape.d, shape.m
    ids = torch.empty(b, s, dtype=torch.int64, device="meta")
    rows = torch.empty(b, s, d, dtype=torch.bfloat16, device="meta")  # E[ids], read once
    out = torch.empty(b, m + s, d, dtype=torch.bfloat16, device="meta")
    expected = ids.nbytes + rows.nbytes + out.nbytes
    assert gpu_run.forward_min_bytes(shape, torch.bfloat16) == expected


def test_reduce_min_bytes_reads_the_token_gradients_once():
    shape = SHAPES["gpt2"]
    grad_tokens = torch.empty(shape.batch, shape.seq, shape.d, dtype=torch.float16, device="meta")
    sums = torch.empty(shape.seq, shape.d, dtype=torch.float32, device="meta")
    assert gpu_run.reduce_min_bytes(shape, torch.float16) == grad_tokens.nbytes + sums.nbytes


def test_peak_bandwidth_lookup():
    """NVIDIA's data-sheet HBM bandwidths: H100 SXM5 3.35 TB/s, H100 PCIe 2.0 TB/s, H200
    4.8 TB/s; the device name picks the most specific entry."""
    assert gpu_run.peak_bandwidth("NVIDIA H100 80GB HBM3") == 3.35e12
    assert gpu_run.peak_bandwidth("NVIDIA H100 PCIe") == 2.0e12
    assert gpu_run.peak_bandwidth("NVIDIA H200") == 4.8e12
    assert gpu_run.peak_bandwidth("Some Other GPU") is None


def _row(kernel, backend, ms, shape="t5-base", dtype="float32"):
    return {"kernel": kernel, "backend": backend, "shape": shape, "dtype": dtype, "kernel_ms": ms}


@pytest.mark.parametrize(
    ("cuda_ms", "expected"),
    [(0.90, "cuda"), (0.97, "triton"), (1.2, "triton")],
)
def test_default_backend_rule(cuda_ms, expected):
    """cuda becomes the default only when faster by more than the margin (geometric mean
    over the compared kernels); rows of other kernels and unpaired rows do not count."""
    rows = [
        _row("dept_forward", "triton", 1.0),
        _row("dept_forward", "cuda", cuda_ms),
        _row("dept_reduce", "triton", 2.0, dtype="bfloat16"),
        _row("dept_reduce", "cuda", 2.0 * cuda_ms, dtype="bfloat16"),
        _row("dept_forward+backward", "triton", 1.0),
        _row("dept_forward+backward", "cuda", 100.0),  # an op row: not compared
        _row("aot_gather_add", "triton", 1.0, shape="gpt2"),  # no cuda pair
    ]
    choice = gpu_run.default_backend(rows)
    assert choice["backend"] == expected
    assert choice["pairs"] == 2
    assert choice["cuda_over_triton_geomean"] == pytest.approx(cuda_ms)


def test_default_backend_without_pairs_stays_triton():
    assert gpu_run.default_backend([_row("dept_forward", "triton", 1.0)])["backend"] == "triton"


@pytest.fixture
def tiny_shape(monkeypatch):
    monkeypatch.setitem(SHAPES, TINY.name, TINY)
    monkeypatch.setitem(AOT_SHAPES, TINY.name, TINY)


def _run(tmp_path, argv, budget=None):
    args = gpu_run._parser().parse_args(["--out", str(tmp_path), *argv])
    deadline = None if budget is None else time.monotonic() + budget
    result = {"environment": {"device": "cpu"}, "stages": {}}
    return gpu_run.Run(args, result, tmp_path / "cpu.json", deadline, "cpu", ("cpu", "torch"))


def test_kernel_stage_runs_every_kernel_on_every_backend(tmp_path, tiny_shape, capsys):
    """The stage on the CPU: one row per kernel, backend, shape and dtype, the torch-op rows
    once; byte rates from the counted bytes; the JSON written; the rule applied."""
    run = _run(tmp_path, ["--shapes", "tiny", "--dtypes", "float32,bfloat16", "--repeats", "3"])
    stage = gpu_run.kernels_stage(run)
    rows = stage["rows"]
    got = {(r["kernel"], r["backend"], r["dtype"]) for r in rows}
    per_backend = ["dept_forward", "dept_reduce", "dept_forward+backward", "aot_gather_add"]
    expected = {
        (k, b, d) for k in per_backend for b in ("cpu", "torch") for d in ("float32", "bfloat16")
    } | {(k, "torch", d) for k in ("aot_kron_rows", "aot_fc_rows") for d in ("float32", "bfloat16")}
    assert got == expected
    assert len(rows) == len(expected)
    for row in rows:
        assert row["kernel_ms"] > 0 and row["op_ms"] > 0 and row["op_custom_ops_ms"] > 0
        assert row["GBps"] == pytest.approx(row["min_bytes"] / row["kernel_ms"] / 1e6)
        assert row["of_peak"] is None
    assert stage["default_backend"]["backend"] == "triton"  # no triton/cuda pair here
    written = json.loads(run.path.read_text())
    assert len(written["stages"]["kernels"]["rows"]) == len(rows)
    assert "dept_forward " in capsys.readouterr().out


def test_kernel_stage_records_a_backend_that_cannot_load(tmp_path, tiny_shape, monkeypatch):
    """A backend whose build fails is recorded with its error; the others still run."""
    from dept_kernels import backends

    real_load = backends.load

    def load(name):
        if name == "torch":
            raise backends.BackendUnavailable("no compiler here")
        return real_load(name)

    monkeypatch.setattr(backends, "load", load)
    run = _run(tmp_path, ["--shapes", "tiny", "--dtypes", "float32", "--repeats", "2"])
    stage = gpu_run.kernels_stage(run)
    assert "no compiler here" in stage["torch_error"]
    assert {r["backend"] for r in stage["rows"]} == {"cpu", "torch"}  # torch: the op rows
    assert {r["kernel"] for r in stage["rows"] if r["backend"] == "torch"} == {
        "aot_kron_rows",
        "aot_fc_rows",
    }


def test_pytest_outcomes_from_verbose_lines():
    lines = [
        "tests/a.py::test_one PASSED                [ 33%]",
        "tests/a.py::test_two[x-1] FAILED           [ 66%]",
        "tests/a.py::test_three SKIPPED (no gpu)    [100%]",
        "tests/a.py::TestK::test_four PASSED         [100%]",
        "tests/a.py::TestK::test_four ERROR          [100%]",  # failed in teardown
        "E   assert 1 == 2",
    ]
    assert gpu_run.pytest_outcomes(lines) == {
        "tests/a.py::test_one": "passed",
        "tests/a.py::test_two[x-1]": "failed",
        "tests/a.py::test_three": "skipped",
        "tests/a.py::TestK::test_four": "error",
    }


def _pytest_stage(tmp_path, monkeypatch, body: str, budget: float) -> dict:
    """The pytest stage run on one test file `body`, from its rootdir (as gpu_run runs from
    the repository's root)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "test_it.py").write_text(textwrap.dedent(body))
    run = _run(tmp_path, [], budget=budget)
    return gpu_run._pytest(run, "tests", ["t", "--rootdir=."])


def test_pytest_stage_counts_and_failures(tmp_path, monkeypatch):
    outcome = _pytest_stage(
        tmp_path,
        monkeypatch,
        """
        def test_ok():
            pass

        def test_bad():
            assert 1 == 2, "one is not two"
        """,
        budget=120,
    )
    assert outcome["exit_code"] == 1 and not outcome["stopped_by_budget"]
    assert outcome["counts"] == {"passed": 1, "failed": 1}
    [failure] = outcome["failures"]
    assert failure["id"].endswith("test_it.py::test_bad")
    assert "one is not two" in failure["message"] and failure["message"].startswith("call: ")
    assert (tmp_path / outcome["log"]).is_file()


def test_pytest_stage_survives_a_crash(tmp_path, monkeypatch):
    """A test that kills the process is recorded as crashed (not as the one before it), and
    the tests after it still run, in a new process."""
    outcome = _pytest_stage(
        tmp_path,
        monkeypatch,
        """
        import os, signal

        def test_a_before():
            pass

        def test_b_crashes():
            os.kill(os.getpid(), signal.SIGSEGV)

        def test_c_fails():
            assert False, "after the crash"

        def test_d_after():
            pass
        """,
        budget=120,
    )
    assert outcome["counts"] == {"passed": 2, "failed": 1}
    assert outcome["crashes"] == 1
    by_id = {f["id"].split("::")[-1]: f["message"] for f in outcome["failures"]}
    assert set(by_id) == {"test_b_crashes", "test_c_fails"}
    assert by_id["test_b_crashes"].startswith("crashed")
    assert "after the crash" in by_id["test_c_fails"]
    assert outcome["exit_code"] == 1


def test_pytest_stage_stopped_by_the_budget_keeps_what_ran(tmp_path, monkeypatch):
    start = time.monotonic()
    outcome = _pytest_stage(
        tmp_path,
        monkeypatch,
        """
        import time

        def test_a_fast():
            pass

        def test_b_slow():
            time.sleep(600)
        """,
        budget=gpu_run.MARGIN_S + 8,
    )
    assert time.monotonic() - start < 60
    assert outcome["stopped_by_budget"] and outcome["exit_code"] is None
    assert outcome["counts"] == {"passed": 1}
    assert outcome["failures"] == []


def test_main_skips_stages_once_the_budget_is_spent(tmp_path, monkeypatch):
    """Every stage is recorded: run, or skipped for the budget; the JSON is rewritten after
    each (here with fake stages and a pretend GPU)."""
    calls = []

    def fake(name, seconds):
        def stage(run):
            calls.append(name)
            time.sleep(seconds)
            return {"ran": name}

        return gpu_run.Stage(stage, name, True)

    monkeypatch.setattr(
        gpu_run, "STAGES", {"kernels": fake("kernels", 0.0), "tests": fake("tests", 0.0)}
    )
    monkeypatch.setattr(gpu_run.torch.cuda, "is_available", lambda: True)
    # main() unsets TRITON_INTERPRET for a GPU's child processes: restored after the test.
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(gpu_run, "environment", lambda: {"device": "Fake GPU", "date": "d"})
    assert gpu_run.main(["--out", str(tmp_path), "--budget", "1"]) == 0
    assert calls == []  # under 2 * MARGIN_S left: nothing starts
    written = json.loads((tmp_path / "fake-gpu-d.json").read_text())
    assert written["stages"] == {
        "kernels": {"skipped": "budget spent"},
        "tests": {"skipped": "budget spent"},
    }
    assert gpu_run.main(["--out", str(tmp_path), "--budget", "600"]) == 0
    assert calls == ["kernels", "tests"]
    written = json.loads((tmp_path / "fake-gpu-d.json").read_text())
    assert written["stages"]["tests"]["ran"] == "tests"


def test_command_stage_logs_and_stops_at_the_budget(tmp_path):
    run = _run(tmp_path, [], budget=120)
    done = gpu_run._command(run, "job", [sys.executable, "-c", "print('main job ran')"])
    assert done["exit_code"] == 0 and not done["stopped_by_budget"]
    assert done["tail"] == ["main job ran"]
    assert "main job ran" in (tmp_path / done["log"]).read_text()
    run = _run(tmp_path, [], budget=gpu_run.MARGIN_S + 3)
    start = time.monotonic()
    stopped = gpu_run._command(run, "job", [sys.executable, "-c", "import time; time.sleep(600)"])
    assert time.monotonic() - start < 60
    assert stopped["stopped_by_budget"] and stopped["exit_code"] is None


def test_overhead_stage_runs_the_script_per_size_and_fails_with_any_run(tmp_path, monkeypatch):
    """One `bench/aot_overhead.py` process per size on CUDA; the stage fails when one does."""
    commands = []

    def fake_command(run, name, command):
        commands.append(command)
        return {"exit_code": 1 if "512" in command else 0, "stopped_by_budget": False}

    monkeypatch.setattr(gpu_run, "_command", fake_command)
    stage = gpu_run.overhead_stage(_run(tmp_path, []))
    assert [c[1:4] for c in commands] == [["bench/aot_overhead.py", "--device", "cuda"]] * 2
    sizes = [c[c.index("--batch") + 1 : c.index("--seq") + 2] for c in commands]
    assert sizes == [["8", "--seq", "128"], ["32", "--seq", "512"]]
    assert stage["exit_code"] == 1 and not stage["stopped_by_budget"]
    assert sorted(stage["runs"]) == ["overhead-b32-s512", "overhead-b8-s128"]
    # The script the stage names is the repository's, run from its root as the stage is.
    assert (Path(gpu_run.__file__).parents[1] / commands[0][1]).is_file()


def test_overhead_stage_stops_after_a_run_the_budget_stopped(tmp_path, monkeypatch):
    commands = []

    def fake_command(run, name, command):
        commands.append(command)
        return {"exit_code": None, "stopped_by_budget": True}

    monkeypatch.setattr(gpu_run, "_command", fake_command)
    stage = gpu_run.overhead_stage(_run(tmp_path, []))
    assert len(commands) == 1 and stage["stopped_by_budget"] and stage["exit_code"] == 0
