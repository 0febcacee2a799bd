"""The fast LoRA linear: ``minilora.ops.lora_linear.lora_linear``'s equation in row blocks.

The frozen product ``x W^T`` (and ``G W`` backward) is one large product that ``mm`` splits over
the threads; the adapter's thin products run block by block, each block of rows read once while
it is in cache. dB and dA come out as G^T h and d(x)^T u, the long side of each thin product being
the sum: BLAS runs them faster that way than as h^T G and u^T d(x) (docs/performance.md).
"""

from __future__ import annotations

import numpy as np

from minilora.ops.backend import products
from minilora.ops.backend.blocks import for_blocks, rows_per_block, sum_in_order
from minilora.ops.backend.products import mm
from minilora.ops.lora_linear import check_lora_linear
from minilora.tensor import Tensor


def lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor,
                scaling: float, dropout_mask: np.ndarray | None = None) -> Tensor:
    """x W^T + b + scaling * ((x * dropout_mask) A^T) B^T.   x: (..., in) -> (..., out).

    The same function as ``minilora.ops.lora_linear.lora_linear`` (its docstring has the VJP).
    """
    check_lora_linear(x, weight, lora_A, lora_B)
    out_f, in_f = weight.shape
    r = lora_A.shape[0]
    scaling = float(scaling)  # an np.float64 scaling (alpha / np.sqrt(r)) would make dA, dB float64
    if dropout_mask is not None:
        dropout_mask = np.asarray(dropout_mask, dtype=x.dtype)  # so would a float64 mask
    x2 = x.data.reshape(-1, in_f)
    n = len(x2)
    mask2 = None if dropout_mask is None else \
        np.broadcast_to(dropout_mask, x.shape).reshape(n, in_f)
    xd = x2 if mask2 is None else x2 * mask2  # d(x): (N, in)
    a_data, b_data = lora_A.data, lora_B.data
    y = mm(x2, weight.data.T, None if bias is None else bias.data)  # the frozen path, split
    h = np.empty((n, r), dtype=y.dtype)  # d(x) A^T, kept for dB
    rows = rows_per_block(n, max(in_f, out_f))

    def forward_block(lo, hi):  # the adapter path, a block of rows at a time, added in cache
        hb = products.matmul(xd[lo:hi], a_data.T, out=h[lo:hi])
        y[lo:hi] += products.matmul(hb * scaling, b_data.T)

    for_blocks(forward_block, n, rows)

    # Keep only what the wanted gradients use. A frozen W keeps no x for dW; dA needs d(x).
    need_x, need_w, need_a, need_b = (t.requires_grad for t in (x, weight, lora_A, lora_B))
    has_bias, x_shape = bias is not None, x.shape
    need_bias = has_bias and bias.requires_grad
    w = weight.data if need_x else None
    a = a_data if need_x else None
    b = b_data if need_x or need_a else None
    saved_h = h if need_b else None
    saved_xd = xd if need_a else None
    saved_x = x2 if need_w else None

    def backward(g):
        g2 = g.reshape(-1, out_f)
        gx = mm(g2, w) if need_x else None  # G W: the large product, split over the threads
        parts_a, parts_b = {}, {}  # block start -> that block's share of dA / dB

        def backward_block(lo, hi):  # G's rows are read once, for all the adapter's products
            gb = g2[lo:hi]
            if need_b:
                parts_b[lo] = products.matmul(gb.T, saved_h[lo:hi])  # G^T h: (out, r)
            if b is None:
                return
            u = products.matmul(gb, b)  # G B: (n, r)
            if need_a:
                parts_a[lo] = products.matmul(saved_xd[lo:hi].T, u)  # d(x)^T u: (in, r)
            if need_x:
                adapter = products.matmul(u * scaling, a)  # s u A: (n, in)
                if mask2 is not None:
                    adapter *= mask2[lo:hi]
                gx[lo:hi] += adapter

        for_blocks(backward_block, n, rows)
        zeros = np.zeros((out_f, r), g2.dtype), np.zeros((in_f, r), g2.dtype)
        gB = sum_in_order(parts_b, zeros[0]) * scaling if need_b else None
        gA = np.ascontiguousarray((sum_in_order(parts_a, zeros[1]) * scaling).T) if need_a \
            else None
        gW = mm(g2.T, saved_x) if need_w else None
        gb = g2.sum(axis=0) if need_bias else None
        gx = gx.reshape(x_shape) if need_x else None
        return [gx, gW] + ([gb] if has_bias else []) + [gA, gB]

    parents = (x, weight) + ((bias,) if bias is not None else ()) + (lora_A, lora_B)
    return Tensor.from_op(y.reshape(*x.shape[:-1], out_f), parents, backward)
