"""SiLU and the SwiGLU product of Llama's MLP: ``down_proj(silu(gate_proj(x)) * up_proj(x))``.

    silu(z) = z s,   s = sigmoid(z) = 1 / (1 + exp(-z)),   silu'(z) = s (1 + z (1 - s))
    swiglu(gate, up) = silu(gate) * up
    VJP:  d_up = g silu(gate),   d_gate = g up s (1 + gate (1 - s)) = g up (s + silu(gate) (1 - s))
"""

from __future__ import annotations

import numpy as np

from minilora.errors import ShapeError
from minilora.ops.backend.blocks import for_blocks, rows_per_block
from minilora.tensor import Tensor


def _sigmoid(z: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """1 / (1 + exp(-z)) in z's dtype; exp overflows to inf for very negative z, giving 0."""
    t = np.negative(z, out=np.empty_like(z) if out is None else out)
    with np.errstate(over="ignore"):
        np.exp(t, out=t)
    t += 1.0
    return np.reciprocal(t, out=t)


def silu(x: Tensor) -> Tensor:
    """x * sigmoid(x).   VJP: g s (1 + x (1 - s)),  s = sigmoid(x)."""
    s = _sigmoid(x.data)
    xd = x.data
    return Tensor.from_op(xd * s, (x,), lambda g: (g * s * (1.0 + xd * (1.0 - s)),))


def _check(gate: Tensor, up: Tensor) -> None:
    if gate.shape != up.shape:
        raise ShapeError(f"swiglu: gate {gate.shape} and up {up.shape} must have the same shape")


def swiglu_reference(gate: Tensor, up: Tensor) -> Tensor:
    """The equation: silu(gate) * up, and its VJP beside it.   gate, up: (..., I)."""
    _check(gate, up)
    z, u = gate.data, up.data
    s = _sigmoid(z)
    a = z * s  # silu(gate)

    def backward(g):
        return g * u * s * (1.0 + z * (1.0 - s)), g * a

    return Tensor.from_op(a * u, (gate, up), backward)


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """:func:`swiglu_reference` in row blocks on the engine's threads.   gate, up: (..., I).

    Keeps silu(gate) (d_up needs it) and reads s back as silu(gate) / gate, as GELU reads its
    sigmoid back from its output: no second activation-sized array, no second exp. At gate = 0,
    s = sigmoid(0) = 1/2.
    """
    _check(gate, up)
    shape = gate.shape
    z = gate.data.reshape(-1, shape[-1]) if gate.ndim else gate.data.reshape(1, 1)
    u = up.data.reshape(z.shape)
    a, y = np.empty_like(z), np.empty_like(z)  # silu(gate), kept; the output

    def forward_block(lo, hi):
        s = _sigmoid(z[lo:hi])
        np.multiply(z[lo:hi], s, out=a[lo:hi])
        np.multiply(a[lo:hi], u[lo:hi], out=y[lo:hi])

    block = rows_per_block(*z.shape)
    for_blocks(forward_block, len(z), block)
    need_gate, need_up = gate.requires_grad, up.requires_grad

    def backward(g):
        g2 = g.reshape(z.shape)
        d_gate = np.empty_like(z) if need_gate else None
        d_up = np.empty_like(z) if need_up else None

        def backward_block(lo, hi):
            ab, gb = a[lo:hi], g2[lo:hi]
            if need_up:
                np.multiply(gb, ab, out=d_up[lo:hi])
            if need_gate:
                zb = z[lo:hi]
                s = np.divide(ab, zb, out=np.full_like(zb, 0.5), where=zb != 0)
                t = 1.0 - s
                t *= ab
                t += s  # s + silu (1 - s) = silu'(gate)
                t *= u[lo:hi]
                np.multiply(gb, t, out=d_gate[lo:hi])

        for_blocks(backward_block, len(z), block)
        return (None if d_gate is None else d_gate.reshape(shape),
                None if d_up is None else d_up.reshape(shape))

    return Tensor.from_op(y.reshape(shape), (gate, up), backward)
