"""The main job's printout of the end-to-end part: the table of setups and its legend, the
training losses, and what the run shows as sentences (or why it shows nothing).

Rows are `end_to_end.train_setups`'s dicts; the AoT result is `end_to_end.aot_inference`'s.
"""

from __future__ import annotations

from .verdict import (
    NOISE_LIMIT,
    findings,
    noisy_rows,
    overhead_phrase,
    percent_phrase,
    speed_phrase,
)

LEGEND = (
    "Columns: s/step, median seconds per training step (forward, backward, AdamW step) "
    "over the timed steps, every setup stepping once per batch in a rotated order; IQR, "
    "the interquartile range of those step times (the batches differ in length, so for "
    "the setups padded to each batch's longest input it includes that spread too); "
    "tokens/s, real (non-padding) input tokens per second; saved MiB, bytes autograd keeps "
    "for backward per step; params, trainable parameters; vs official / vs PT, the other "
    "setup's time over this one's (above 1x this setup is faster, below 1x slower)."
)


def _row(rows: list[dict], test) -> dict | None:
    return next((r for r in rows if test(r["setup"])), None)


def _rows(rows: list[dict]) -> tuple[dict, dict, dict, dict | None]:
    """(PT, DePT fused, official path, official path patched in place or None)."""
    pt = _row(rows, lambda s: s.startswith("PT"))
    fused = _row(rows, lambda s: s.startswith("DePT") and s.endswith("fused"))
    official = _row(rows, lambda s: s.endswith("official path"))
    return pt, fused, official, _row(rows, lambda s: "in place" in s)


def end_to_end_table(rows: list[dict]) -> str:
    """The setups' table and its legend."""
    pt, _, official, _ = _rows(rows)
    lines = [
        f"{'setup':34} {'s/step':>8} {'IQR':>7} {'tokens/s':>9} {'saved MiB':>10} "
        f"{'params':>8} {'vs official':>12} {'vs PT':>7}"
    ]
    for r in rows:
        lines.append(
            f"{r['setup']:34} {r['seconds_per_step']:8.3f} {r['iqr_seconds']:7.3f} "
            f"{r['real_tokens_per_second']:9.0f} "
            f"{r['saved_for_backward_MiB']:10.1f} {r['trainable_parameters']:8d} "
            f"{official['seconds_per_step'] / r['seconds_per_step']:11.2f}x "
            f"{pt['seconds_per_step'] / r['seconds_per_step']:6.2f}x"
        )
    lines.append(LEGEND)
    return "\n".join(lines)


def losses_table(rows: list[dict]) -> str:
    """Every setup's training loss at each step (warm-up steps included, in order)."""
    width = max(len(r["losses"]) for r in rows)
    head = " ".join(f"{f'step {i + 1}':>8}" for i in range(width))
    lines = [f"training loss per step (warm-up first)\n{'setup':34} {head}"]
    for r in rows:
        lines.append(f"{r['setup']:34} " + " ".join(f"{loss:8.4f}" for loss in r["losses"]))
    return "\n".join(lines)


def end_to_end_sentences(rows: list[dict], max_length: int) -> list[str]:
    """What the table shows, in words: DePT against PT and against the official path, and
    the official model patched in place against itself unpatched."""
    pt, fused, official, in_place = _rows(rows)
    dept_params, pt_params = fused["trainable_parameters"], pt["trainable_parameters"]
    budget = (
        "at equal trainable parameters"
        if dept_params == pt_params
        else f"at about equal trainable parameters ({dept_params} vs {pt_params})"
    )
    out = [
        f"{fused['setup']} trains "
        f"{percent_phrase(pt['seconds_per_step'], fused['seconds_per_step'])} than "
        f"{pt['setup']} {budget}, and "
        f"{speed_phrase(official['seconds_per_step'], fused['seconds_per_step'])} than the "
        f"official code's path."
    ]
    if in_place is not None:
        gap = max(abs(a - b) for a, b in zip(in_place["losses"], official["losses"], strict=True))
        out.append(
            f"One call to dept_kernels.patch(model) on the official code's model, fed the same "
            f"inputs padded to {max_length}, makes its training step "
            f"{speed_phrase(official['seconds_per_step'], in_place['seconds_per_step'])} "
            f"(the patched forward cuts the {in_place['padding_fraction']:.0%} of columns that "
            f"are padding in every row and runs the fused op), with the same losses (largest "
            f"difference {gap:.1e})."
        )
    return out


def end_to_end_spreads(rows: list[dict]) -> dict[str, float]:
    """The spreads that judge the end-to-end table: the official path's, the one setup
    whose work is the same at every step (every batch padded to max_length), so that its
    spread is the machine's noise and not the batches' differing lengths."""
    _, _, official, _ = _rows(rows)
    return {f"{official['setup']} step time": official["relative_spread"]}


def aot_lines(aot: dict) -> list[str]:
    """The AoT inference measurement and, when its paired ratios agree, its sentence."""
    lines = [
        f"AoT P-tuning inference (fused tables, every encoder layer): medians "
        f"{aot['aot_fused_s']:.3f} s fused vs {aot['unpatched_s']:.3f} s unpatched per forward "
        f"over {aot['rounds_timed']} alternated rounds"
    ]
    spread = {"AoT fused / unpatched per-round ratio": aot["paired_ratio_relative_spread"]}
    ratio = aot["paired_ratio_median"]
    sentence = (
        f"The forward with fused AoT tables {overhead_phrase(ratio, 1.0)} the unpatched "
        f"forward (median of the per-round ratios)."
        if ratio is not None
        else ""
    )
    return lines + findings([sentence] if sentence else [], noisy_rows(spread, NOISE_LIMIT))


def end_to_end_report(rows: list[dict], max_length: int) -> str:
    """Table, legend, losses and the findings (or the warning) of the end-to-end part."""
    noisy = noisy_rows(end_to_end_spreads(rows))
    sentences = end_to_end_sentences(rows, max_length)
    parts = [end_to_end_table(rows), losses_table(rows), *findings(sentences, noisy)]
    return "\n".join(parts)
