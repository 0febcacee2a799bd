"""Matrix products: ``matmul`` (batched, broadcasting) and the fused ``linear``.

For ``y = x W^T`` with a frozen ``W``, the product for ``dW`` is never computed and ``x`` is not
even kept for it: that is where LoRA's saving in the backward pass comes from.
"""

from __future__ import annotations

import numpy as np

from minilora.errors import ShapeError
from minilora.ops.backend.products import mm, swap
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

    # save only what the wanted gradients use: dA needs B, dB needs A
    out_shape, a_vector, b_vector = out2.shape, a.ndim == 1, b.ndim == 1
    saved_b = b2 if a.requires_grad else None
    saved_a = a2 if b.requires_grad else None

    def backward(g):
        g2 = g.reshape(out_shape)
        ga = gb = None
        if saved_b is not None:
            ga = mm(g2, swap(saved_b))
            ga = ga[..., 0, :] if a_vector else ga  # drop the row axis that was added
        if saved_a is not None:
            gb = mm(swap(saved_a), g2)
            gb = gb[..., 0] if b_vector else gb  # drop the column axis that was added
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
    y2 = mm(x2, weight.data.T, None if bias is None else bias.data)
    # Save only what the wanted gradients use: dx needs W, dW needs x. A frozen W keeps no x.
    saved_x = x2 if weight.requires_grad else None
    saved_w = weight.data if x.requires_grad else None
    x_shape, has_bias = x.shape, bias is not None
    need_b = has_bias and bias.requires_grad

    def backward(g):
        g2 = _rows(g)
        gx = mm(g2, saved_w).reshape(x_shape) if saved_w is not None else None
        gw = mm(g2.T, saved_x) if saved_x is not None else None
        if not has_bias:
            return gx, gw
        return gx, gw, (g2.sum(axis=0) if need_b else None)

    parents = (x, weight) if bias is None else (x, weight, bias)
    return Tensor.from_op(y2.reshape(*x.shape[:-1], weight.shape[0]), parents, backward)
