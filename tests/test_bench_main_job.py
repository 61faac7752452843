"""The main job (`python -m dept_kernels.bench`) end to end at tiny sizes (not a timing: the
machine may be loaded, so either the findings or the warning may print, never both)."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from dept_kernels.bench import end_to_end, kernels, serving
from dept_kernels.bench.shapes import Shape


def test_main_job_prints_table_losses_and_findings_or_warning(
    monkeypatch, tmp_path, capsys, one_thread
):
    pytest.importorskip("tqdm")
    from dept_kernels.bench.__main__ import main

    monkeypatch.setitem(end_to_end.T5_DIMS, "tiny", (32, 8, 64, 2, 4))
    monkeypatch.setattr(serving, "DIMS", "tiny")
    monkeypatch.setattr(serving, "VOCAB", 128)
    monkeypatch.setattr(serving, "TASKS", (2,))
    tiny = Shape("t5-base", 2, 16, 32, 100, 4, 4, 16)
    monkeypatch.setitem(kernels.SHAPES, "t5-base", tiny)
    # Compiling the baseline takes most of a minute on a small CPU; the flow is what is
    # tested here, so the "compiled" row runs eagerly.
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    args = ["--dims", "tiny", "--steps", "3", "--batch", "2", "--repeats", "4"]
    args += ["--inference-rounds", "3", "--inference-samples", "4", "--serving-rounds", "3"]
    main([*args, "--serving-per-task", "2", "--aot-rounds", "4", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "Columns: s/step" in out and "training loss per step" in out
    results = json.loads((tmp_path / "results.json").read_text())
    rows = results["end_to_end"]
    for r in rows:  # every setup's losses, printed as computed
        assert all(f"{loss:8.4f}" in out for loss in r["losses"])
    fused, pt = rows[1], rows[0]
    if "Inconclusive" in out:
        assert "WARNING" in out
    else:
        assert "trains" in out and "than PT (l=100)" in out
    gain = pt["seconds_per_step"] / fused["seconds_per_step"]
    # The training sentence, when printed (the inference part's sentence also names
    # "than PT (l=100)"), states what the rows' times show.
    if "fused trains" in out:
        phrase = f"{gain - 1:.0%} faster" if gain >= 1 else f"{1 / gain - 1:.0%} slower"
        assert f"fused trains {phrase} than PT" in out
    kernel = results["kernels"][0]
    assert set(kernel["iqr"]) == set(kernel["times"]) and kernel["rounds"] == 4
    assert "IQR" in out and "copy (bandwidth floor)" in out
    # The plot needs matplotlib (the bench extra); the tables and results.json do not.
    has_plot = importlib.util.find_spec("matplotlib") is not None
    assert (tmp_path / "results.png").exists() == has_plot
    # the inference and serving parts, printed and written
    (inference,) = results["inference"]
    assert inference["dims"] == "tiny" and len(inference["rows"]) == 2
    assert "Inference (Trainer.predict, 4 samples" in out
    assert {r["candidate"] for r in results["serving"]["rows"]} == {
        "mixed batch",
        "per-task batches",
    }
    assert len(results["serving"]["rows"]) == 2 * 2 * 2  # methods x passes x candidates
    assert "Multi-task serving (2 samples per task" in out


def test_main_job_skips_inference_and_serving(monkeypatch, tmp_path, capsys, one_thread):
    pytest.importorskip("tqdm")
    from dept_kernels.bench import __main__ as job

    monkeypatch.setitem(end_to_end.T5_DIMS, "tiny", (32, 8, 64, 2, 4))
    monkeypatch.setitem(kernels.SHAPES, "t5-base", Shape("t5-base", 2, 16, 32, 100, 4, 4, 16))
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)

    def unexpected(*args, **kwargs):
        raise AssertionError("a skipped part ran")

    monkeypatch.setattr(job.inference, "run", unexpected)
    monkeypatch.setattr(job.serving, "run", unexpected)
    args = ["--dims", "tiny", "--steps", "1", "--batch", "2", "--repeats", "3"]
    job.main([*args, "--no-inference", "--no-serving", "--out", str(tmp_path)])
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["inference"] == [] and results["serving"] is None
    assert "Multi-task serving" not in capsys.readouterr().out
    # without accelerate (the Trainer needs it) the inference part says why it is skipped
    monkeypatch.setattr(job.inference, "unavailable", lambda: "the Trainer needs accelerate")
    job.main([*args, "--no-serving", "--out", str(tmp_path)])
    assert "Inference part skipped: the Trainer needs accelerate." in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--aot-rounds", "1"], "--aot-rounds: must be at least 2, got 1"),
        (["--steps", "0"], "--steps: must be at least 1, got 0"),
        (["--repeats", "-3"], "--repeats: must be at least 1, got -3"),
    ],
)
def test_main_job_rejects_too_few_rounds(argv, message, capsys):
    from dept_kernels.bench.__main__ import main

    with pytest.raises(SystemExit):
        main(argv)
    assert message in capsys.readouterr().err
