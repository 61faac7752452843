"""One patched model served by several threads at once (a server's workers sharing it).

The hooks carry each forward's state (checked ids, cuts, the call a pre-hook started, the
running `generate`) to its later hooks; it is each thread's own
(`dept_kernels/models/_per_thread.py`), so concurrent forwards give what each gives alone.
Before, they raised errors about bypassed hooks, or could read one another's ids.
"""

from __future__ import annotations

import copy
import pickle
import threading

import pytest
import torch
from helpers import aot as aot_helpers
from helpers import models as model_helpers

import dept_kernels as dk

THREADS = 4
ROUNDS = 8


def concurrently(work, inputs: list) -> list:
    """`work(x)` for every input, each in its own thread, ROUNDS times, all threads released
    together; every result of every round, in input order (exceptions re-raised)."""
    start = threading.Barrier(len(inputs))
    results: list = [[] for _ in inputs]
    errors: list[BaseException] = []

    def run(k: int) -> None:
        try:
            start.wait()
            for _ in range(ROUNDS):
                results[k].append(work(inputs[k]))
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def ids_batches(seed: int, vocab: int, s: int = 12) -> list[torch.Tensor]:
    """THREADS batches of different ids and lengths (so a borrowed forward's state shows)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(2, vocab, (2, s + k), generator=gen) for k in range(THREADS)]


def assert_each_as_alone(model, forward, inputs) -> None:
    with torch.no_grad():
        alone = [forward(model, x) for x in inputs]
        together = concurrently(lambda x: forward(model, x), inputs)
    for want, got in zip(alone, together, strict=True):
        for result in got:
            torch.testing.assert_close(result, want, atol=0, rtol=0)


@pytest.mark.parametrize("arch", ["gpt2", "t5", "llama"])
@pytest.mark.parametrize("method", ["dept", "pt"])
def test_prompt_methods(arch, method):
    _, model = model_helpers.patched_pair(arch, method)
    model.eval()

    def forward(m, ids):
        if arch == "t5":
            return m(input_ids=ids, labels=ids[:, :3].contiguous()).logits
        return m(input_ids=ids).logits

    assert_each_as_alone(model, forward, ids_batches(0, model_helpers.VOCAB, s=6))


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
@pytest.mark.parametrize("arch", ["gpt2", "t5"])
def test_aot(arch, fused):
    _, model = aot_helpers.patched_pair(arch, "kron")
    if fused:
        dk.merge(model)
    model.eval()
    assert_each_as_alone(
        model, lambda m, ids: aot_helpers.run(arch, m, ids), ids_batches(1, model_helpers.VOCAB)
    )


def test_multi_task_generate():
    """Each thread's `generate` keeps its own task ids and input length."""
    models = []
    for seed in (1, 2):
        _, model = aot_helpers.patched_pair("gpt2", "fc", seed=seed)
        models.append(dk.merge(model))
    served = dk.stack_adapters(models).eval()
    ids = aot_helpers.batch(b=2, s=6)
    tasks = [torch.tensor([k % 2, k % 2]) for k in range(THREADS)]

    def generate(task_ids):
        return served.generate(input_ids=ids, task_ids=task_ids, max_new_tokens=5, do_sample=False)

    alone = [generate(t) for t in tasks]
    assert not torch.equal(alone[0], alone[1])  # the tasks' adapters differ
    for want, got in zip(alone, concurrently(generate, tasks), strict=True):
        for result in got:
            assert torch.equal(result, want)


_INSIDE, _RELEASE = threading.Event(), threading.Event()


def _hold(module, args):
    """A layer pre-hook that parks the forward until `_RELEASE` (module level: picklable)."""
    _INSIDE.set()
    _RELEASE.wait(timeout=30)


def test_copies_and_pickles_start_without_a_forwards_state():
    """A copy made while another thread is mid-forward carries none of that forward's state
    (its pending embedding call, its cuts): the state is the running forwards'."""
    _, model = model_helpers.patched_pair("gpt2", "dept")
    model.eval()
    ids = ids_batches(2, model_helpers.VOCAB)[0]
    with torch.no_grad():
        want = model(input_ids=ids).logits
    _INSIDE.clear()
    _RELEASE.clear()
    handle = model.transformer.h[0].register_forward_pre_hook(_hold)
    worker = threading.Thread(target=lambda: model(input_ids=ids))
    worker.start()
    try:
        assert _INSIDE.wait(timeout=30)
        copies = [copy.deepcopy(model), pickle.loads(pickle.dumps(model))]
    finally:
        _RELEASE.set()
        worker.join()
    handle.remove()
    for other in copies:
        hooks = other.transformer.h[0]._forward_pre_hooks
        for key in [k for k, hook in hooks.items() if hook is _hold]:
            del hooks[key]
        with torch.no_grad():
            torch.testing.assert_close(other(input_ids=ids).logits, want, atol=0, rtol=0)
