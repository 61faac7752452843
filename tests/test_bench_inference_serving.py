"""The inference and multi-task serving parts of the main job at tiny sizes (not timings:
the machine may be loaded), and their sentences against synthetic timings."""

from __future__ import annotations

import re

import pytest
import torch

from dept_kernels.bench import end_to_end, inference, serving

TINY = (32, 8, 64, 2, 4)  # d_model, d_kv, d_ff, layers, heads
QUIET, NOISY = 0.03, 0.4


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setitem(end_to_end.T5_DIMS, "tiny", TINY)
    torch.manual_seed(0)
    return end_to_end.t5_random("tiny", vocab=128)


def test_inference_runs_through_the_trainer(tiny, one_thread):
    pytest.importorskip("accelerate")
    result = inference.run(tiny, "tiny", samples=6, batch=4, rounds=3, device="cpu")
    pt, dept = result["rows"]
    assert pt["setup"] == "PT (l=100)" and dept["setup"].startswith("DePT (m=40, r=")
    # m = 40 and r from l*d = m*d + (L + d)*r at d = 32, L = 256: r = floor(60*32 / 288) = 6
    assert dept["setup"] == "DePT (m=40, r=6)"
    assert pt["trainable_parameters"] == 100 * 32
    assert dept["trainable_parameters"] == 40 * 32 + (256 + 32) * 6
    for r in result["rows"]:
        assert r["samples_per_second"] == pytest.approx(6 / r["seconds_per_pass"])
        assert r["seconds_per_pass"] > 0 and r["iqr_seconds"] >= 0
    text = inference.report(result)
    assert "Columns:" in text and "not measured here" in text
    assert ("evaluates" in text) != ("Inconclusive" in text)


def test_collate_pads_to_the_longest_input():
    data = inference.make_dataset(5, vocab=50, seed=1)
    batch = inference.collate(data)
    lengths = [x["input_ids"].numel() for x in data]
    assert batch["input_ids"].shape == (5, max(lengths))
    assert batch["attention_mask"].sum(1).tolist() == lengths
    for i, x in enumerate(data):
        assert torch.equal(batch["input_ids"][i, : lengths[i]], x["input_ids"])
        assert (batch["input_ids"][i, lengths[i] :] == end_to_end.PAD).all()
    assert (batch["labels"][:, -1] == end_to_end.EOS).all()


def inference_result(pt_s: float, dept_s: float, spread: float, dims: str) -> dict:
    def row(name: str, t: float) -> dict:
        return {
            "setup": name,
            "samples_per_second": 64 / t,
            "seconds_per_pass": t,
            "iqr_seconds": t * spread,
            "relative_spread": spread,
            "trainable_parameters": 76800,
        }

    return {
        "dims": dims,
        "samples": 64,
        "batch": 16,
        "rounds": 5,
        "rows": [row("PT (l=100)", pt_s), row("DePT (m=40, r=45)", dept_s)],
        "paper_gain": inference.PAPER_GAIN.get(dims),
    }


def test_inference_sentence_states_gain_or_loss_beside_the_paper():
    text = inference.report(inference_result(1.1, 1.0, QUIET, "t5-base"))
    assert (
        "DePT (m=40, r=45) evaluates 10% faster than PT (l=100) at equal trainable "
        "parameters: 64.0 vs 58.2 samples/s, T5 at t5-base dims." in text
    )
    assert "the DePT paper (Figure 4, RTX 3090) reports DePT +6.5%" in text
    text = inference.report(inference_result(1.0, 1.25, QUIET, "t5-large"))
    assert "evaluates 25% slower than PT (l=100)" in text and "+18.1%" in text


def test_inference_noisy_warns_and_states_nothing():
    text = inference.report(inference_result(1.1, 1.0, NOISY, "t5-base"))
    assert "WARNING" in text and "40%" in text and "Inconclusive" in text
    assert "evaluates" not in text
    assert "+6.5%" in text  # the paper's figure is still shown, labelled


