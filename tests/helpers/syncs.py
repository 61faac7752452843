"""Counting the host syncs an eager step would make on a GPU, on any device.

`SyncCounter` is a `TorchDispatchMode` that counts, per aten op, the calls that read a
tensor back to the host (`_local_scalar_dense`: `.item()`, `int(t)`; `is_nonzero`: `bool(t)`
below autograd; `equal`) or whose output size depends on the data (`nonzero`, the `unique`
family, `repeat_interleave` without its `output_size`, `bincount`, `masked_select`): on a GPU
each waits for the device. The library's custom ops (`torch.library.custom_op`) reach a
dispatch mode as one opaque call; the counter runs their Python bodies under itself, so the
aten calls inside them are counted too.

`.tolist()` reads a CPU tensor's memory without dispatching an op, so while the counter is
active `Tensor.tolist` is wrapped and each call counted as `Tensor.tolist` (on a GPU it is a
device-to-host copy). Still not seen: other reads that dispatch nothing on CPU (`.numpy()`,
and a `.cpu()` copy, a no-op here).
"""

from __future__ import annotations

from collections import Counter

import torch
from torch._library.custom_ops import OPDEFS
from torch.utils._python_dispatch import TorchDispatchMode

# aten op name -> what it syncs for. `item` appears instead of `_local_scalar_dense` when it
# is called below autograd (inside a custom op's body); each call is one read either way.
SYNC_OPS = {
    "aten::_local_scalar_dense": "read",
    "aten::item": "read",
    "aten::nonzero": "size",
    "aten::_unique2": "size",
    "aten::unique_dim": "size",
    "aten::unique_consecutive": "size",
    "aten::_unique": "size",
    "aten::is_nonzero": "read",
    "aten::equal": "read",
    "aten::bincount": "size",
    "aten::masked_select": "size",
    "Tensor.tolist": "read",
}


# One read of a scalar back to the host, whichever op the dispatch mode sees it as: `bool(t)`
# is `is_nonzero` below autograd and `_local_scalar_dense` above it, `.item()` likewise.
SCALAR_READS = {"aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::equal"}
SCALAR_READ = "scalar read"


def _syncs(name: str, kwargs: dict) -> bool:
    """Whether a call of aten op `name` syncs (`repeat_interleave` only without the
    `output_size` that spares it the read of its repeats' sum)."""
    if name == "aten::repeat_interleave":
        return kwargs.get("output_size") is None
    return name in SYNC_OPS


class SyncCounter(TorchDispatchMode):
    """`with SyncCounter() as syncs:` ...; `syncs.counts` maps each syncing aten op to its
    number of calls, `syncs.total` sums them; `syncs.calls` counts every op seen."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()
        self.calls: Counter[str] = Counter()
        # The counter is re-entered for each custom op's body: wrap `tolist` once.
        self._depth = 0
        self._tolist = None

    def __enter__(self):
        if self._depth == 0:
            self._tolist = torch.Tensor.tolist
            original = self._tolist

            def tolist(tensor):
                self.counts["Tensor.tolist"] += 1
                return original(tensor)

            torch.Tensor.tolist = tolist
        self._depth += 1
        return super().__enter__()

    def __exit__(self, *exc):
        self._depth -= 1
        if self._depth == 0:
            torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        self.calls[name] += 1
        if _syncs(name, kwargs):
            self.counts[SCALAR_READ if name in SCALAR_READS else name] += 1
        opdef = OPDEFS.get(name)
        if opdef is not None:
            # The mode is off while it handles a call: re-enter it for the op's body.
            with self:
                return opdef._init_fn(*args, **kwargs)
        return func(*args, **kwargs)


def step(model, loss_of) -> tuple[Counter, Counter]:
    """The syncs of one training step's forward and of its backward, counted apart."""
    model.train()
    with SyncCounter() as forward:
        loss = loss_of(model)
    with SyncCounter() as backward:
        loss.backward()
    return forward.counts, backward.counts


def library_step(base, model, loss_of) -> tuple[Counter, Counter]:
    """The syncs the patch adds to one training step: the patched model's, less those of
    the unpatched `base` trained on the same batch (transformers' own, e.g. its mask
    helpers, differ between versions)."""
    for p in base.parameters():
        p.requires_grad_(True)
    base_forward, base_backward = step(base, loss_of)
    forward, backward = step(model, loss_of)
    assert forward >= base_forward and backward >= base_backward
    return forward - base_forward, backward - base_backward
