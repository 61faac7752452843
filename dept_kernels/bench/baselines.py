"""The official AoT formulas (the paper's per-token eager PyTorch), the AoT suites'
baselines: plain torch, without the library's helpers (which validate their ids).

Each adds a (B, s, d) bias to hidden (B, s, d), in hidden's dtype; ids are (B, s) int64.
The DePT baseline is `official_dept_embedding`.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def per_token_gather_add(hidden: Tensor, ids: Tensor, table: Tensor) -> Tensor:
    """A fused table's bias: `hidden + table[ids]`, table (V, d)."""
    return hidden + F.embedding(ids, table)


def per_token_kron(hidden: Tensor, ids: Tensor, w_l: Tensor, w_m: Tensor, w_r: Tensor) -> Tensor:
    """Kronecker: `(W_L[x // b] ⊗ W_M[x % b]) @ W_R` on every token; W_L (a, r), W_M (b, r),
    W_R (r², d)."""
    b = w_m.shape[0]
    left, right = w_l[ids // b], w_m[ids % b]  # (B, s, r)
    kron = (left[..., :, None] * right[..., None, :]).flatten(-2)  # (B, s, r²)
    return hidden + (kron @ w_r).to(hidden.dtype)


def per_token_fc(
    hidden: Tensor,
    ids: Tensor,
    embedding: Tensor,
    w1: Tensor,
    b1: Tensor,
    w2: Tensor,
    b2: Tensor,
    *,
    dropout_p: float,
) -> Tensor:
    """FC: `relu(dropout(E[x]) @ W_1 + b_1) @ W_2 + b_2` on every token (one dropout mask
    per token), formed in the weights' dtype; E (V, e), W_1 (e, r), W_2 (r, d)."""
    x = F.embedding(ids, embedding).to(w1.dtype)  # (B, s, e)
    if dropout_p:
        x = F.dropout(x, dropout_p)
    return hidden + (F.relu(x @ w1 + b1) @ w2 + b2).to(hidden.dtype)
