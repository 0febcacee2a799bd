"""Rotary position embedding (RoPE) in Hugging Face's ``rotate_half`` convention.

Feature i of a head (hd features, i < hd/2) is paired with feature i + hd/2, and the pair is
rotated by the angle p * f_i of the token's position p, f_i = theta^(-2i/hd):

    y = x * cos + rotate_half(x) * sin,     rotate_half([x1, x2]) = [-x2, x1]

with cos and sin repeated over both halves (HF's ``cat(freqs, freqs)``). Per pair, y = R(a) x
with R(a) the rotation by a, so the vector-Jacobian product is the inverse rotation:
    dx = R(a)^T g = R(-a) g = g * cos - rotate_half(g * sin).

The ops take the tables as ``cos, sin: (T, hd/2)``, one angle per pair, from [`rope_tables`][]
(positions may start at an offset, for a key/value cache). The engine runs the fast version
(``minilora.ops.backend.rotary``); ``tests/ops/test_kernels.py`` holds the two equal.
"""

from __future__ import annotations

import numpy as np

from minilora.errors import ConfigError, ShapeError
from minilora.tensor import Tensor


def rope_inv_freq(head_dim: int, theta: float, dtype=np.float32) -> np.ndarray:
    """f_i = 1 / theta^(2i / hd) for i < hd/2: (hd/2,) in ``dtype``, the operations in HF's
    order (``arange(0, hd, 2) / hd``, then the power, then the reciprocal)."""
    if isinstance(head_dim, bool) or not isinstance(head_dim, (int, np.integer)) \
            or head_dim < 2 or head_dim % 2:
        raise ConfigError(f"rope: head_dim must be an even integer >= 2, got {head_dim!r}")
    return 1.0 / (float(theta) ** (np.arange(0, head_dim, 2, dtype=dtype) / int(head_dim)))


def rope_tables(positions, head_dim: int, theta: float, dtype=np.float32):
    """(cos, sin), each (T, hd/2), of the angles p f_i for the integer ``positions`` (T,).

    Computed in ``dtype`` as transformers computes them in float32 (angle = float(p) * f_i); a
    float64 model gets float64 tables (HF's are float32 whatever the model's dtype).
    """
    p = np.asarray(positions)
    if p.ndim != 1 or not np.issubdtype(p.dtype, np.integer):
        raise ShapeError(f"rope_tables: positions must be a 1-D integer array, got {p.dtype} "
                         f"{p.shape}")
    angles = p.astype(dtype)[:, None] * rope_inv_freq(head_dim, theta, dtype)[None, :]
    return np.cos(angles), np.sin(angles)


def rotate_half(x: np.ndarray) -> np.ndarray:
    """[x1, x2] -> [-x2, x1] over the last axis: each pair (i, i + hd/2) turned by +90 degrees."""
    h = x.shape[-1] // 2
    return np.concatenate([-x[..., h:], x[..., :h]], axis=-1)


def check_rotary(x: Tensor, cos: np.ndarray, sin: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin in x's dtype, or a ShapeError unless x: (..., T, hd), cos, sin: (T, hd/2)."""
    cos, sin = np.asarray(cos), np.asarray(sin)
    if x.ndim < 2 or x.shape[-1] % 2 or cos.shape != (x.shape[-2], x.shape[-1] // 2) \
            or sin.shape != cos.shape:
        raise ShapeError(f"rotary_embedding: x {x.shape}, cos {cos.shape}, sin {sin.shape} do "
                         "not fit (expected x (..., T, hd) with hd even, cos and sin (T, hd/2))")
    return cos.astype(x.dtype, copy=False), sin.astype(x.dtype, copy=False)


def rotary_embedding(x: Tensor, cos, sin) -> Tensor:
    """x * cos + rotate_half(x) * sin.   x: (..., T, hd), cos, sin: (T, hd/2)."""
    cos, sin = check_rotary(x, cos, sin)
    c, s = np.concatenate([cos, cos], -1), np.concatenate([sin, sin], -1)  # (T, hd)
    y = x.data * c + rotate_half(x.data) * s

    def backward(g):  # the inverse rotation: R(a)^T = R(-a)
        return (g * c - rotate_half(g * s),)

    return Tensor.from_op(y, (x,), backward)
