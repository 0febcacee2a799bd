"""Fused scaled dot-product attention with an optional causal mask.

With S = q k^T * scale (masked above the diagonal when causal), P = softmax(S), out = P v:
    dv = P^T g,   dP = g v^T,   dS = P * (dP - rowsum(dP * P)),   dq = dS k * scale,   dk = dS^T q * scale.
``causal_self_attention`` does the same straight from GPT's fused ``qkv`` projection, so the head
split and merge cost no extra graph nodes.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from minilora.errors import ShapeError
from minilora.ops.backend import mm, swap
from minilora.tensor import Tensor


@functools.lru_cache(maxsize=16)
def causal_mask(t_q: int, t_k: int) -> np.ndarray:
    """(t_q, t_k) boolean, True above the diagonal: the future positions a query may not see.

    Queries are the last ``t_q`` of the ``t_k`` positions.
    """
    mask = np.triu(np.ones((t_q, t_k), dtype=bool), k=1 + t_k - t_q)
    mask.flags.writeable = False
    return mask


@functools.lru_cache(maxsize=16)
def _causal_bias(t_q: int, t_k: int, dtype: np.dtype) -> np.ndarray:
    # adding 0 / -inf is one fast broadcast pass; boolean-mask assignment is several times slower
    bias = np.where(causal_mask(t_q, t_k), -np.inf, 0.0).astype(dtype)
    bias.flags.writeable = False
    return bias


def attention_forward(q, k, v, causal: bool, scale: float):
    """q: (..., Tq, hd), k, v: (..., Tk, hd) -> out (..., Tq, hd) and the probabilities P (..., Tq, Tk)."""
    s = mm(q, swap(k))
    s *= scale
    if causal:
        s += _causal_bias(q.shape[-2], k.shape[-2], s.dtype)
    s -= s.max(axis=-1, keepdims=True)
    np.exp(s, out=s)
    s /= s.sum(axis=-1, keepdims=True)
    return mm(s, v), s


def attention_backward(g, q, k, v, p, scale: float, need=(True, True, True)):
    """Gradients (dq, dk, dv) for upstream g: (..., Tq, hd); ``need`` skips unwanted ones."""
    dv = mm(swap(p), g) if need[2] else None
    if not (need[0] or need[1]):
        return None, None, dv
    ds = mm(g, swap(v))
    ds -= (ds * p).sum(axis=-1, keepdims=True)
    ds *= p
    ds *= scale
    dq = mm(ds, k) if need[0] else None
    dk = mm(swap(ds), q) if need[1] else None
    return dq, dk, dv


def scaled_dot_product_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = True,
                                 scale: float | None = None) -> Tensor:
    """softmax(q k^T * scale [+ causal mask]) v.   q: (..., Tq, hd), k, v: (..., Tk, hd).

    ``scale`` defaults to 1/sqrt(hd).
    """
    if q.ndim < 2 or k.shape != v.shape or q.shape[-1] != k.shape[-1] or q.shape[:-2] != k.shape[:-2]:
        raise ShapeError(
            f"attention: q {q.shape}, k {k.shape}, v {v.shape} do not fit "
            "(expected (..., Tq, hd), (..., Tk, hd), (..., Tk, hd))"
        )
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    out, p = attention_forward(q.data, k.data, v.data, causal, scale)

    def backward(g):
        need = (q.requires_grad, k.requires_grad, v.requires_grad)
        return attention_backward(g, q.data, k.data, v.data, p, scale, need)

    return Tensor.from_op(out, (q, k, v), backward)


def causal_self_attention(qkv: Tensor, n_head: int) -> Tensor:
    """GPT's attention from the fused projection.   qkv: (B, T, 3C) -> (B, T, C).

    Equal to splitting qkv into q, k, v, viewing each as (B, n_head, T, C/n_head), causal
    scaled_dot_product_attention, and merging the heads back.
    """
    if qkv.ndim != 3 or qkv.shape[-1] % (3 * n_head):  # check before unpacking the shape
        raise ShapeError(
            f"causal_self_attention: qkv {qkv.shape} is not (B, T, 3C) with C divisible by {n_head}"
        )
    b, t, c3 = qkv.shape
    c = c3 // 3
    hd = c // n_head
    scale = 1.0 / math.sqrt(hd)
    heads = qkv.data.reshape(b, t, 3, n_head, hd).transpose(2, 0, 3, 1, 4)  # (3, B, H, T, hd)
    q, k, v = heads[0], heads[1], heads[2]
    out, p = attention_forward(q, k, v, True, scale)

    def backward(g):  # g: (B, T, C)
        gh = g.reshape(b, t, n_head, hd).transpose(0, 2, 1, 3)
        dq, dk, dv = attention_backward(gh, q, k, v, p, scale)
        dqkv = np.empty((b, t, 3, n_head, hd), dtype=g.dtype)
        for i, d in enumerate((dq, dk, dv)):
            dqkv[:, :, i] = d.transpose(0, 2, 1, 3)
        return (dqkv.reshape(b, t, c3),)

    return Tensor.from_op(out.transpose(0, 2, 1, 3).reshape(b, t, c), (qkv,), backward)