def test_serving_runs_and_mixed_batch_matches_per_task(tiny, one_thread):
    result = serving.run(tiny, per_task=2, rounds=3, new_tokens=2, device="cpu", tasks=(2,))
    rows = result["rows"]
    keys = {(r["method"].split()[0], r["pass"].split()[0], r["candidate"]) for r in rows}
    assert keys == {
        (m, p, c)
        for m in ("DePT", "AoT")
        for p in ("forward", "generate")
        for c in (serving.MIXED, serving.PER_TASK)
    }
    for r in rows:
        assert r["samples"] == 4 and r["samples_per_second"] == pytest.approx(4 / r["seconds"])
    text = serving.report(result)
    assert "Columns:" in text
    # Each of the 4 comparisons is either stated or counted as inconclusive, never both.
    stated = text.count("serves them")
    m = re.search(r"Inconclusive: (\d+) of (\d+) comparisons", text)
    inconclusive, total = (int(m[1]), int(m[2])) if m else (0, 4)
    assert total == 4 and stated + inconclusive == 4


@pytest.mark.parametrize("method", [0, 1])
def test_serving_candidates_compute_the_same_thing(tiny, method):
    """The timed candidates answer alike: the mixed batch's rows equal the per-task runs."""
    config = list(serving.configs(32).values())[method]
    model = serving.served_model(tiny, config, 3)
    batch = serving.make_requests(3, 2, 128)
    parts = serving.split_by_task(batch, 3)
    with torch.no_grad():
        mixed = model(**batch).logits
        for t, part in enumerate(parts):
            rows = batch["task_ids"] == t
            torch.testing.assert_close(model(**part).logits, mixed[rows], rtol=1e-5, atol=1e-5)
    # different tasks really differ (the adapters are not all equal)
    with torch.no_grad():
        other = model(**(batch | {"task_ids": torch.zeros_like(batch["task_ids"])})).logits
    assert not torch.allclose(other, mixed)


def serving_rows(mixed_s: float, split_s: float, spread: float) -> list[dict]:
    return [
        {
            "method": "DePT (m=40, r=45)",
            "tasks": 8,
            "pass": "forward",
            "candidate": c,
            "samples": 32,
            "seconds": t,
            "iqr_seconds": t * spread,
            "samples_per_second": 32 / t,
            "relative_spread": spread,
        }
        for c, t in ((serving.MIXED, mixed_s), (serving.PER_TASK, split_s))
    ]


def test_serving_sentences_follow_the_verdict():
    result = {"per_task": 4, "rounds": 5, "new_tokens": 4}
    text = serving.report(result | {"rows": serving_rows(0.1, 0.3, QUIET)})
    assert (
        "DePT (m=40, r=45), T=8, forward: one mixed batch of 32 samples serves them 3.00x "
        "faster than 8 per-task batches of 4 (320.0 vs 106.7 samples/s)." in text
    )
    text = serving.report(result | {"rows": serving_rows(0.2, 0.1, QUIET)})
    assert "serves them 2.00x slower than 8 per-task batches" in text
    text = serving.report(result | {"rows": serving_rows(0.1, 0.3, NOISY)})
    assert "WARNING" in text and "Inconclusive" in text and "serves them" not in text


def test_serving_states_each_quiet_comparison_and_names_the_noisy_ones():
    """Each (method, T, pass) is timed on its own, so a noisy one does not void another."""
    result = {"per_task": 4, "rounds": 5, "new_tokens": 4}
    quiet = serving_rows(0.1, 0.3, QUIET)
    loud = [r | {"pass": "generate (4 new tokens)"} for r in serving_rows(0.1, 0.5, NOISY)]
    text = serving.report(result | {"rows": quiet + loud})
    assert "T=8, forward: one mixed batch of 32 samples serves them 3.00x faster" in text
    assert "T=8, generate (4 new tokens): one mixed batch" not in text
    assert "WARNING" in text and "generate (4 new tokens), mixed batch" in text
    assert "Inconclusive: 1 of 2 comparisons" in text


def test_fill_normal_draws_on_the_cpu_and_copies():
    """The main job's non-zero weights come from a CPU generator whatever the parameters'
    device (drawing into CUDA memory from it raised on the H200), so every device gets the
    same values."""
    params = [torch.zeros(3, 4), torch.zeros(5, dtype=torch.bfloat16)]
    end_to_end.fill_normal_(params, 0.5, torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(3)
    expected = [torch.randn(3, 4, generator=gen) * 0.5, torch.randn(5, generator=gen) * 0.5]
    assert torch.equal(params[0], expected[0])
    assert torch.equal(params[1], expected[1].to(torch.bfloat16))
