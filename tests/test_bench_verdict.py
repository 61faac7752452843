"""The benchmarks' honesty checks on synthetic timings (nothing here is timed): the noise
warning, the invariants, and the sentences' wording (a gain when a gain, a loss when a loss).
"""

from __future__ import annotations

import statistics

import pytest

from dept_kernels.bench import kernels, tables, verdict

QUIET = [1.00, 1.01, 0.99, 1.02, 0.98, 1.00, 1.01]  # IQR / median about 2%
NOISY = [1.0, 1.6, 0.7, 2.4, 1.1, 0.9, 3.0]  # IQR / median far above 10%


def iqr_over_median(times: list[float]) -> float:
    q1, _, q3 = statistics.quantiles(times, n=4)
    return (q3 - q1) / statistics.median(times)


def test_relative_spread_is_iqr_over_median():
    assert verdict.relative_spread(QUIET) == pytest.approx(iqr_over_median(QUIET))
    assert verdict.relative_spread(NOISY) == pytest.approx(iqr_over_median(NOISY))
    assert verdict.relative_spread([1.0, 2.0]) == float("inf")  # too few rounds to tell


def test_noisy_rows_and_warning_name_the_spread():
    spreads = {"quiet": verdict.relative_spread(QUIET), "loud": verdict.relative_spread(NOISY)}
    noisy = verdict.noisy_rows(spreads)
    assert list(noisy) == ["loud"]
    warning = verdict.noise_warning(noisy)
    assert "WARNING" in warning and "too noisy" in warning
    assert f"loud {iqr_over_median(NOISY):.0%}" in warning
    assert "10%" in warning  # the limit
    assert verdict.noise_warning({}) == ""


@pytest.mark.parametrize(
    ("other", "this", "speed", "percent"),
    [(3.0, 1.5, "2.00x faster", "100% faster"), (1.0, 1.25, "1.25x slower", "25% slower")],
)
def test_phrases_say_gain_or_loss(other, this, speed, percent):
    assert verdict.speed_phrase(other, this) == speed
    assert verdict.percent_phrase(other, this) == percent


def test_overhead_phrase():
    assert verdict.overhead_phrase(1.164, 1.0) == "adds 16.4% to"
    assert verdict.overhead_phrase(0.95, 1.0) == "takes 5.0% less time than"


def test_findings_quiet_keeps_sentences_noisy_replaces_them():
    sentences = ["A is 2.00x faster than B."]
    assert verdict.findings(sentences, {}) == sentences
    lines = verdict.findings(sentences, {"row": 0.5})
    text = "\n".join(lines)
    assert "row 50%" in text and "Inconclusive" in text
    assert "faster" not in text
    lines = verdict.findings(sentences, {}, ["x: forward+backward below forward"])
    assert "invariants broken" in lines[0] and "Inconclusive" in lines[-1]
    assert sentences[0] not in lines


def kernel_result(
    fwd: dict[str, float], both: dict[str, float], spread: float, copy: float = 1.0
) -> dict:
    """A kernel table's result from medians (ms) and one relative spread for every row."""
    labels = list(fwd)
    s = 1e-3
    return {
        "shape": {"name": "t5-base"},
        "copy_floor": copy * s,
        "copy_iqr": copy * spread * s,
        "times": {k: {"forward": fwd[k] * s, "forward+backward": both[k] * s} for k in labels},
        "iqr": {
            k: {"forward": fwd[k] * spread * s, "forward+backward": both[k] * spread * s}
            for k in labels
        },
        "relative_spread": {
            f"{k} {p}": spread for k in labels for p in ("forward", "forward+backward")
        }
        | {"copy forward": spread},
        "rounds": 20,
        "errors": {},
    }


FWD = {"official (eager)": 8.0, "official (torch.compile)": 2.0, "dept_kernels[cpu]": 1.6}
BOTH = {"official (eager)": 16.0, "official (torch.compile)": 5.0, "dept_kernels[cpu]": 4.0}


def test_kernel_report_quiet_states_the_ratios():
    text = kernels.report(kernel_result(FWD, BOTH, spread=0.02, copy=1.5))
    assert "WARNING" not in text and "Inconclusive" not in text
    # 2.0 / 1.6 = 1.25, 8.0 / 1.6 = 5.00, 5.0 / 4.0 = 1.25, 16 / 4 = 4.00; 1.6 / 1.5 = 1.07
    assert (
        "dept_kernels[cpu]: its forward is 1.25x faster than the official formula under "
        "torch.compile, 5.00x faster than the official formula in eager PyTorch; its "
        "forward+backward is 1.25x faster than the official formula under torch.compile, "
        "4.00x faster than the official formula in eager PyTorch; its forward takes 1.07x "
        "the copy floor."
    ) in text
    assert "IQR" in text and "Columns:" in text


def test_kernel_report_states_a_loss_as_a_loss():
    both = BOTH | {"dept_kernels[cpu]": 6.25}  # slower than torch.compile's 5.0
    text = kernels.report(kernel_result(FWD, both, spread=0.02, copy=1.5))
    assert "forward+backward is 1.25x slower than the official formula under torch.compile" in text


