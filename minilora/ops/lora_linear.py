"""The LoRA linear layer as one op: its equation and its vector-Jacobian product.

The engine runs the fast version (``minilora.ops.backend.lora_linear``), which computes the same
numbers in row blocks on the engine's threads; ``tests/ops/test_kernels.py`` holds the two equal.
"""

from __future__ import annotations

import numpy as np

from minilora.errors import ShapeError
from minilora.tensor import Tensor


def lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor,
                scaling: float, dropout_mask: np.ndarray | None = None) -> Tensor:
    """y = x W^T + b + s (d(x) A^T) B^T.   x: (..., in), W: (out, in), A: (r, in), B: (out, r).

    d(x) = x * dropout_mask (0 or 1/(1-p), broadcastable to x), or x. ``B A`` is never formed.
    With G = dL/dy, h = d(x) A^T and u = G B (rows summed over the leading axes):
    dB = s G^T h,  dA = s u^T d(x),  dx = G W + s d(u A),  dW = G^T x,  db = sum(G).
    """
    check_lora_linear(x, weight, lora_A, lora_B)
    s, (W, A, B) = float(scaling), (weight.data, lora_A.data, lora_B.data)
    mask = None if dropout_mask is None else np.asarray(dropout_mask, dtype=x.dtype)
    xd = x.data if mask is None else x.data * mask        # d(x): (..., in)
    h = xd @ A.T                                          # (..., r)
    y = x.data @ W.T + s * (h @ B.T) + (0.0 if bias is None else bias.data)  # (..., out)

    def backward(g):                                      # g: (..., out)
        u = g @ B                                         # G B: (..., r)
        gx = None
        if x.requires_grad:
            du = s * (u @ A)                              # s u A: (..., in), through d too
            gx = g @ W + (du if mask is None else du * mask)
        gW = _rows(g).T @ _rows(x.data) if weight.requires_grad else None  # never for frozen W
        gb = [_rows(g).sum(axis=0)] if bias is not None else []
        gA = s * _rows(u).T @ _rows(xd)                   # (r, in)
        gB = s * _rows(g).T @ _rows(h)                    # (out, r)
        return [gx, gW, *gb, gA, gB]

    parents = (x, weight) + ((bias,) if bias is not None else ()) + (lora_A, lora_B)
    return Tensor.from_op(y, parents, backward)


def _rows(a: np.ndarray) -> np.ndarray:
    """(..., n) -> (N, n): the leading axes as one axis of rows."""
    return a.reshape(-1, a.shape[-1])


def check_lora_linear(x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor) -> None:
    """A ShapeError unless x: (..., in), W: (out, in), A: (r, in), B: (out, r)."""
    out_f, in_f = weight.shape
    r = lora_A.shape[0]
    if x.shape[-1] != in_f or lora_A.shape != (r, in_f) or lora_B.shape != (out_f, r):
        raise ShapeError(
            f"lora_linear: x {x.shape}, W {weight.shape}, A {lora_A.shape}, B {lora_B.shape} "
            f"do not fit (expected x (..., {in_f}), A (r, {in_f}), B ({out_f}, r))"
        )
