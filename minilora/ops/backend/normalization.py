"""The fast layer norm: ``minilora.ops.normalization.layer_norm``'s equation in row blocks on the
engine's threads. Its two halves on plain arrays ([`normalize_rows`][],
[`normalize_rows_backward`][]) also serve the fused final layer norm of ``lm_head``."""

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
    has_w, has_b = weight is not None, bias is not None
    y, xhat, rstd = normalize_rows(x.data.reshape(-1, c), weight.data if has_w else None,
                                   bias.data if has_b else None, eps)
    need_x, x_shape = x.requires_grad, x.shape
    need_w, need_b = has_w and weight.requires_grad, has_b and bias.requires_grad
    w = weight.data if has_w and need_x else None

    def backward(g):
        gx, gw, gb = normalize_rows_backward(g.reshape(-1, c), xhat, rstd, w, need_x, need_w,
                                             need_b)
        grads = [None if gx is None else gx.reshape(x_shape)]
        return grads + ([gw] if has_w else []) + ([gb] if has_b else [])

    parents = (x,) + tuple(p for p in (weight, bias) if p is not None)
    return Tensor.from_op(y.reshape(x.shape), parents, backward)


def normalize_rows(x2: np.ndarray, w: np.ndarray | None, b: np.ndarray | None, eps: float):
    """Layer norm of the rows of x2 (N, C) -> (y, xhat, rstd (N, 1)), in row blocks."""
    c = x2.shape[1]
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
        if w is not None:
            np.multiply(xh, w, out=y[lo:hi])
        else:
            y[lo:hi] = xh
        if b is not None:
            y[lo:hi] += b

    for_blocks(forward_block, len(x2), rows_per_block(len(x2), c))
    return y, xhat, rstd


def normalize_rows_backward(g2: np.ndarray, xhat: np.ndarray, rstd: np.ndarray,
                            w: np.ndarray | None, need_x: bool, need_w: bool, need_b: bool):
    """(dx, dweight, dbias) of [`normalize_rows`][] for the output gradient g2 (N, C); None
    for each one not needed. ``w`` is the weight (None: none, or dx not needed)."""
    n, c = g2.shape
    ones = np.ones(c, dtype=g2.dtype)
    gx = np.empty_like(g2) if need_x else None
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

    for_blocks(backward_block, n, rows_per_block(n, c))
    gw = sum_in_order(partial_w, np.zeros(c, g2.dtype)) if need_w else None
    gb = sum_in_order(partial_b, np.zeros(c, g2.dtype)) if need_b else None
    return gx, gw, gb
