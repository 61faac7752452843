"""Counting the host syncs an eager step would make on a GPU, on any device.

`SyncCounter` is a `TorchDispatchMode` that counts, per aten op, the calls that read a
tensor back to the host (`_local_scalar_dense`: `.item()`, `int(t)`, `bool(t)`) or whose
output size depends on the data (`nonzero`, the `unique` family): on a GPU each waits for the
device. The library's custom ops (`torch.library.custom_op`) reach a dispatch mode as one
opaque call; the counter runs their Python bodies under itself, so the aten calls inside
them are counted too.

Not seen on CPU: `.tolist()` of a CPU tensor reads its memory without dispatching an op (on a
GPU it is a device-to-host copy, which this counter does not count either).
"""

from __future__ import annotations

from collections import Counter

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
}


class SyncCounter(TorchDispatchMode):
    """`with SyncCounter() as syncs:` ...; `syncs.counts` maps each syncing aten op to its
    number of calls, `syncs.total` sums them; `syncs.calls` counts every op seen."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()
        self.calls: Counter[str] = Counter()

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        self.calls[name] += 1
        if name in SYNC_OPS:
            self.counts[name] += 1
        opdef = OPDEFS.get(name)
        if opdef is not None:
            # The mode is off while it handles a call: re-enter it for the op's body.
            with self:
                return opdef._init_fn(*args, **kwargs)
        return func(*args, **kwargs)
