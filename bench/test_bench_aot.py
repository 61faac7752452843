"""pytest-benchmark: AoT P-tuning's inference overhead and its unique-id training step.

    pytest bench/test_bench_aot.py --benchmark-only [--benchmark-columns=median,iqr]

Two groups, each a comparison of its own rows (pytest-benchmark's brackets are ratios to the
group's fastest row; the paired group's `extra_info` holds the per-pair ratio):

- `aot inference bert-base`: a random-weight BertModel at BERT-base dims (12 layers,
  d=768, V=30522), B=16, s=128, eval, no_grad, fp32: the unpatched forward, the forward
  with fused AoT tables (a gather-add before each layer, in place) and, for context, the
  unfused Kronecker adapter. Target: fused at most 3% over unpatched. The paired group
  alternates the two forwards and records the median per-pair ratio in `extra_info`.
- `aot fc train`: one layer's FC adapter at BERT-base width, forward+backward of the adapter
  alone (gradients of hidden, W_1, b_1, W_2, b_2), B=16, s=256, ids drawn from a Zipf law
  with exponent 1 over the vocabulary, dropout 0.1: rows evaluated on the batch's distinct
  ids (`aot_fc_bias`) against per-token evaluation (`fc_rows` on all B*s ids, then a plain
  add). Target: unique ids at least 2x faster.
"""

from __future__ import annotations

import copy
import functools
import statistics
import time

import pytest
import torch

import dept_kernels as dk
from dept_kernels.bench import rotation
from dept_kernels.bench.baselines import per_token_fc
from dept_kernels.bench.shapes import ZIPF_EXPONENT, zipf_ids
from dept_kernels.bench.suite import DEVICE, sync
from dept_kernels.ops import aot_fc_bias


@functools.cache
def bert_base() -> torch.nn.Module:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(attn_implementation="sdpa")  # BERT-base dims, random weights
    return BertModel(config).to(DEVICE).eval()


def with_aot(reparam: str, fused: bool) -> torch.nn.Module:
    model = dk.patch(copy.deepcopy(bert_base()), dk.AoTConfig(reparam, r=64))
    with torch.no_grad():
        for name, p in model.dept_adapter.named_parameters():
            if name.endswith(("w_r", "w2", "b2")):
                p.normal_(0, 0.02)
    return dk.merge(model) if fused else model


INFERENCE = {
    "unpatched": bert_base,
    "aot-fused": functools.partial(with_aot, "kron", True),
    "aot-unfused-kron": functools.partial(with_aot, "kron", False),
}


@pytest.mark.parametrize("impl", list(INFERENCE))
def test_inference_overhead(benchmark, impl):
    model = INFERENCE[impl]()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (16, 128), generator=gen).to(DEVICE)
    benchmark.group = "aot inference bert-base B=16 s=128 fp32"

    def step():
        with torch.no_grad():
            model(input_ids=ids)
        sync()

    benchmark.pedantic(step, rounds=5, iterations=1, warmup_rounds=1)


def test_inference_overhead_paired(benchmark):
    """Unpatched and fused forwards alternate, so load on a shared machine hits both alike;
    `extra_info["fused_over_unpatched"]` is the median of the per-pair time ratios."""
    models = {"unpatched": INFERENCE["unpatched"](), "aot-fused": INFERENCE["aot-fused"]()}
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, models["unpatched"].config.vocab_size, (16, 128), generator=gen)
    ids = ids.to(DEVICE)
    times = {name: [] for name in models}
    order = list(models.items())[::-1]  # the fused forward first in the first pair
    benchmark.group = "aot inference bert-base B=16 s=128 fp32 (paired)"

    def pair():
        # Alternate which runs first, so neither gains from following the other.
        for name, model in rotation(order, len(times["unpatched"])):
            start = time.perf_counter()
            with torch.no_grad():
                model(input_ids=ids)
            sync()
            times[name].append(time.perf_counter() - start)

    benchmark.pedantic(pair, rounds=12, iterations=1, warmup_rounds=1)
    # The first pair is the warm-up round (pedantic runs it through `pair` too); with
    # --benchmark-disable only one pair runs and nothing is recorded.
    ratios = [f / u for f, u in zip(times["aot-fused"], times["unpatched"], strict=True)][1:]
    if ratios:
        benchmark.extra_info["fused_over_unpatched"] = statistics.median(ratios)
        for name, ts in times.items():
            benchmark.extra_info[f"{name}_median_s"] = statistics.median(ts[1:])


TRAIN = {"per-token": per_token_fc, "unique-ids": aot_fc_bias}


@pytest.mark.parametrize("impl", list(TRAIN))
@pytest.mark.parametrize("r", [64, 256])
def test_fc_training_step(benchmark, r, impl):
    batch, seq, vocab, d = 16, 256, 30522, 768
    gen = torch.Generator().manual_seed(0)
    embedding = torch.randn(vocab, d, generator=gen).to(DEVICE)
    ids = zipf_ids(batch, seq, vocab).to(DEVICE)
    hidden = torch.randn(batch, seq, d, generator=gen).to(DEVICE).requires_grad_()
    params = [
        (torch.randn(d, r, generator=gen) * d**-0.5).to(DEVICE).requires_grad_(),
        torch.zeros(r, device=DEVICE, requires_grad=True),
        (torch.randn(r, d, generator=gen) * 0.02).to(DEVICE).requires_grad_(),
        torch.zeros(d, device=DEVICE, requires_grad=True),
    ]
    grad_out = torch.randn(batch, seq, d, generator=gen).to(DEVICE)
    fn = TRAIN[impl]
    benchmark.group = f"aot fc train B={batch} s={seq} d={d} r={r} zipf={ZIPF_EXPONENT}"
    benchmark.extra_info["distinct_ids"] = int(ids.unique().numel())

    def step():
        out = fn(hidden, ids, embedding, *params, dropout_p=0.1)
        torch.autograd.grad(out, [hidden, *params], grad_out)
        sync()

    benchmark.pedantic(step, rounds=15, iterations=1, warmup_rounds=2)
