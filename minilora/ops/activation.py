"""GELU (GPT-2's tanh approximation) and dropout: their equations and vector-Jacobian products.

The engine runs the fast GELU (``minilora.ops.backend.activation``); ``tests/ops/test_kernels.py``
holds the two equal.
"""

from __future__ import annotations

import math

import numpy as np

from minilora.configs import probability
from minilora.errors import ConfigError
from minilora.tensor import Tensor

GELU_K = math.sqrt(2.0 / math.pi)  # Python floats keep a float32 array float32
GELU_C = 0.044715


def gelu(x: Tensor) -> Tensor:
    """0.5 x (1 + tanh(z)),  z = k (x + c x^3),  k = sqrt(2/pi),  c = 0.044715 (GPT-2's GELU).

    VJP: g (0.5 (1 + t) + 0.5 x (1 - t^2) k (1 + 3 c x^2)),  t = tanh(z).
    """
    a = x.data
    t = np.tanh(GELU_K * (a + GELU_C * a * a * a))

    def backward(g):
        dz = GELU_K * (1.0 + 3.0 * GELU_C * a * a)  # dz/dx
        return (g * (0.5 * (1.0 + t) + 0.5 * a * (1.0 - t * t) * dz),)

    return Tensor.from_op(0.5 * a * (1.0 + t), (x,), backward)


def dropout_mask(shape: tuple[int, ...], p: float, rng: np.random.Generator,
                 dtype=np.float32) -> np.ndarray:
    """Inverted dropout's mask: 0 with probability ``p``, else 1/(1-p), drawn from ``rng``."""
    draw_dtype = dtype if np.dtype(dtype) in (np.float32, np.float64) else np.float64
    keep = rng.random(shape, dtype=draw_dtype) >= p
    return keep.astype(dtype) * (1.0 / (1.0 - float(p)))  # an np.float64 p would promote


def dropout(x: Tensor, p: float, rng: np.random.Generator | None = None,
            training: bool = True) -> Tensor:
    """x * mask, the mask of [`dropout_mask`][] (inverted dropout); VJP: g * mask.

    The mask comes from ``rng`` (a ``numpy.random.Generator``), so a seed fixes it. Identity when
    ``p == 0`` or not ``training``.
    """
    p = probability("dropout", "p", p)
    if not training or p == 0.0:
        return x
    if rng is None:
        raise ConfigError("dropout with p > 0 needs an explicit rng (numpy.random.Generator)")
    mask = dropout_mask(x.shape, p, rng, x.dtype)
    return Tensor.from_op(x.data * mask, (x,), lambda g: (g * mask,))
