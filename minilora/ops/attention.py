"""Scaled dot-product attention, and GPT's causal self-attention: equations and VJPs.

The engine runs the fast versions (``minilora.ops.backend.attention``: blocks of rows that skip
the keys they cannot see, heads read in place); ``tests/ops/test_kernels.py`` holds them equal.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from minilora.errors import ShapeError
from minilora.ops.shape import reshape, split, transpose
from minilora.tensor import Tensor


@functools.lru_cache(maxsize=16)
def causal_mask(t_q: int, t_k: int) -> np.ndarray:
    """(t_q, t_k) boolean, True above the diagonal: the future positions a query may not see.

    Queries are the last ``t_q`` of the ``t_k`` positions (``t_q < t_k`` when the earlier keys
    come from a key/value cache).
    """
    mask = np.triu(np.ones((t_q, t_k), dtype=bool), k=1 + t_k - t_q)
    mask.flags.writeable = False
    return mask


def scaled_dot_product_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = True,
                                 scale: float | None = None,
                                 dropout_mask: np.ndarray | None = None) -> Tensor:
    """softmax(q k^T * scale [+ causal mask]) v.   q: (..., Tq, hd), k, v: (..., Tk, hd).

    ``scale`` defaults to 1/sqrt(hd); ``dropout_mask`` (..., Tq, Tk), if given, multiplies the
    weights P (inverted dropout, D). With S the scores and P = softmax(S):
    dv = (P D)^T g,  dP = (g v^T) D,  dS = P (dP - rowsum(dP P)),  dq = dS k scale,
    dk = dS^T q scale.
    """
    check_attention(q, k, v)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    qd, kd, vd = q.data, k.data, v.data
    d = None if dropout_mask is None else np.asarray(dropout_mask, dtype=q.dtype)
    s = (qd @ kd.swapaxes(-1, -2)) * scale  # S: (..., Tq, Tk)
    if causal:
        s[..., causal_mask(q.shape[-2], k.shape[-2])] = -np.inf
    p = np.exp(s - s.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)  # P = softmax(S)
    pd = p if d is None else p * d

    def backward(g):  # g: (..., Tq, hd)
        dp = g @ vd.swapaxes(-1, -2) if d is None else (g @ vd.swapaxes(-1, -2)) * d
        ds = p * (dp - (dp * p).sum(axis=-1, keepdims=True)) * scale  # dS, times the scale
        return ds @ kd, ds.swapaxes(-1, -2) @ qd, pd.swapaxes(-1, -2) @ g

    return Tensor.from_op(pd @ vd, (q, k, v), backward)


def causal_self_attention(qkv: Tensor, n_head: int,
                          dropout_mask: np.ndarray | None = None) -> Tensor:
    """GPT's attention from its fused projection.   qkv: (B, T, 3C) -> (B, T, C).

    Split qkv into q, k, v, view each as n_head heads, causal scaled_dot_product_attention (with
    ``dropout_mask`` (B, H, T, T) on the weights, if given), and merge the heads back.
    """
    check_qkv(qkv, n_head)
    q, k, v = (split_heads(z, n_head) for z in split(qkv, 3, axis=-1))  # each (B, H, T, hd)
    return merge_heads(scaled_dot_product_attention(q, k, v, True, None, dropout_mask))


def split_heads(x: Tensor, n_head: int) -> Tensor:
    """(B, T, C) -> (B, n_head, T, C / n_head)."""
    b, t, c = x.shape
    return transpose(reshape(x, (b, t, n_head, c // n_head)), (0, 2, 1, 3))


def merge_heads(y: Tensor) -> Tensor:
    """(B, H, T, hd) -> (B, T, H hd): the inverse of [`split_heads`][]."""
    b, h, t, hd = y.shape
    return reshape(transpose(y, (0, 2, 1, 3)), (b, t, h * hd))


def check_attention(q: Tensor, k: Tensor, v: Tensor) -> None:
    """A ShapeError unless q: (..., Tq, hd), k and v: (..., Tk, hd), with the same leading axes."""
    if q.ndim < 2 or k.shape != v.shape or q.shape[-1] != k.shape[-1] \
            or q.shape[:-2] != k.shape[:-2]:
        raise ShapeError(
            f"attention: q {q.shape}, k {k.shape}, v {v.shape} do not fit "
            "(expected (..., Tq, hd), (..., Tk, hd), (..., Tk, hd))"
        )


def check_qkv(qkv: Tensor, n_head: int) -> None:
    """A ShapeError unless qkv is (B, T, 3C) with C divisible by ``n_head``."""
    if qkv.ndim != 3 or qkv.shape[-1] % (3 * n_head):
        raise ShapeError(
            f"causal_self_attention: qkv {qkv.shape} is not (B, T, 3C) with C divisible by {n_head}"
        )
