"""Layer normalization: its equation and its vector-Jacobian product.

The engine runs the fast version (``minilora.ops.backend.normalization``); ``tests/ops/
test_kernels.py`` holds the two equal.
"""

from __future__ import annotations

import numpy as np

from minilora.errors import ShapeError
from minilora.tensor import Tensor


def layer_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float = 1e-5) -> Tensor:
    """y = (x - mean) / sqrt(var + eps) * weight + bias over the last axis.

    x: (..., C); weight, bias: (C,) or None. With xhat the normalized input, r = 1/sqrt(var + eps)
    and gh = g * weight (means over the last axis, sums over the others):
    dx = r (gh - mean(gh) - xhat mean(gh xhat)),  dweight = sum(g xhat),  dbias = sum(g).
    """
    check_layer_norm(x, weight, bias)
    xc = x.data - x.data.mean(axis=-1, keepdims=True)
    r = 1.0 / np.sqrt((xc * xc).mean(axis=-1, keepdims=True) + float(eps))  # (..., 1)
    xhat = xc * r
    y = xhat if weight is None else xhat * weight.data
    y = y if bias is None else y + bias.data
    rows = tuple(range(x.ndim - 1))

    def backward(g):  # g: (..., C)
        gh = g if weight is None else g * weight.data
        gx = r * (gh - gh.mean(axis=-1, keepdims=True)
                  - xhat * (gh * xhat).mean(axis=-1, keepdims=True))
        return ([gx] + ([(g * xhat).sum(axis=rows)] if weight is not None else [])
                + ([g.sum(axis=rows)] if bias is not None else []))

    parents = (x,) + tuple(p for p in (weight, bias) if p is not None)
    return Tensor.from_op(y, parents, backward)


def check_layer_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None) -> None:
    """A ShapeError unless weight and bias (where given) have shape (C,) for x: (..., C)."""
    c = x.shape[-1]
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and p.shape != (c,):
            raise ShapeError(f"layer_norm: {name} of shape {p.shape}, expected ({c},) for input "
                             f"{x.shape}")
