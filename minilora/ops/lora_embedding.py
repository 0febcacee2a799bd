"""LoRA on an embedding as one op: its equation and its vector-Jacobian product.

An embedding is a lookup, ``W[idx]`` with W: (vocab, dim), so its adapter is one too: PEFT's
``lora_embedding_A`` (r, vocab) and ``lora_embedding_B`` (dim, r) give ΔW = s (B A)^T, and the
token j reads column j of A. Nothing is multiplied by a one-hot vector.
"""

from __future__ import annotations

import numpy as np

from minilora.errors import ShapeError
from minilora.tensor import Tensor


def lora_embedding(idx, lora_A: Tensor, lora_B: Tensor, scaling: float) -> Tensor:
    """The adapter's path alone: y = s A[:, idx]^T B^T.   idx: (...) integers in [0, vocab),
    A: (r, vocab), B: (dim, r) -> (..., dim).

    h = A^T[idx] (..., r) is a gather of A's columns. With G = dL/dy:
    dB = s G^T h (summed over the lookups), and dA scatters s G B into the columns it read:
    dA[:, j] = s Σ_{t: idx_t = j} (G_t B)^T, so a token looked up twice gets both rows.
    """
    idx = np.asarray(idx.data if isinstance(idx, Tensor) else idx)
    check_lora_embedding(idx, lora_A, lora_B)
    s, A, B = float(scaling), lora_A.data, lora_B.data
    h = A.T[idx]                                          # (..., r): a lookup, not a product
    y = s * (h @ B.T)                                     # (..., dim)
    need_a, vocab, r = lora_A.requires_grad, A.shape[1], A.shape[0]

    def backward(g):                                      # g: (..., dim)
        g2, h2 = g.reshape(-1, g.shape[-1]), h.reshape(-1, r)
        gB = s * g2.T @ h2                                # (dim, r)
        gA = None
        if need_a:
            gA_T = np.zeros((vocab, r), dtype=A.dtype)
            np.add.at(gA_T, idx.reshape(-1), s * (g2 @ B))  # scatter-add into the rows read
            gA = np.ascontiguousarray(gA_T.T)             # (r, vocab)
        return [gA, gB]

    return Tensor.from_op(y, (lora_A, lora_B), backward)


def check_lora_embedding(idx: np.ndarray, lora_A: Tensor, lora_B: Tensor) -> None:
    """A ShapeError unless idx holds integers in [0, vocab), A: (r, vocab) and B: (dim, r)."""
    if lora_A.ndim != 2 or lora_B.ndim != 2 or lora_B.shape[1] != lora_A.shape[0]:
        raise ShapeError(f"lora_embedding: A {lora_A.shape} and B {lora_B.shape} do not fit "
                         "(expected A (r, vocab), B (dim, r))")
    vocab = lora_A.shape[1]
    if not np.issubdtype(idx.dtype, np.integer):
        raise ShapeError(f"lora_embedding: indices must be integers, got dtype {idx.dtype}")
    if idx.size and (idx.min() < 0 or idx.max() >= vocab):
        raise ShapeError(f"lora_embedding: index {idx.min() if idx.min() < 0 else idx.max()} is "
                         f"outside [0, {vocab})")
