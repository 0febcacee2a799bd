"""Matrix products: ``matmul`` (batched, broadcasting) and the fused ``linear``.

For ``y = x W^T`` with a frozen ``W``, the product for ``dW`` is never computed and ``x`` is not
even kept for it: that is where LoRA's saving in the backward pass comes from.
"""

from __future__ import annotations

import numpy as np

from minilora.errors import ShapeError
from minilora.ops.backend import mm, swap
from minilora.tensor import Tensor, as_tensor


def matmul(a, b) -> Tensor:
    """a: (..., n, k) @ b: (..., k, m) -> (..., n, m); batch axes broadcast; 1-D as NumPy."""
    a, b = as_tensor(a), as_tensor(b)
    if a.ndim == 0 or b.ndim == 0:
        raise ShapeError(f"matmul needs at least 1-D operands, got shapes {a.shape} and {b.shape}")
    # 1-D operands become a row (left) or a column (right), then that axis is dropped again.
    a2 = a.data[None, :] if a.ndim == 1 else a.data
    b2 = b.data[:, None] if b.ndim == 1 else b.data
    if a2.shape[-1] != b2.shape[-2]:
        raise ShapeError(
            f"matmul shapes {a.shape} and {b.shape} do not fit: inner sizes {a2.shape[-1]} != "
            f"{b2.shape[-2]}"
        )
    try:
        np.broadcast_shapes(a2.shape[:-2], b2.shape[:-2])
    except ValueError:
        raise ShapeError(f"matmul batch axes of {a.shape} and {b.shape} do not broadcast") from None
    out2 = mm(a2, b2)
    out = out2
    if a.ndim == 1:
        out = out.squeeze(-2)
    if b.ndim == 1:
        out = out.squeeze(-1)

    def backward(g):
        g2 = g.reshape(out2.shape)
        ga = gb = None
        if a.requires_grad:
            ga = mm(g2, swap(b2))
            ga = ga[..., 0, :] if a.ndim == 1 else ga  # drop the row axis that was added
        if b.requires_grad:
            gb = mm(swap(a2), g2)
            gb = gb[..., 0] if b.ndim == 1 else gb  # drop the column axis that was added
        return ga, gb

    return Tensor.from_op(out, (a, b), backward)


def _rows(x: np.ndarray) -> np.ndarray:
    """(..., n) -> (N, n) for one BLAS call over all leading axes."""
    return x.reshape(-1, x.shape[-1])


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """y = x W^T + b.   x: (..., in), weight W: (out, in), bias b: (out,) -> y: (..., out)."""
    x = as_tensor(x)
    if weight.ndim != 2 or x.ndim < 1 or x.shape[-1] != weight.shape[1]:
        raise ShapeError(
            f"linear: input of shape {x.shape} does not fit weight of shape {weight.shape} "
            f"(expected (..., {weight.shape[-1]}))"
        )
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ShapeError(f"linear: bias of shape {bias.shape}, expected ({weight.shape[0]},)")
    x2 = _rows(x.data)
    y2 = mm(x2, weight.data.T)
    if bias is not None:
        y2 += bias.data
    saved_x = x2 if weight.requires_grad else None  # a frozen W needs no copy of x for dW

    def backward(g):
        g2 = _rows(g)
        gx = mm(g2, weight.data).reshape(x.shape) if x.requires_grad else None
        gw = mm(g2.T, saved_x) if weight.requires_grad else None
        if bias is None:
            return gx, gw
        return gx, gw, (g2.sum(axis=0) if bias.requires_grad else None)

    parents = (x, weight) if bias is None else (x, weight, bias)
    return Tensor.from_op(y2.reshape(*x.shape[:-1], weight.shape[0]), parents, backward)
