"""Fused GELU (GPT-2's tanh approximation) and dropout."""

from __future__ import annotations

import math

import numpy as np

from minilora.errors import ConfigError
from minilora.tensor import Tensor

_K = math.sqrt(2.0 / math.pi)  # Python floats keep a float32 array float32
_C = 0.044715


def gelu(x: Tensor) -> Tensor:
    """0.5 x (1 + tanh(k (x + c x^3))), k = sqrt(2/pi), c = 0.044715 (GPT-2's GELU).

    VJP: g * (0.5 (1 + t) + 0.5 x (1 - t^2) k (1 + 3 c x^2)),  t = tanh(k (x + c x^3)).
    """
    a = x.data
    x2 = a * a
    t = np.tanh(_K * a * (1.0 + _C * x2))  # x*x*x, never x**3 (slow for float32)
    y = 0.5 * a * (1.0 + t)

    def backward(g):
        dt = (1.0 - t * t) * (_K * (1.0 + 3.0 * _C * x2))
        return (g * (0.5 * (1.0 + t) + 0.5 * a * dt),)

    return Tensor.from_op(y, (x,), backward)


def dropout(x: Tensor, p: float, rng: np.random.Generator | None = None, training: bool = True) -> Tensor:
    """Zero each element with probability ``p`` and scale the rest by 1/(1-p) (inverted dropout).

    The mask comes from ``rng`` (a ``numpy.random.Generator``), so a seed fixes it. Identity when
    ``p == 0`` or not ``training``.
    """
    if not 0.0 <= p < 1.0:
        raise ConfigError(f"dropout probability must be in [0, 1), got {p}")
    if not training or p == 0.0:
        return x
    if rng is None:
        raise ConfigError("dropout with p > 0 needs an explicit rng (numpy.random.Generator)")
    dtype = x.dtype if x.dtype in (np.float32, np.float64) else np.float64
    keep = rng.random(x.shape, dtype=dtype) >= p
    scaled_mask = keep.astype(x.dtype) * (1.0 / (1.0 - float(p)))  # an np.float64 p would promote
    return Tensor.from_op(x.data * scaled_mask, (x,), lambda g: (g * scaled_mask,))
