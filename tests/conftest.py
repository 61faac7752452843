"""Test setup: Triton runs under its interpreter on machines without a GPU.

TRITON_INTERPRET must be set before any `@triton.jit` kernel is defined, hence here, before
the package is imported by a test module.
"""

import os

# Inductor's on-disk caches key compiled graphs without the schema of Python-defined custom
# ops, so a graph cached before a schema change would be replayed against the new op.
os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "0")
os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "0")

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
from helpers import BACKENDS

import dept_kernels


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Every backend that runs on this machine, selected for the duration of a test."""
    with dept_kernels.use_backend(request.param):
        yield request.param


@pytest.fixture
def one_thread():
    """One intra-op thread: a tiny model gains nothing from more, and on a loaded machine
    their spinning makes each step tens of times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
