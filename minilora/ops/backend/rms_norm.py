"""The fast RMSNorm: ``minilora.ops.rms_norm.rms_norm``'s equation in row blocks on the engine's
threads."""

from __future__ import annotations

import numpy as np

from minilora.ops.backend.blocks import for_blocks, rows_per_block, sum_in_order
from minilora.ops.rms_norm import check_rms_norm
from minilora.tensor import Tensor


def rms_norm(x: Tensor, weight: Tensor | None, eps: float = 1e-6) -> Tensor:
    """w * x / sqrt(mean(x^2) + eps) over the last axis.   x: (..., C), weight: (C,) or None.

    The same function as ``minilora.ops.rms_norm.rms_norm`` (its docstring has the VJP). Keeps
    only r (one number per row) for the backward pass, which recomputes xhat = x r a block at a
    time from the input it references; row sums are row-wise dot products (einsum).
    """
    c = check_rms_norm(x, weight)
    x2, eps = x.data.reshape(-1, c), float(eps)
    n = len(x2)
    rstd = np.empty((n, 1), dtype=x2.dtype)
    y = np.empty_like(x2)
    w = None if weight is None else weight.data

    def forward_block(lo, hi):
        xb, r = x2[lo:hi], rstd[lo:hi]
        ms = np.einsum("ij,ij->i", xb, xb)[:, None]
        ms /= c
        ms += eps
        np.sqrt(ms, out=ms)
        np.reciprocal(ms, out=r)
        np.multiply(xb, r, out=y[lo:hi])
        if w is not None:
            y[lo:hi] *= w

    block = rows_per_block(n, c)
    for_blocks(forward_block, n, block)
    need_x, x_shape = x.requires_grad, x.shape
    need_w = weight is not None and weight.requires_grad

    def backward(g):
        g2 = g.reshape(-1, c)
        gx = np.empty_like(x2) if need_x else None
        partial_w = {}  # block start -> sum over the block's rows

        def backward_block(lo, hi):
            gb, r = g2[lo:hi], rstd[lo:hi]
            xh = x2[lo:hi] * r
            if need_w:
                partial_w[lo] = np.einsum("ij,ij->j", gb, xh)
            if need_x:
                gh = gb * w if w is not None else gb.copy()
                proj = np.einsum("ij,ij->i", gh, xh)[:, None]
                proj /= c
                xh *= proj
                gh -= xh
                np.multiply(gh, r, out=gx[lo:hi])

        for_blocks(backward_block, n, block)
        grads = [None if gx is None else gx.reshape(x_shape)]
        if weight is not None:
            grads.append(sum_in_order(partial_w, np.zeros(c, g2.dtype)) if need_w else None)
        return grads

    return Tensor.from_op(y.reshape(x.shape), (x,) if weight is None else (x, weight), backward)
