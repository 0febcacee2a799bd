"""Grouped-query causal attention: H query heads share Hkv key/value heads, in groups of G = H/Hkv.

Query head h reads key/value head h // G (Hugging Face's ``repeat_kv`` layout), so with
S_h = q_h k_{h//G}^T * scale (masked above the diagonal), P_h = softmax(S_h), out_h = P_h v_{h//G}:
    dq_h = dS_h k_{h//G} * scale,   dS_h = P_h * (dP_h - rowsum(dP_h * P_h)),   dP_h = g_h v^T,
    dk_j = sum over the group's heads h of dS_h^T q_h * scale,   dv_j = sum of P_h^T g_h.
A shared head's gradient is the sum over its group, because it is used G times. With G = 1 this
is ordinary multi-head attention. Queries are the last Tq of the Tk positions (a key/value cache
holds the first Tk - Tq).
"""

from __future__ import annotations

import math

import numpy as np

from minilora.errors import ShapeError
from minilora.ops.attention import causal_mask
from minilora.ops.backend import swap
from minilora.ops.backend.attention import attention_backward, attention_forward
from minilora.tensor import Tensor


def _check(q: Tensor, k: Tensor, v: Tensor, scale: float | None) -> tuple[int, float]:
    """G and the scale; refuses shapes that are not (B, H, Tq, hd), (B, Hkv, Tk, hd) twice."""
    if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] \
            or q.shape[3] != k.shape[3] or q.shape[1] % k.shape[1] or q.shape[2] > k.shape[2]:
        raise ShapeError(f"grouped_query_attention: q {q.shape}, k {k.shape}, v {v.shape} do not "
                         "fit (expected (B, H, Tq, hd), (B, Hkv, Tk, hd), (B, Hkv, Tk, hd) with "
                         "H a multiple of Hkv and Tq <= Tk)")
    hd = q.shape[3]
    return q.shape[1] // k.shape[1], 1.0 / math.sqrt(hd) if scale is None else float(scale)


def grouped_query_attention_reference(q: Tensor, k: Tensor, v: Tensor,
                                      scale: float | None = None) -> Tensor:
    """The equation, with each key/value head repeated for its group.   -> (B, H, Tq, hd)."""
    group, scale = _check(q, k, v, scale)
    b, hkv, t_k, hd = k.shape
    qd, kr, vr = q.data, np.repeat(k.data, group, axis=1), np.repeat(v.data, group, axis=1)
    s = np.where(causal_mask(q.shape[2], t_k), -np.inf, qd @ swap(kr) * scale)  # (B, H, Tq, Tk)
    p = np.exp(s - s.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)

    def backward(g):
        dp = g @ swap(vr)
        ds = p * (dp - np.sum(dp * p, axis=-1, keepdims=True)) * scale
        dk = (swap(ds) @ qd).reshape(b, hkv, group, t_k, hd).sum(axis=2)  # the group's sum
        dv = (swap(p) @ g).reshape(b, hkv, group, t_k, hd).sum(axis=2)
        return ds @ kr, dk, dv

    return Tensor.from_op(p @ vr, (q, k, v), backward)


def grouped_query_attention(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None) -> Tensor:
    """:func:`grouped_query_attention_reference` on minilora's blocked attention kernel.

    The G query heads of a group become one stack, (B * Hkv, G, Tq, hd), a view of q; their
    key/value head is broadcast over the stack (a zero-stride view, no copy), so the kernel runs
    unchanged, skipping the keys a causal block cannot see. It returns per-query-head dk and dv,
    which are summed over the group.
    """
    group, scale = _check(q, k, v, scale)
    b, h, t_q, hd = q.shape
    hkv, t_k = k.shape[1], k.shape[2]
    stack = (b * hkv, group)
    q5 = q.data.reshape(*stack, t_q, hd)
    k5, v5 = (np.broadcast_to(z.data.reshape(b * hkv, 1, t_k, hd), (*stack, t_k, hd))
              for z in (k, v))
    out, p = attention_forward(q5, k5, v5, True, scale)
    need = (q.requires_grad, k.requires_grad, v.requires_grad)

    def backward(g):
        dq, dk, dv = attention_backward(g.reshape(*stack, t_q, hd), q5, k5, v5, p, scale, need,
                                        causal=True)
        shared = [None if d is None else d.sum(axis=1).reshape(b, hkv, t_k, hd) for d in (dk, dv)]
        return (None if dq is None else dq.reshape(b, h, t_q, hd), *shared)

    return Tensor.from_op(out.reshape(b, h, t_q, hd), (q, k, v), backward)
