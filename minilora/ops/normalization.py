"""Fused layer normalization with a hand-written backward."""

from __future__ import annotations

import numpy as np

from minilora.errors import ShapeError
from minilora.tensor import Tensor


def layer_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float = 1e-5) -> Tensor:
    """(x - mean) / sqrt(var + eps) * weight + bias over the last axis.

    x: (..., C), weight and bias: (C,) or None. With xhat the normalized input and r = 1/std:
    dx = r * (gh - mean(gh) - xhat * mean(gh * xhat)),  gh = g * weight.
    """
    c = x.shape[-1]
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and p.shape != (c,):
            raise ShapeError(f"layer_norm: {name} of shape {p.shape}, expected ({c},) for input {x.shape}")
    xc = x.data - x.data.mean(axis=-1, keepdims=True)
    var = np.mean(xc * xc, axis=-1, keepdims=True)
    rstd = 1.0 / np.sqrt(var + eps)
    xhat = xc
    xhat *= rstd
    y = xhat * weight.data if weight is not None else xhat.copy()
    if bias is not None:
        y += bias.data

    def backward(g):
        grads = [None]
        if x.requires_grad:
            gh = g * weight.data if weight is not None else g
            gx = gh - gh.mean(axis=-1, keepdims=True)
            gx -= xhat * np.mean(gh * xhat, axis=-1, keepdims=True)
            gx *= rstd
            grads[0] = gx
        lead = tuple(range(g.ndim - 1))
        if weight is not None:
            grads.append(np.sum(g * xhat, axis=lead) if weight.requires_grad else None)
        if bias is not None:
            grads.append(np.sum(g, axis=lead) if bias.requires_grad else None)
        return grads

    parents = (x,) + tuple(p for p in (weight, bias) if p is not None)
    return Tensor.from_op(y, parents, backward)
