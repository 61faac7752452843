"""Markdown tables and a speed-up plot from the kernel benchmarks' pytest-benchmark JSON.

    pytest bench --benchmark-only --benchmark-json=bench/results/NAME.json
    python bench/report.py bench/results/NAME.json [more.json ...] [--out bench/results/NAME.png]

Reads the groups of `bench/test_bench_dept_embedding.py` and `bench/test_bench_aot_ops.py`
(one group per (op, shape, dtype, pass)) and prints, per op and library backend, one row
per group: the backend's median time, its speed-up over the official formula in eager
PyTorch, under torch.compile and over the library's torch reference backend (baseline
median / backend median, both from the same run), the bytes autograd saves for backward
(the backend's, then the official eager formula's), the peak extra memory of the step
(same order) and, where the group has the bandwidth floor, forward time over copy time.
Groups of other suites in the files (e.g. `test_bench_aot.py`'s) are left out.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from dept_kernels.bench.ratio_table import size

EAGER, COMPILE, COPY = "official-eager", "official-compile", "copy-floor"
REFERENCE = "dept_kernels-torch"
BASELINES = {"eager": EAGER, "torch.compile": COMPILE, "torch reference": REFERENCE}
PASSES = ("forward", "forward+backward")

Key = tuple[str, str, str, str]  # (op, shape, dtype, pass)


def load(paths: list[Path]) -> dict[Key, dict[str, dict]]:
    """{(op, shape, dtype, pass): {impl: benchmark}}, in the files' order; a later file's
    result replaces an earlier one's for the same row."""
    groups: dict[Key, dict[str, dict]] = defaultdict(dict)
    for path in paths:
        for bench in json.loads(path.read_text())["benchmarks"]:
            params = bench.get("params") or {}
            if not {"shape", "dtype", "passes", "impl"} <= params.keys():
                continue
            op = params.get("op") or bench["group"].split()[0]
            groups[op, params["shape"], params["dtype"], params["passes"]][params["impl"]] = bench
    return groups


def median(bench: dict | None) -> float | None:
    return None if bench is None else bench["stats"]["median"]


def library_backends(groups: dict[Key, dict[str, dict]]) -> list[str]:
    """The library backends measured (every dept_kernels-* row but the torch reference)."""
    names = {impl for rows in groups.values() for impl in rows}
    return sorted(n for n in names if n.startswith("dept_kernels-") and n != REFERENCE)


def ratio(numerator: float | None, denominator: float | None, digits: int = 1) -> str:
    if numerator is None or denominator is None:
        return "-"
    return f"{numerator / denominator:.{digits}f}x"


def extra(bench: dict | None, name: str) -> int | None:
    return None if bench is None else bench.get("extra_info", {}).get(name)


def table(groups: dict[Key, dict[str, dict]], op: str, backend: str) -> str | None:
    """The Markdown table of one op and library backend (None if it was not measured)."""
    label = backend.removeprefix("dept_kernels-")
    header = (
        [
            "shape",
            "dtype",
            "pass",
            f"{label} ms",
        ]
        + [f"vs official {b}" if b != "torch reference" else f"vs {b}" for b in BASELINES]
        + ["saved for backward (lib / eager)", "peak extra (lib / eager)", "fwd / copy"]
    )
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (g_op, shape, dtype, passes), rows in groups.items():
        if g_op != op or backend not in rows:
            continue
        lib = rows[backend]
        t = median(lib)
        cells = [shape, dtype, passes, f"{t * 1e3:.2f}"]
        cells += [ratio(median(rows.get(impl)), t) for impl in BASELINES.values()]
        for name in ("saved_for_backward_bytes", "peak_extra_bytes"):
            cells.append(f"{size(extra(lib, name))} / {size(extra(rows.get(EAGER), name))}")
        copy = median(rows.get(COPY)) if passes == "forward" else None
        cells.append(ratio(t, copy, 2))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) if len(lines) > 2 else None


def plot(groups: dict[Key, dict[str, dict]], path: Path) -> None:
    """Bars of each library backend's speed-up over each baseline, one panel per op."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    ops = list(dict.fromkeys(key[0] for key in groups))
    backends = library_backends(groups)
    series = [(b, name, impl) for b in backends for name, impl in BASELINES.items()]
    fig, axes = plt.subplots(len(ops), 1, figsize=(12, 3.6 * len(ops)), squeeze=False)
    width = 0.8 / len(series)
    for ax, op in zip(axes[:, 0], ops, strict=True):
        keys = [k for k in groups if k[0] == op]
        for i, (backend, name, impl) in enumerate(series):
            xs, ys = [], []
            for x, key in enumerate(keys):
                base, lib = median(groups[key].get(impl)), median(groups[key].get(backend))
                if base is not None and lib is not None:
                    xs.append(x + (i - (len(series) - 1) / 2) * width)
                    ys.append(base / lib)
            label = f"{backend.removeprefix('dept_kernels-')} vs {name}"
            ax.bar(xs, ys, width, label=label)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log", base=2)
        # Ticks at 1x, 1.5x, 2x, 3x, 4x, 6x, ... (and below 1x): a panel spanning less than
        # a factor of two still gets a labelled tick above 1x.
        ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(base=2, subs=(1.0, 1.5)))
        ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_ylabel("speed-up (x)")
        ax.set_title(op)
        ax.set_xticks(range(len(keys)))
        ax.set_xticklabels(
            [f"{s}\n{d}\n{'fwd' if p == 'forward' else 'fwd+bwd'}" for _, s, d, p in keys],
            fontsize=7,
        )
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(series), 6), frameon=False)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", nargs="+", type=Path, help="pytest-benchmark JSON files")
    parser.add_argument("--out", type=Path, help="write the speed-up plot (PNG) here")
    args = parser.parse_args(argv)
    groups = load(args.json)
    if not groups:
        parser.error("no DePT embedding or AoT op benchmarks in these files")
    for op in dict.fromkeys(key[0] for key in groups):
        for backend in library_backends(groups):
            text = table(groups, op, backend)
            if text:
                print(f"### {op}, {backend.removeprefix('dept_kernels-')} backend\n\n{text}\n")
    print(
        "Speed-up = baseline median / library median, within one run. Saved for backward: "
        "bytes autograd keeps for backward; peak extra: the step's peak allocation above "
        "what was live before it."
    )
    if args.out:
        plot(groups, args.out)
        print(f"\nplot: {args.out}")


if __name__ == "__main__":
    main()
