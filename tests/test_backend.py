"""Backend selection and dispatch: process default, context manager, the deprecated plain
call, the registry's availability and loading, clear refusals."""

import threading
import warnings

import pytest
import torch

import dept_kernels
from dept_kernels import backends
from dept_kernels.backends import _registry, _selection


def test_context_manager_restores_previous_choice():
    assert dept_kernels.current_backend() is None
    with dept_kernels.use_backend("torch"):
        assert dept_kernels.current_backend() == "torch"
        with dept_kernels.use_backend("cpu"):
            assert dept_kernels.current_backend() == "cpu"
        assert dept_kernels.current_backend() == "torch"
    assert dept_kernels.current_backend() is None


def test_global_setter():
    try:
        dept_kernels.set_backend("torch")
        assert dept_kernels.current_backend() == "torch"
    finally:
        dept_kernels.set_backend(None)
    assert dept_kernels.current_backend() is None


def test_plain_call_is_a_deprecated_global_setter():
    try:
        with pytest.warns(DeprecationWarning, match="set_backend"):
            dept_kernels.use_backend("torch")
        assert dept_kernels.current_backend() == "torch"
    finally:
        dept_kernels.set_backend(None)
    assert dept_kernels.current_backend() is None


def test_with_statement_never_touches_the_process_default(monkeypatch):
    """Building the object of a `with` header sets no process default, not even briefly (other
    threads would see it), and does not warn."""

    def fail(item):
        raise AssertionError("a with statement set the process default")

    monkeypatch.setattr(_selection, "_push_default", fail)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with dept_kernels.use_backend("torch"):
            assert dept_kernels.current_backend() == "torch"
        with dept_kernels.use_backend("cpu") as chosen, dept_kernels.use_backend(None):
            assert chosen.name == "cpu" and dept_kernels.current_backend() is None


def test_entered_later_the_object_withdraws_its_process_default():
    """`ExitStack.enter_context(use_backend(x))` builds the object outside a `with` header:
    as before, its process default holds only until it is entered."""
    import contextlib

    with pytest.warns(DeprecationWarning), contextlib.ExitStack() as stack:
        stack.enter_context(dept_kernels.use_backend("torch"))
        assert dept_kernels.current_backend() == "torch"
        assert _selection._process_default() is None
    assert dept_kernels.current_backend() is None


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend must be one of"):
        dept_kernels.use_backend("tpu")
    with pytest.raises(ValueError, match="backend must be one of"):
        dept_kernels.set_backend("tpu")


def test_available_backends_here():
    names = dept_kernels.available_backends()
    assert names[-1] == "torch"
    assert "cpu" in names, "the C++ cpu backend must build on this machine"
    if not torch.cuda.is_available():
        assert "cuda" not in names


def test_available_backends_by_device():
    """With a device, only the backends that take its tensors, in the same order."""
    every = dept_kernels.available_backends()
    on_cpu = dept_kernels.available_backends("cpu")
    assert on_cpu == [n for n in every if n in on_cpu]
    assert "cpu" in on_cpu and on_cpu[-1] == "torch" and "cuda" not in on_cpu
    assert ("triton" in on_cpu) == (backends.triton_interpreting() and "triton" in every)
    on_cuda = dept_kernels.available_backends(torch.device("cuda"))
    assert "cpu" not in on_cuda and on_cuda[-1] == "torch"
    assert ("cuda" in on_cuda) == ("cuda" in every)
    with pytest.raises(RuntimeError):
        dept_kernels.available_backends("gpu0")


def test_default_is_cpu_for_cpu_tensors():
    assert backends.resolve(torch.device("cpu")) == "cpu"


def test_triton_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with dept_kernels.use_backend("triton"), pytest.raises(ValueError, match="TRITON_INTERPRET"):
        backends.resolve(torch.device("cpu"))


def test_cuda_backend_needs_cuda_tensors():
    with dept_kernels.use_backend("cuda"), pytest.raises(ValueError, match="CUDA tensors"):
        backends.resolve(torch.device("cpu"))


def test_every_backend_is_registered_and_meets_the_contract():
    assert backends.registered_backends() == ("torch", "cpu", "triton", "cuda")
    for name in backends.available_backends():
        kernels = backends.load(name)
        for method in ("forward", "reduce", "gather_add"):
            assert callable(getattr(kernels, method)), (name, method)


def test_a_backend_is_one_registration(monkeypatch):
    """A new backend (here the torch kernels under another name) is listed, selectable and
    dispatched to after one `register_backend` call."""
    monkeypatch.setattr(_registry, "_entries", dict(_registry._entries))
    monkeypatch.setattr(_registry, "_loaded", dict(_registry._loaded))
    calls = []

    def loader():
        calls.append("loaded")
        return backends.load("torch")

    backends.register_backend("mine", ("cpu",), loader, probe=lambda: None)
    with pytest.raises(ValueError, match="already registered"):
        backends.register_backend("mine", ("cpu",), loader)
    assert "mine" in backends.available_backends()
    assert calls == [], "listing loads nothing"
    ids, weight, prompt = torch.randint(0, 9, (2, 3)), torch.randn(9, 5), torch.randn(2, 5)
    with dept_kernels.use_backend("mine"):
        out = dept_kernels.dept_embedding(ids, weight, prompt)
        again = dept_kernels.dept_embedding(ids, weight, prompt)
    torch.testing.assert_close(out, again)
    assert calls == ["loaded"], "loaded once, on first use"


