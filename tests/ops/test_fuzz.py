"""Fuzzing the public ops: random arguments, some of them bad, on every backend.

Each example draws shapes, dtypes, index modes, layouts (non-contiguous, broadcast, sliced,
aliased memory) and sometimes one out-of-range index, then runs the op on every backend,
half the time concurrently in threads, each under its own `use_backend`. The oracles below
are the design's formulas in float64, with their own validity rules: an input they reject
must make every backend raise ValueError, IndexError or TypeError naming a bad argument
(never crash, never return a result); an input they accept must give their output and
gradients.

Hypothesis supplies one seed per example (derandomised: CI runs the same ones) and the case
is drawn from it with `random.Random`, which covers the choices evenly; hypothesis's own
draws favour first and boundary values, which left a third of the examples empty. A
failing example is reported with its seed and the drawn case. Shapes stay small, so the file
runs in well under a minute.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable

import torch
import torch.nn.functional as F
from helpers import BACKENDS, DEVICE, TOLERANCES, assert_close
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st

import dept_kernels
from dept_kernels.ops import aot_bias_add, aot_fc_bias, aot_kron_bias, dept_embedding

SETTINGS = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
SEEDS = st.integers(0, 2**32 - 1)

BAD_INPUT = (ValueError, IndexError, TypeError)
FLOATS = [torch.float32, torch.float16, torch.bfloat16]
ID_DTYPES = [torch.int64, torch.int32]
ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "tanh": torch.tanh, "silu": F.silu}


class Invalid(Exception):
    """Raised by an oracle: the input breaks the contract; args name the bad arguments."""


def check_range(names: tuple[str, ...], ids: torch.Tensor | None, upper: int) -> None:
    """The oracles' own range rule (independent of the ops' checks)."""
    if ids is not None and ids.numel() and not (int(ids.min()) >= 0 and int(ids.max()) < upper):
        raise Invalid(*names)


def oracle(fn: Callable[[], object]):
    """`fn()`, or the `Invalid` it raised."""
    try:
        return fn()
    except Invalid as invalid:
        return invalid


def run_backends(call: Callable[[], object], concurrent: bool) -> dict[str, object]:
    """`call()` under each backend: its result, or the exception it raised. Concurrently,
    every backend runs in its own thread at once (bounded by a join timeout)."""
    results: dict[str, object] = {}

    def one(name: str) -> None:
        try:
            with dept_kernels.use_backend(name):
                results[name] = call()
        except Exception as error:  # judged against the oracle below
            results[name] = error

    if not concurrent:
        for name in BACKENDS:
            one(name)
        return results
    barrier = threading.Barrier(len(BACKENDS), timeout=60)

    def synchronised(name: str) -> None:
        barrier.wait()
        one(name)

    threads = [threading.Thread(target=synchronised, args=(n,)) for n in BACKENDS]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
        assert not thread.is_alive(), "a backend hung"
    return results


def judge(results: dict[str, object], expected, compare: Callable[[object, object], None]):
    """Every backend raised a clear error naming a bad argument, or matched the oracle."""
    event(f"invalid {expected.args[0]}" if isinstance(expected, Invalid) else "valid")
    for name, got in results.items():
        if isinstance(expected, Invalid):
            assert isinstance(got, BAD_INPUT), f"{name}: bad input {expected.args} gave {got!r}"
            assert any(arg in str(got) for arg in expected.args), (
                f"{name}: the error does not name {expected.args}: {got}"
            )
        else:
            if isinstance(got, Exception):
                raise AssertionError(f"{name} raised on a valid input") from got
            compare(got, expected)


def sizes(rng: random.Random, *highs: int) -> list[int]:
    """Sizes in [1, high] each; one example in eight has one of them 0 (an empty input)."""
    out = [rng.randint(1, high) for high in highs]
    if rng.random() < 1 / 8:
        out[rng.randrange(len(out))] = 0
    return out


def randn(rng: random.Random, *shape: int, dtype=torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(rng.getrandbits(32))
    return torch.randn(shape, generator=gen).to(DEVICE, dtype)


def randint(rng: random.Random, high: int, *shape: int, dtype=torch.int64) -> torch.Tensor:
    gen = torch.Generator().manual_seed(rng.getrandbits(32))
    return torch.randint(0, high, shape, generator=gen).to(DEVICE, dtype)


def layout(rng: random.Random, x: torch.Tensor) -> torch.Tensor:
    """`x`, or the same values in a non-contiguous layout (column-major, or a slice)."""
    kind = rng.choice(["contiguous", "transposed", "sliced"])
    if x.dim() < 2 or kind == "contiguous":
        return x
    if kind == "transposed":
        return x.transpose(-1, -2).contiguous().transpose(-1, -2)
    wide = torch.zeros(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype, device=x.device)
    wide[..., ::2] = x
    return wide[..., ::2]


def bad_id(rng: random.Random, upper: int) -> int:
    """An id just outside [0, upper), or far outside (a kernel reading it would crash)."""
    return rng.choice([upper, upper + 3, -1, 2**31 - 1])


def corrupt(rng: random.Random, ids: torch.Tensor, upper: int) -> torch.Tensor:
    """A copy of `ids` with one entry outside [0, upper)."""
    bad = ids.contiguous().clone()
    bad.view(-1)[rng.randrange(bad.numel())] = bad_id(rng, upper)
    return bad


def leaf64(x: torch.Tensor | None) -> torch.Tensor | None:
    return None if x is None else x.detach().double().requires_grad_(x.requires_grad)


# --------------------------------------------------------------------------- dept_embedding

MODES = ["prompt", "positions", "position_ids", "same_tensor", "token"]


def dept_case(rng: random.Random) -> tuple[dict, torch.dtype, str]:
    """dept_embedding's keyword arguments, the table's dtype, and the index mode."""
    batch, seq = sizes(rng, 3, 8)
    vocab, d, m, r = rng.randint(1, 12), rng.randint(1, 9), rng.randint(0, 3), rng.randint(0, 3)
    wdtype = rng.choice(FLOATS)
    pdtype = rng.choice([torch.float32, wdtype])
    mode = rng.choice(MODES)
    lowrank = mode != "prompt"
    tasks = rng.randint(0, 3) if (m or lowrank) else 0  # 0: no task_ids
    lead = (tasks,) if tasks else ()
    id_dtype = rng.choice(ID_DTYPES)

    def param(*shape: int) -> torch.Tensor:
        return layout(rng, randn(rng, *lead, *shape, dtype=pdtype)).requires_grad_()

    # L >= s, except for one tensor as ids and positions: valid where ids < min(V, L),
    # and L may be below V, so some ids are valid tokens but rows past lora_a's end.
    max_len = seq + rng.randint(0 if seq else 1, 3)
    if mode == "same_tensor":
        max_len = rng.randint(1, 12)
    ids = layout(rng, randint(rng, vocab, batch, seq, dtype=id_dtype))
    weight = layout(rng, randn(rng, vocab, d, dtype=wdtype)).requires_grad_(rng.random() < 0.5)
    kw: dict = {"input_ids": ids, "weight": weight, "scaling": rng.choice([0.0, 0.5, -1.25])}
    if m:
        if rng.random() < 0.5:
            row = randn(rng, *lead, 1, d, dtype=pdtype).requires_grad_()
            kw["prompt"] = row.expand(*lead, m, d)  # a stride-0 broadcast, as EPT passes
        else:
            kw["prompt"] = param(m, d)
    if lowrank:
        kw["lora_a"] = param(vocab if mode == "token" else max_len, r)
        kw["lora_b"] = param(r, d)
    if mode == "token":
        kw["index"] = "token"
    if mode == "position_ids":
        kw["position_ids"] = layout(rng, randint(rng, max_len, batch, seq, dtype=id_dtype))
    if mode == "same_tensor":
        kw["position_ids"] = ids
    if tasks:
        kw["task_ids"] = randint(rng, tasks, batch, dtype=id_dtype)
    if batch * seq and rng.random() < 0.25:
        if mode == "same_tensor":
            kw["input_ids"] = kw["position_ids"] = corrupt(rng, ids, max_len)
        elif mode == "position_ids" and rng.random() < 0.5:
            kw["position_ids"] = corrupt(rng, kw["position_ids"], max_len)
        else:
            kw["input_ids"] = corrupt(rng, ids, vocab)
    elif tasks and batch and rng.random() < 0.2:
        kw["task_ids"] = corrupt(rng, kw["task_ids"], tasks)
    return kw, wdtype, mode


def dept_formula(kw: dict) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """out[b, :m] = P; out[b, m + t] = E[ids[b, t]] + scaling * (A[row(b, t)] @ B), in
    float64, with each sample's task's parameters; row = t, position_ids[b, t], or
    ids[b, t] (token mode). Returns the output and the float64 copies of the op's inputs
    that require grad (weight, prompt, lora_a, lora_b order)."""
    ids, weight = kw["input_ids"], kw["weight"]
    batch, seq = ids.shape
    prompt, lora_a, lora_b = kw.get("prompt"), kw.get("lora_a"), kw.get("lora_b")
    positions, task_ids = kw.get("position_ids"), kw.get("task_ids")
    check_range(("input_ids",), ids, weight.shape[0])
    if lora_a is not None:
        if kw.get("index") == "token":
            rows = ids
        elif positions is not None:
            check_range(("position_ids",), positions, lora_a.shape[-2])
            rows = positions
        else:
            rows = torch.arange(seq, device=DEVICE).expand(batch, seq)
    if task_ids is not None:
        num_tasks = next(x.shape[0] for x in (prompt, lora_a) if x is not None)
        check_range(("task_ids",), task_ids, num_tasks)
    inputs = (weight, prompt, lora_a, lora_b)
    w64, p64, a64, b64 = leaves = [leaf64(x) for x in inputs]

    def per_sample(x: torch.Tensor) -> torch.Tensor:  # (B, ...): each sample's parameters
        return x.expand(batch, *x.shape) if task_ids is None else x[task_ids.long()]

    out = w64[ids.long()]
    if a64 is not None:
        a = per_sample(a64)[torch.arange(batch, device=DEVICE)[:, None], rows.long()]
        out = out + kw["scaling"] * (a @ per_sample(b64))
    if p64 is not None:
        out = torch.cat([per_sample(p64), out], dim=1)
    grads_of = [x64 for x64, x in zip(leaves, inputs, strict=True) if x is not None]
    return out, [x64 for x64 in grads_of if x64.requires_grad]


@SETTINGS
@given(SEEDS)
def test_fuzz_dept_embedding(seed):
    rng = random.Random(seed)
    kw, wdtype, mode = dept_case(rng)
    concurrent = rng.random() < 0.5
    note(f"{kw}, concurrent={concurrent}")
    r = kw["lora_a"].shape[-1] if "lora_a" in kw else None
    event(f"{mode}, r={r}, {'empty' if not kw['input_ids'].numel() else 'tokens'}")
    inputs = [kw[n] for n in ("weight", "prompt", "lora_a", "lora_b") if n in kw]
    inputs = [x for x in inputs if x.requires_grad]
    expected = oracle(lambda: dept_formula(kw))
    grad_out = None
    if not isinstance(expected, Invalid):
        out64, leaves = expected
        grad_out = randn(rng, *out64.shape, dtype=wdtype)
        grads64 = torch.autograd.grad(out64, leaves, grad_out.double()) if leaves else ()
        expected = (out64, grads64)

    def call():
        out = dept_embedding(**kw)
        # Without allow_unused: every factor given gets a gradient (zeros when unused).
        return out, torch.autograd.grad(out, inputs, grad_out) if inputs else ()

    def compare(got, want):
        (out, grads), (out64, grads64) = got, want
        assert out.dtype == wdtype and out.shape == out64.shape
        assert_close(out, out64, wdtype)
        for g, x, g64 in zip(grads, inputs, grads64, strict=True):
            assert g.shape == x.shape and g.dtype == x.dtype
            assert_close(g, g64, wdtype)

    judge(run_backends(call, concurrent), expected, compare)


# --------------------------------------------------------------------------- aot_bias_add


def bias_case(rng: random.Random):
    """A factory of fresh inputs (each in-place call needs its own), and the options."""
    seed = rng.getrandbits(32)
    batch, seq = sizes(rng, 3, 8)
    d, vocab, tasks = rng.randint(2, 9), rng.randint(1, 12), rng.randint(0, 3)
    hdtype, tdtype = rng.choice(FLOATS), rng.choice(FLOATS)
    inplace = rng.random() < 0.5
    # In place, hidden may be a view of the table's memory, or the ids a view of hidden's.
    alias = rng.choice(["none", "hidden_in_table", "ids_in_hidden"]) if inplace else "none"
    if alias == "hidden_in_table":
        tdtype = hdtype
        vocab = max(vocab, -(-batch * seq // max(tasks, 1)))  # rows enough for hidden
    if alias == "ids_in_hidden":
        hdtype, d = torch.float32, d + d % 2  # int64 ids over two floats each, whole rows
    id_dtype = torch.int64 if alias == "ids_in_hidden" else rng.choice(ID_DTYPES)
    strided = not inplace and rng.random() < 0.5
    bad = None
    if batch * seq and rng.random() < 0.25:
        bad = rng.choice(["input_ids", "task_ids"] if tasks else ["input_ids"])
    bad_value, bad_at = bad_id(rng, vocab), rng.randrange(max(batch * seq, 1))

    def make():
        g = random.Random(seed)
        shape = (tasks, vocab, d) if tasks else (vocab, d)
        table = randn(g, *shape, dtype=tdtype)
        if alias == "hidden_in_table":
            hidden = table.view(-1, d)[: batch * seq].view(batch, seq, d)
        else:
            hidden = randn(g, batch, seq, d, dtype=hdtype)
        values = randint(g, vocab, batch, seq, dtype=id_dtype)
        task_ids = randint(g, tasks, batch) if tasks else None
        if bad == "input_ids":
            values.view(-1)[bad_at] = bad_value
        if bad == "task_ids":
            task_ids[bad_at % batch] = tasks
        if alias == "ids_in_hidden":
            ids = hidden.view(torch.int64).view(-1)[: batch * seq].view(batch, seq)
            ids.copy_(values)
        else:
            ids = values
        if strided:
            hidden = hidden.transpose(0, 1).contiguous().transpose(0, 1)
            ids = ids.transpose(0, 1).contiguous().transpose(0, 1)
        if not inplace:
            hidden.requires_grad_()
            table.requires_grad_()
        return hidden, ids, table, task_ids

    return make, inplace, alias, hdtype, tdtype


def bias_formula(hidden, ids, table, task_ids) -> torch.Tensor:
    """hidden[b, t] + table[ids[b, t]] (or table[task_ids[b], ids[b, t]]), in float64."""
    check_range(("input_ids",), ids, table.shape[-2])
    if task_ids is not None:
        check_range(("task_ids",), task_ids, table.shape[0])
        rows = table.double()[task_ids.long()[:, None], ids.long()]
    else:
        rows = table.double()[ids.long()]
    return hidden.double() + rows


@SETTINGS
@given(SEEDS)
def test_fuzz_aot_bias_add(seed):
    rng = random.Random(seed)
    make, inplace, alias, hdtype, tdtype = bias_case(rng)
    concurrent = rng.random() < 0.5
    hidden, ids, table, task_ids = make()
    note(f"{hidden=}, {ids=}, {table=}, {task_ids=}, {inplace=}, {concurrent=}")
    event(f"inplace={inplace}, alias={alias}")
    # The oracle reads copies: in place, hidden (and aliased inputs) change under the op.
    copies = [None if x is None else x.detach().clone() for x in (hidden, ids, table, task_ids)]
    expected = oracle(lambda: bias_formula(*copies))
    grad_out = randn(rng, *hidden.shape, dtype=hdtype)

    def call():
        hidden, ids, table, task_ids = make()  # each backend's own copy
        if inplace:
            with torch.no_grad():
                out = aot_bias_add(hidden, ids, table, task_ids=task_ids, inplace=True)
            assert out is hidden
            return out, ()
        out = aot_bias_add(hidden, ids, table, task_ids=task_ids)
        return out, torch.autograd.grad(out, (hidden, table), grad_out)

    def compare(got, want):
        out, grads = got
        assert out.dtype == hdtype and out.shape == want.shape
        assert_close(out, want, hdtype)
        if grads:
            # d hidden = G; d table[row] = the sum of G over the tokens that read row.
            table64 = table.detach().double().requires_grad_()
            index = (ids.long(),) if task_ids is None else (task_ids.long()[:, None], ids.long())
            (d_table,) = torch.autograd.grad(table64[index], table64, grad_out.double())
            assert_close(grads[0], grad_out, hdtype)
            assert grads[1].dtype == tdtype
            # Summed in fp32, then rounded to the table's dtype.
            assert_close(grads[1], d_table, max(hdtype, tdtype, key=TOLERANCES.get))

    judge(run_backends(call, concurrent), expected, compare)


# --------------------------------------------------------------------------- reparameterised


def reparam_case(rng: random.Random):
    batch, seq = sizes(rng, 3, 8)
    d, hdtype = rng.randint(1, 9), rng.choice(FLOATS)
    hidden = layout(rng, randn(rng, batch, seq, d, dtype=hdtype)).requires_grad_()
    kind, r = rng.choice(["kron", "fc"]), rng.randint(1, 3)

    def param(*shape: int) -> torch.Tensor:
        return layout(rng, randn(rng, *shape)).requires_grad_()

    if kind == "kron":
        a, b = rng.randint(1, 4), rng.randint(1, 4)
        vocab, weights, extra = a * b, [param(a, r), param(b, r), param(r * r, d)], {}
    else:
        vocab, e = rng.randint(1, 12), rng.randint(1, 6)
        embedding = layout(rng, randn(rng, vocab, e, dtype=hdtype))  # frozen, as the model's
        weights = [embedding, param(e, r), param(r), param(r, d), param(d)]
        extra = {"activation": rng.choice(sorted(ACTIVATIONS))}
    ids = layout(rng, randint(rng, vocab, batch, seq, dtype=rng.choice(ID_DTYPES)))
    if batch * seq and rng.random() < 0.25:
        ids = corrupt(rng, ids, vocab)
    return kind, hidden, ids, weights, extra, hdtype


def reparam_formula(kind, hidden, ids, weights, extra):
    """Kronecker: P_x = (W_L[x // b] ⊗ W_M[x % b]) @ W_R; FC: P_x = f(E[x] @ W_1 + b_1) @ W_2
    + b_2; out = hidden + P[ids], in float64. Returns the output and the float64 copies of
    the inputs that require grad (hidden first)."""
    leaves = [leaf64(x) for x in (hidden, *weights)]
    h64, *w64 = leaves
    x = ids.long()
    if kind == "kron":
        w_l, w_m, w_r = w64
        b = w_m.shape[0]
        check_range(("input_ids",), ids, w_l.shape[0] * b)
        kron = (w_l[x // b][..., :, None] * w_m[x % b][..., None, :]).flatten(-2)
        bias = kron @ w_r
    else:
        embedding, w1, b1, w2, b2 = w64
        check_range(("input_ids",), ids, embedding.shape[0])
        bias = ACTIVATIONS[extra["activation"]](embedding[x] @ w1 + b1) @ w2 + b2
    return h64 + bias, [x64 for x64 in leaves if x64.requires_grad]


@SETTINGS
@given(SEEDS)
def test_fuzz_aot_reparameterised(seed):
    rng = random.Random(seed)
    kind, hidden, ids, weights, extra, hdtype = reparam_case(rng)
    concurrent = rng.random() < 0.5
    note(f"{kind=}, {hidden=}, {ids=}, {weights=}, {extra=}, {concurrent=}")
    event(kind)
    inputs = [x for x in (hidden, *weights) if x.requires_grad]
    expected = oracle(lambda: reparam_formula(kind, hidden, ids, weights, extra))
    grad_out = randn(rng, *hidden.shape, dtype=hdtype)
    if not isinstance(expected, Invalid):
        out64, leaves = expected
        expected = (out64, torch.autograd.grad(out64, leaves, grad_out.double()))
    op = aot_kron_bias if kind == "kron" else aot_fc_bias

    def call():
        out = op(hidden, ids, *weights, **extra)
        return out, torch.autograd.grad(out, inputs, grad_out)

    def compare(got, want):
        (out, grads), (out64, grads64) = got, want
        assert out.dtype == hdtype and out.shape == out64.shape
        assert_close(out, out64, hdtype)
        for g, x, g64 in zip(grads, inputs, grads64, strict=True):
            assert g.shape == x.shape
            # From G in hidden's dtype; the factors' gradients accumulate in fp32.
            assert_close(g, g64, hdtype)

    judge(run_backends(call, concurrent), expected, compare)
