"""The fast rotary position embedding: ``minilora.ops.rotary.rotary_embedding``'s equation on the
two halves of each head, in blocks on the engine's threads."""

from __future__ import annotations

import numpy as np

from minilora.ops.backend.blocks import for_blocks, rows_per_block
from minilora.ops.rotary import check_rotary
from minilora.tensor import Tensor


def rotary_embedding(x: Tensor, cos, sin) -> Tensor:
    """x * cos + rotate_half(x) * sin.   x: (..., T, hd), cos, sin: (T, hd/2).

    The same function as ``minilora.ops.rotary.rotary_embedding``, on the two halves directly,
    in blocks of the leading axes on the engine's threads:  y1 = x1 cos - x2 sin,
    y2 = x2 cos + x1 sin; the backward pass is the same rotation by -a.
    """
    cos, sin = check_rotary(x, cos, sin)
    t, hd = x.shape[-2:]
    h = hd // 2
    x3 = x.data.reshape(-1, t, hd)  # (N, T, hd): N = the product of the leading axes
    y = np.empty(x3.shape, dtype=x.dtype)
    block = rows_per_block(len(x3), t * hd)

    def rotate(src, dst, sign, lo, hi):  # dst = R(sign * a) src, for the matrices lo:hi
        s1, s2, d1, d2 = src[lo:hi, :, :h], src[lo:hi, :, h:], dst[lo:hi, :, :h], dst[lo:hi, :, h:]
        np.multiply(s1, cos, out=d1)
        np.multiply(s2, cos, out=d2)
        tmp = s2 * sin
        (np.subtract if sign > 0 else np.add)(d1, tmp, out=d1)
        np.multiply(s1, sin, out=tmp)
        (np.add if sign > 0 else np.subtract)(d2, tmp, out=d2)

    for_blocks(lambda lo, hi: rotate(x3, y, 1, lo, hi), len(x3), block)
    shape = x.shape

    def backward(g):
        g3, gx = g.reshape(-1, t, hd), np.empty(x3.shape, dtype=g.dtype)
        for_blocks(lambda lo, hi: rotate(g3, gx, -1, lo, hi), len(x3), block)
        return (gx.reshape(shape),)

    return Tensor.from_op(y.reshape(shape), (x,), backward)
