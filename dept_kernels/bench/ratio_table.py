"""The table `pytest bench --benchmark-only` prints after pytest-benchmark's own: per group,
each row's ratio to the official formula (eager and torch.compile), its memory columns and,
for a forward, its time over the copy floor; `bench/conftest.py` wires it to the hooks.

pytest-benchmark's own brackets are ratios to the group's fastest row (often the copy
floor), which answers no question a reader has. A row is one benchmark as a dict, either
pytest-benchmark's flat form (`median`, `iqr` at the top) or its JSON form (under `stats`),
with `params["impl"]` naming the implementation: `official-eager`, `official-compile`,
`copy-floor` or a library backend.
"""

from __future__ import annotations

from collections.abc import Iterable

from .verdict import NOISE_LIMIT

EAGER, COMPILE, COPY = "official-eager", "official-compile", "copy-floor"
MEMORY = {"saved for bwd": "saved_for_backward_bytes", "peak extra": "peak_extra_bytes"}


def _stat(bench: dict, name: str) -> float:
    return bench[name] if name in bench else bench["stats"][name]


def impl(bench: dict) -> str:
    """The row's implementation: its `impl` parameter, else its test name."""
    return (bench.get("params") or {}).get("impl") or bench["name"]


def size(n: int | None) -> str:
    """Bytes in MiB / KiB / B, '-' when not measured."""
    if n is None:
        return "-"
    for unit, scale in (("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def ratios(group: list[dict]) -> dict[str, dict[str, float | None]]:
    """{impl: {vs_official_eager, vs_official_compile, fwd_over_copy}}: baseline median over
    the row's (above 1 the row is faster); the row's forward median over the copy floor's."""
    medians = {impl(b): _stat(b, "median") for b in group}
    forward = (group[0].get("params") or {}).get("passes", "forward") == "forward"
    out = {}
    for name, t in medians.items():
        out[name] = {
            "vs_official_eager": medians[EAGER] / t if EAGER in medians else None,
            "vs_official_compile": medians[COMPILE] / t if COMPILE in medians else None,
            "fwd_over_copy": t / medians[COPY] if forward and COPY in medians else None,
        }
    return out


def _x(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}x"


def group_table(name: str, group: list[dict]) -> list[str]:
    """The lines of one group's table (none if it has no official-formula row)."""
    names = {impl(b) for b in group}
    if not names & {EAGER, COMPILE}:
        return []
    cols = ["median ms", "IQR ms", "vs eager", "vs compile", *MEMORY, "fwd/copy"]
    lines = [name, f"  {'implementation':24}" + "".join(f"{c:>14}" for c in cols)]
    table = ratios(group)
    for bench in group:
        label = impl(bench)
        median, iqr = _stat(bench, "median"), _stat(bench, "iqr")
        extra = bench.get("extra_info") or {}
        r = table[label]
        cells = [
            f"{median * 1e3:.3f}",
            f"{iqr * 1e3:.3f}",
            _x(r["vs_official_eager"]),
            _x(r["vs_official_compile"]),
            *(size(extra.get(key)) for key in MEMORY.values()),
            _x(r["fwd_over_copy"]),
        ]
        noisy = " (noisy)" if median and iqr / median > NOISE_LIMIT else ""
        lines.append(f"  {label:24}" + "".join(f"{c:>14}" for c in cells) + noisy)
    return lines


def summary(groups: Iterable[tuple[str | None, list[dict]]]) -> list[str]:
    """Every group's table, a legend, and a warning if any row is noisy (empty if no group
    has an official-formula row)."""
    lines: list[str] = []
    noisy = 0
    for name, group in groups:
        table = group_table(name or "(no group)", group)
        lines += table
        noisy += sum(line.endswith("(noisy)") for line in table)
    if not lines:
        return []
    lines.append(
        "vs eager / vs compile: the official formula's median (eager PyTorch / torch.compile) "
        "over the row's, above 1x the row is faster, below 1x slower; saved for bwd: bytes "
        "autograd keeps for backward; peak extra: the step's peak allocation above what was "
        "live before it; fwd/copy: a forward's median over copying an output-sized buffer."
    )
    if noisy:
        lines.append(
            f"WARNING: {noisy} row(s) marked (noisy) have an IQR above {NOISE_LIMIT:.0%} of "
            f"their median: their ratios are inconclusive on this run."
        )
    return lines


def annotate(benchmarks: list[dict]) -> None:
    """Add the ratios to each JSON benchmark's `extra_info`, grouped as the table is."""
    groups: dict[str | None, list[dict]] = {}
    for bench in benchmarks:
        groups.setdefault(bench.get("group"), []).append(bench)
    for group in groups.values():
        table = ratios(group)
        for bench in group:
            values = {k: v for k, v in table[impl(bench)].items() if v is not None}
            # A new dict: the JSON's extra_info is the live benchmark's own.
            bench["extra_info"] = {**(bench.get("extra_info") or {}), **values}
