"""What a run may claim: the spread of its timings, the invariants its numbers must keep, and
the plain sentences (a gain when a gain, a loss when a loss) it prints when they hold.

A ratio of two medians only means something if the rounds behind each median agree with one
another. On a shared machine they often do not; then the job says so, with the spread it
measured, and states no ratio as a finding.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from ._timing import median_iqr

# Largest relative spread (interquartile range over median) of a row whose ratios are stated
# as findings. The claims these benchmarks test are separated by 20-25% (on par with
# torch.compile, or 1.2x-1.25x faster); the median of rounds whose IQR is 10% of it already
# moves by a few percent between runs, and a ratio of two such medians by twice that, so
# above 10% the run-to-run movement of a ratio approaches the margins being claimed.
NOISE_LIMIT = 0.10
# Rounds needed to measure a spread at all (quartiles of fewer are the samples themselves).
MIN_ROUNDS = 3

# The noisiest rows a warning names (the rest are counted).
SHOWN = 4

FWD, BOTH = "forward", "forward+backward"


def relative_spread(times: Sequence[float]) -> float:
    """Interquartile range over median of `times` (inf with fewer than MIN_ROUNDS)."""
    if len(times) < MIN_ROUNDS:
        return float("inf")
    median, iqr = median_iqr(times)
    return iqr / median


def noisy_rows(spreads: Mapping[str, float], limit: float = NOISE_LIMIT) -> dict[str, float]:
    """The rows whose relative spread (IQR / median) is above `limit`."""
    return {name: s for name, s in spreads.items() if s > limit}


def noise_warning(noisy: Mapping[str, float], limit: float = NOISE_LIMIT) -> str:
    """The warning for rows too noisy to compare (empty if none are)."""
    if not noisy:
        return ""
    ranked = sorted(noisy.items(), key=lambda kv: -kv[1])
    worst = ", ".join(
        f"{name} {s:.0%}" if s != float("inf") else f"{name} (fewer than {MIN_ROUNDS} rounds)"
        for name, s in ranked[:SHOWN]
    )
    if len(ranked) > SHOWN:
        worst += f" and {len(ranked) - SHOWN} more row(s)"
    return (
        f"WARNING: this machine was too noisy for the ratios to mean anything: spread "
        f"(IQR / median) {worst}, above the {limit:.0%} limit. Rerun on a quiet machine or "
        f"with more rounds."
    )


def kernel_violations(
    times: Mapping[str, Mapping[str, float]],
    spreads: Mapping[str, Mapping[str, float]],
    copy_floor: float,
    copy_iqr: float,
) -> list[str]:
    """Broken invariants of a kernel table ({label: {pass: median s}}, spreads in seconds):
    forward+backward no faster than the same candidate's forward, and no library row's
    forward below the copy floor by more than the larger of the two spreads."""
    out = []
    for label, t in times.items():
        if t[BOTH] < t[FWD]:
            out.append(
                f"{label}: forward+backward {t[BOTH] * 1e3:.2f} ms is below its forward "
                f"{t[FWD] * 1e3:.2f} ms"
            )
        slack = max(spreads[label][FWD], copy_iqr)
        if label.startswith("dept_kernels") and t[FWD] < copy_floor - slack:
            out.append(
                f"{label}: forward {t[FWD] * 1e3:.2f} ms is below the copy floor "
                f"{copy_floor * 1e3:.2f} ms by more than the spread ({slack * 1e3:.2f} ms)"
            )
    return out


def speed_phrase(other_s: float, this_s: float) -> str:
    """How this compares with the other, as 'N.NNx faster' or 'N.NNx slower'."""
    ratio = other_s / this_s
    if ratio >= 1:
        return f"{ratio:.2f}x faster"
    return f"{1 / ratio:.2f}x slower"


def percent_phrase(other_s: float, this_s: float) -> str:
    """'N% faster' (other's time over this one's, minus one) or 'N% slower'."""
    ratio = other_s / this_s
    if ratio >= 1:
        return f"{ratio - 1:.0%} faster"
    return f"{1 / ratio - 1:.0%} slower"


def overhead_phrase(this_s: float, base_s: float) -> str:
    """'adds N% to' (a loss) or 'takes N% less time than' (a gain)."""
    change = this_s / base_s - 1
    if change >= 0:
        return f"adds {change:.1%} to"
    return f"takes {-change:.1%} less time than"


def findings_each(
    items: Sequence[tuple[Sequence[str], Mapping[str, float]]],
    what: str,
    limit: float = NOISE_LIMIT,
) -> list[str]:
    """The lines of a run whose comparisons are judged one by one: each item is (its
    sentences, its rows' spreads), and its sentences are kept when every spread is within
    `limit`; then, if any item had a noisy row, the warning naming them and a count of the
    inconclusive `what` (e.g. "comparisons")."""
    stated: list[str] = []
    noisy: dict[str, float] = {}
    inconclusive = 0
    for sentences, spreads in items:
        loud = noisy_rows(spreads, limit)
        noisy.update(loud)
        inconclusive += bool(loud)
        if not loud:
            stated += sentences
    if noisy:
        stated += [
            noise_warning(noisy, limit),
            f"Inconclusive: {inconclusive} of {len(items)} {what} had a row above the limit; "
            "no ratio is stated for them.",
        ]
    return stated


def findings(
    sentences: Sequence[str],
    noisy: Mapping[str, float],
    violations: Sequence[str] = (),
    limit: float = NOISE_LIMIT,
) -> list[str]:
    """The lines a run prints about its ratios: the sentences when the timings hold, else
    the warning, the broken invariants and a statement that the comparison is inconclusive."""
    if not noisy and not violations:
        return list(sentences)
    lines = [noise_warning(noisy, limit)] if noisy else []
    if violations:
        lines.append("WARNING: invariants broken (a sign of load during the run):")
        lines += [f"  - {v}" for v in violations]
    lines.append("Inconclusive: no ratio of this run is stated as a finding.")
    return lines
