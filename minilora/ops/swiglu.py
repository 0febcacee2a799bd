"""SiLU and the SwiGLU product of Llama's MLP: ``down_proj(silu(gate_proj(x)) * up_proj(x))``.

    silu(z) = z s,   s = sigmoid(z) = 1 / (1 + exp(-z)),   silu'(z) = s (1 + z (1 - s))
    swiglu(gate, up) = silu(gate) * up
    VJP:  d_up = g silu(gate),   d_gate = g up s (1 + gate (1 - s)) = g up (s + silu(gate) (1 - s))

The engine runs the fast SwiGLU (``minilora.ops.backend.swiglu``); ``tests/ops/test_kernels.py``
holds the two equal. SiLU alone is only its equation: no hot path calls it.
"""

from __future__ import annotations

import numpy as np

from minilora.errors import ShapeError
from minilora.tensor import Tensor


def sigmoid(z: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """1 / (1 + exp(-z)) in z's dtype; exp overflows to inf for very negative z, giving 0."""
    t = np.negative(z, out=np.empty_like(z) if out is None else out)
    with np.errstate(over="ignore"):
        np.exp(t, out=t)
    t += 1.0
    return np.reciprocal(t, out=t)


def silu(x: Tensor) -> Tensor:
    """x * sigmoid(x).   VJP: g s (1 + x (1 - s)),  s = sigmoid(x)."""
    s = sigmoid(x.data)
    xd = x.data
    return Tensor.from_op(xd * s, (x,), lambda g: (g * s * (1.0 + xd * (1.0 - s)),))


def check_swiglu(gate: Tensor, up: Tensor) -> None:
    if gate.shape != up.shape:
        raise ShapeError(f"swiglu: gate {gate.shape} and up {up.shape} must have the same shape")


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """silu(gate) * up.   gate, up: (..., I)."""
    check_swiglu(gate, up)
    z, u = gate.data, up.data
    s = sigmoid(z)
    a = z * s  # silu(gate)

    def backward(g):
        return g * u * s * (1.0 + z * (1.0 - s)), g * a

    return Tensor.from_op(a * u, (gate, up), backward)
