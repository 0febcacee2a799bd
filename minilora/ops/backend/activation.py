"""The fast GELU: ``minilora.ops.activation.gelu``'s equation in row blocks, with one exp and no
tanh."""

from __future__ import annotations

import numpy as np

from minilora.ops.activation import GELU_C, GELU_K
from minilora.ops.backend.blocks import for_blocks, rows_per_block
from minilora.tensor import Tensor

_A, _B = 2.0 * GELU_K, 2.0 * GELU_K * GELU_C  # 2z = x (A + B x^2)


def _sigmoid_2z(x: np.ndarray, out: np.ndarray) -> np.ndarray:
    """out = 1 / (1 + exp(-2z)), z = k (x + c x^3): one exp, no tanh (docs/performance.md), and
    finite for any x: exp overflows to inf, giving 0."""
    t = x * x
    t *= -_B
    t -= _A
    t *= x  # -2z
    with np.errstate(over="ignore"):  # exp(-2z) = inf for very negative x: s = 0, as it should
        np.exp(t, out=t)
    t += 1.0
    return np.reciprocal(t, out=out)


def gelu(x: Tensor) -> Tensor:
    """0.5 x (1 + tanh(z)),  z = k (x + c x^3): ``minilora.ops.activation.gelu``'s function.

    Computed as x * s with s = sigmoid(2z), the same number, since 0.5 (1 + tanh z) = sigmoid(2z).
    VJP: g * s * (1 + x (1 - s) k' (x)),  k'(x) = 2k (1 + 3c x^2) = d(2z)/dx.
    Row blocks run on the engine's threads with cache-sized temporaries. The backward pass reads
    s back as y / x from the output it keeps (the next layer keeps that array anyway), instead of
    keeping s (one more activation-sized array) or recomputing it (an exp costs far more than a
    division). Where x = 0, s = sigmoid(0) = 1/2.
    """
    a = x.data
    rows = a.reshape(-1, a.shape[-1]) if a.ndim else a.reshape(1, 1)
    y = np.empty_like(rows)

    def forward_block(lo, hi):
        xb = rows[lo:hi]
        s = _sigmoid_2z(xb, np.empty_like(xb))
        np.multiply(xb, s, out=y[lo:hi])

    block = rows_per_block(*rows.shape)
    for_blocks(forward_block, len(rows), block)

    def backward(g):
        g_rows = g.reshape(rows.shape)
        gx = np.empty_like(rows)

        def backward_block(lo, hi):
            xb = rows[lo:hi]
            s = np.divide(y[lo:hi], xb, out=np.full_like(xb, 0.5), where=xb != 0)
            t = xb * xb
            t *= 3.0 * _B
            t += _A
            t *= xb  # x k'(x)
            t *= 1.0 - s
            t += 1.0
            t *= s
            np.multiply(g_rows[lo:hi], t, out=gx[lo:hi])

        for_blocks(backward_block, len(rows), block)
        return (gx.reshape(a.shape),)

    return Tensor.from_op(y.reshape(a.shape), (x,), backward)