def test_kernel_report_noisy_warns_and_states_nothing():
    text = kernels.report(kernel_result(FWD, BOTH, spread=0.3, copy=1.5))
    assert "WARNING" in text and "30%" in text and "Inconclusive" in text
    assert "faster than" not in text and "slower than" not in text


def test_kernel_invariants():
    # forward+backward below forward (the symptom under load)
    both = BOTH | {"official (eager)": 6.0}
    text = kernels.report(kernel_result(FWD, both, spread=0.02, copy=1.5))
    assert "official (eager): forward+backward 6.00 ms is below its forward 8.00 ms" in text
    assert "Inconclusive" in text and "faster than" not in text
    # a library forward below the copy floor by more than the spread
    result = kernel_result(FWD, BOTH, spread=0.02, copy=2.0)
    violations = verdict.kernel_violations(
        result["times"], result["iqr"], result["copy_floor"], result["copy_iqr"]
    )
    assert violations == [
        "dept_kernels[cpu]: forward 1.60 ms is below the copy floor 2.00 ms by more than "
        "the spread (0.04 ms)"
    ]
    # ... within the spread it stands
    result = kernel_result(FWD, BOTH, spread=0.2, copy=1.7)
    assert not verdict.kernel_violations(
        result["times"], result["iqr"], result["copy_floor"], result["copy_iqr"]
    )


def e2e_rows(pt: float, fused: float, official: float, in_place: float, spread: float):
    def row(name: str, t: float, params: int) -> dict:
        return {
            "setup": name,
            "seconds_per_step": t,
            "iqr_seconds": t * spread,
            "real_tokens_per_second": 1000 / t,
            "saved_for_backward_MiB": 10.0,
            "trainable_parameters": params,
            "losses": [10.5, 10.25, 10.0],
            "relative_spread": spread,
        }

    rows = [
        row("PT (l=100)", pt, 76800),
        row("DePT (m=40, r=45), fused", fused, 76800),
        row("DePT (m=40, r=45), official path", official, 76800),
        row("official path, dk.patch in place", in_place, 76800),
    ]
    rows[-1]["padding_fraction"] = 0.75
    rows[-1]["losses"] = [10.5, 10.25, 10.00001]
    return rows


def test_main_job_quiet_sentences():
    text = tables.end_to_end_report(e2e_rows(1.2, 1.0, 2.5, 1.25, 0.03), 256)
    assert (
        "DePT (m=40, r=45), fused trains 20% faster than PT (l=100) at equal trainable "
        "parameters, and 2.50x faster than the official code's path." in text
    )
    assert "makes its training step 2.00x faster" in text and "1.0e-05" in text
    assert "Inconclusive" not in text
    # the losses, per setup and step, and the legend
    assert "training loss per step" in text and "10.2500" in text
    assert "Columns:" in text and "tokens/s" in text


def test_main_job_states_losses_as_losses():
    text = tables.end_to_end_report(e2e_rows(0.9, 1.0, 0.5, 1.25, 0.03), 256)
    assert "trains 11% slower than PT (l=100)" in text
    assert "2.00x slower than the official code's path" in text
    assert "makes its training step 2.50x slower" in text


def test_main_job_noisy_warns_with_the_spread_and_no_sentence():
    text = tables.end_to_end_report(e2e_rows(1.2, 1.0, 2.5, 1.25, 0.4), 256)
    assert "WARNING" in text and "40%" in text and "Inconclusive" in text
    assert "faster than" not in text and "slower than" not in text
    assert "training loss per step" in text  # the losses still print


def test_aot_lines():
    aot = {
        "aot_fused_s": 0.8,
        "unpatched_s": 0.7,
        "paired_ratio_median": 1.03,
        "rounds_timed": 6,
    }
    quiet = "\n".join(tables.aot_lines(aot | {"paired_ratio_relative_spread": 0.01}))
    assert "The forward with fused AoT tables adds 3.0% to the unpatched forward" in quiet
    noisy = "\n".join(tables.aot_lines(aot | {"paired_ratio_relative_spread": 0.2}))
    assert "Inconclusive" in noisy and "20%" in noisy and "adds" not in noisy


def test_warning_names_the_noisiest_rows_and_counts_the_rest():
    spreads = {f"row{i}": 0.2 + i / 100 for i in range(6)}
    warning = verdict.noise_warning(verdict.noisy_rows(spreads))
    assert warning.index("row5 25%") < warning.index("row2 22%")
    assert "row1" not in warning and "and 2 more row(s)" in warning


def test_findings_each_keeps_the_quiet_items_and_counts_the_others():
    items = [(["a holds"], {"a1": 0.02, "a2": 0.05}), (["b holds", "b too"], {"b1": 0.3})]
    lines = verdict.findings_each(items, "comparisons")
    assert lines[0] == "a holds" and "b holds" not in lines and "b too" not in lines
    assert "b1 30%" in lines[1]
    assert lines[2].startswith("Inconclusive: 1 of 2 comparisons")
    quiet = verdict.findings_each(items[:1], "comparisons")
    assert quiet == ["a holds"]