def test_unavailable_backend_without_fallback_says_why(monkeypatch):
    monkeypatch.setattr(_registry, "_entries", dict(_registry._entries))
    monkeypatch.setattr(_registry, "_failed", dict(_registry._failed))

    def loader():
        raise backends.BackendUnavailable("no such device here")

    backends.register_backend("broken", ("cpu",), loader)
    for _ in range(2):  # the failure is remembered, and raised each time
        with pytest.raises(backends.BackendUnavailable, match="'broken' is unavailable: no such"):
            backends.load("broken")


def _in_threads(workers, timeout=60.0) -> None:
    """Run each callable in its own thread; re-raise the first failure, bounded in time."""
    errors = []

    def guarded(fn):
        def body():
            try:
                fn()
            except BaseException as error:  # handed to the main thread below
                errors.append(error)

        return body

    threads = [threading.Thread(target=guarded(fn)) for fn in workers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
        assert not thread.is_alive(), "a worker thread hung"
    if errors:
        raise errors[0]


def test_use_backend_contexts_overlapping_across_threads_stay_local():
    """Four workers enter `with use_backend(...)` one after the other and leave in the same
    order (not nested): each sees its own choice throughout, and none leaks to the process."""
    names = ["cpu", "torch", "cpu", "torch"]
    entered = [threading.Event() for _ in names]
    left = [threading.Event() for _ in names]
    seen = {}

    def worker(i):
        def body():
            if i:
                assert entered[i - 1].wait(30)
            with dept_kernels.use_backend(names[i]):
                entered[i].set()
                assert entered[-1].wait(30)  # every context is open now
                seen[i] = dept_kernels.current_backend()
                if i:
                    assert left[i - 1].wait(30)
            left[i].set()
            seen[i, "after"] = dept_kernels.current_backend()

        return body

    _in_threads([worker(i) for i in range(len(names))])
    assert [seen[i] for i in range(len(names))] == names
    assert [seen[i, "after"] for i in range(len(names))] == [None] * len(names)
    assert dept_kernels.current_backend() is None


def test_process_default_is_seen_by_every_thread():
    seen = []
    try:
        dept_kernels.set_backend("torch")
        _in_threads([lambda: seen.append(dept_kernels.current_backend())])
        with dept_kernels.use_backend("cpu"):
            # The process default stays; this context overrides it.
            _in_threads([lambda: seen.append(dept_kernels.current_backend())])
            assert dept_kernels.current_backend() == "cpu"
        assert dept_kernels.current_backend() == "torch"
    finally:
        dept_kernels.set_backend(None)
    assert seen == ["torch", "torch"]
    assert dept_kernels.current_backend() is None


def test_context_may_choose_automatic_over_a_process_default():
    try:
        dept_kernels.set_backend("torch")
        with dept_kernels.use_backend(None):
            assert dept_kernels.current_backend() is None
            assert backends.resolve(torch.device("cpu")) == "cpu"
        assert dept_kernels.current_backend() == "torch"
    finally:
        dept_kernels.set_backend(None)


def test_ops_in_threads_run_their_own_backend(monkeypatch):
    """Ops run concurrently under different backends each dispatch to their thread's."""
    from dept_kernels.ops import dept_embedding

    ids, weight, prompt = torch.randint(0, 9, (2, 3)), torch.randn(9, 5), torch.randn(2, 5)
    expected = dept_embedding(ids, weight, prompt)
    real = backends.load
    used = {}

    def recording(name):
        used.setdefault(threading.current_thread().name, set()).add(name)
        return real(name)

    monkeypatch.setattr(backends, "load", recording)
    barrier = threading.Barrier(4, timeout=30)

    def worker(name):
        def body():
            threading.current_thread().name = f"worker-{name}"
            with dept_kernels.use_backend(name):
                barrier.wait()
                for _ in range(5):
                    torch.testing.assert_close(dept_embedding(ids, weight, prompt), expected)

        return body

    _in_threads([worker(n) for n in ("cpu", "torch", "cpu", "torch")])
    assert used == {"worker-cpu": {"cpu"}, "worker-torch": {"torch"}}


def test_compiled_op_follows_the_backend_of_each_calling_context(monkeypatch):
    """torch.compile cannot read the context variable; the compiled op resolves the backend
    at run time, so one compiled graph serves each thread with that thread's choice."""
    from dept_kernels.ops import dept_embedding

    ids, weight, prompt = torch.randint(0, 9, (2, 3)), torch.randn(9, 5), torch.randn(2, 5)
    expected = dept_embedding(ids, weight, prompt)
    torch._dynamo.reset()
    compiled = torch.compile(dept_embedding, fullgraph=True, backend="eager")
    compiled(ids, weight, prompt)  # compiled here, run below
    real = backends.load
    used = []

    def recording(name):
        used.append((threading.current_thread().name, name))
        return real(name)

    monkeypatch.setattr(backends, "load", recording)
    barrier = threading.Barrier(2, timeout=30)

    def worker(name):
        def body():
            threading.current_thread().name = name
            with dept_kernels.use_backend(name):
                barrier.wait()
                for _ in range(3):
                    torch.testing.assert_close(compiled(ids, weight, prompt), expected)

        return body

    _in_threads([worker("cpu"), worker("torch")])
    assert sorted(set(used)) == [("cpu", "cpu"), ("torch", "torch")]
