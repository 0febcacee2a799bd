"""RMSNorm (Llama's normalization): the reference op, then the fast one behind the same signature.

    y = w * x * r,   r = 1 / sqrt(mean(x^2) + eps)  over the last axis    x: (..., C), w: (C,)

With xhat = x r and gh = g * w, the vector-Jacobian product is
    dx = r (gh - xhat mean(gh * xhat)),   dw = sum over rows of g * xhat.

Hugging Face's ``LlamaRMSNorm`` computes the statistics in float32 whatever the input's dtype (an
upcast for half inputs, a downcast for float64). minilora computes in the input's dtype: for
float32 that is the same formula step for step (statistics, then ``x * r``, then ``w *``);
float64 stays float64 (docs/llama.md).
"""

from __future__ import annotations

import numpy as np

from minilora.errors import ShapeError
from minilora.ops.backend.blocks import for_blocks, rows_per_block, sum_in_order
from minilora.tensor import Tensor


def _check(x: Tensor, weight: Tensor | None) -> int:
    c = x.shape[-1] if x.ndim else 0
    if x.ndim == 0 or (weight is not None and weight.shape != (c,)):
        raise ShapeError(f"rms_norm: input {x.shape} and weight "
                         f"{None if weight is None else weight.shape} do not fit "
                         "(expected (..., C) and (C,))")
    return c


def rms_norm_reference(x: Tensor, weight: Tensor | None, eps: float = 1e-6) -> Tensor:
    """The equation: w * x / sqrt(mean(x^2) + eps) over the last axis, and its VJP beside it."""
    _check(x, weight)
    xd, eps = x.data, float(eps)  # a Python float keeps float32 float32
    r = 1.0 / np.sqrt(np.mean(xd * xd, axis=-1, keepdims=True) + eps)  # (..., 1)
    xhat = xd * r
    w = None if weight is None else weight.data
    y = xhat if w is None else w * xhat

    def backward(g):
        gh = g if w is None else g * w
        gx = r * (gh - xhat * np.mean(gh * xhat, axis=-1, keepdims=True))
        gw = None if w is None else np.sum(g * xhat, axis=tuple(range(g.ndim - 1)))
        return (gx,) if w is None else (gx, gw)

    return Tensor.from_op(y, (x,) if weight is None else (x, weight), backward)


def rms_norm(x: Tensor, weight: Tensor | None, eps: float = 1e-6) -> Tensor:
    """:func:`rms_norm_reference` in row blocks on the engine's threads.   x: (..., C).

    Keeps only r (one number per row) for the backward pass, which recomputes xhat = x r a block
    at a time from the input it references; row sums are row-wise dot products (einsum).
    """
    c = _check(x, weight)
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
