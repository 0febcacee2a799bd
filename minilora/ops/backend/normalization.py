"""The fast layer norm: ``minilora.ops.normalization.layer_norm``'s equation in row blocks on the
engine's threads."""

from __future__ import annotations

import numpy as np

from minilora.ops.backend.blocks import for_blocks, rows_per_block, sum_in_order
from minilora.ops.normalization import check_layer_norm
from minilora.tensor import Tensor


def layer_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float = 1e-5) -> Tensor:
    """(x - mean) / sqrt(var + eps) * weight + bias over the last axis.   x: (..., C).

    The same function as ``minilora.ops.normalization.layer_norm`` (its docstring has the VJP).
    """
    check_layer_norm(x, weight, bias)
    c = x.shape[-1]
    x2 = x.data.reshape(-1, c)
    xhat = np.empty_like(x2)  # kept for backward
    rstd = np.empty((len(x2), 1), dtype=x2.dtype)
    y = np.empty_like(x2)

    # Row sums as products with a vector of ones and einsum's row-wise dot: BLAS and einsum beat
    # mean(axis=-1). Dividing the sum by C (not multiplying by a rounded 1/C) keeps a constant
    # row's mean exact.
    ones = np.ones(c, dtype=x2.dtype)

    def forward_block(lo, hi):
        xb = x2[lo:hi]
        mean = (xb @ ones)[:, None]
        mean /= c
        xh = np.subtract(xb, mean, out=xhat[lo:hi])
        r = np.einsum("ij,ij->i", xh, xh)[:, None]
        r /= c
        r += eps
        np.sqrt(r, out=r)
        np.reciprocal(r, out=rstd[lo:hi])
        xh *= rstd[lo:hi]
        if weight is not None:
            np.multiply(xh, weight.data, out=y[lo:hi])
        else:
            y[lo:hi] = xh
        if bias is not None:
            y[lo:hi] += bias.data

    block = rows_per_block(len(x2), c)
    for_blocks(forward_block, len(x2), block)

    need_x, x_shape = x.requires_grad, x.shape
    has_w, has_b = weight is not None, bias is not None
    need_w, need_b = has_w and weight.requires_grad, has_b and bias.requires_grad
    w = weight.data if has_w and need_x else None

    def backward(g):
        g2 = g.reshape(-1, c)
        gx = np.empty_like(x2) if need_x else None
        partial_w, partial_b = {}, {}  # block start -> sum over the block's rows

        def backward_block(lo, hi):
            gb, xh = g2[lo:hi], xhat[lo:hi]
            if need_w:
                partial_w[lo] = np.sum(gb * xh, axis=0)
            if need_b:
                partial_b[lo] = gb.sum(axis=0)
            if need_x:
                gh = gb * w if w is not None else gb.copy()
                proj = np.einsum("ij,ij->i", gh, xh)[:, None]
                proj /= c
                mean = (gh @ ones)[:, None]
                mean /= c
                gh -= mean
                gh -= xh * proj
                np.multiply(gh, rstd[lo:hi], out=gx[lo:hi])

        for_blocks(backward_block, len(x2), block)
        grads = [None if gx is None else gx.reshape(x_shape)]
        if has_w:
            grads.append(sum_in_order(partial_w, np.zeros(c, g2.dtype)) if need_w else None)
        if has_b:
            grads.append(sum_in_order(partial_b, np.zeros(c, g2.dtype)) if need_b else None)
        return grads

    parents = (x,) + tuple(p for p in (weight, bias) if p is not None)
    return Tensor.from_op(y.reshape(x.shape), parents, backward)

