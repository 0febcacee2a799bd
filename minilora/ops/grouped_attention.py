"""Grouped-query causal attention: H query heads share Hkv key/value heads, in groups of G = H/Hkv.

Query head h reads key/value head h // G (Hugging Face's ``repeat_kv`` layout), so with
S_h = q_h k_{h//G}^T * scale (masked above the diagonal), P_h = softmax(S_h), out_h = P_h v_{h//G}:
    dq_h = dS_h k_{h//G} * scale,   dS_h = P_h * (dP_h - rowsum(dP_h * P_h)),   dP_h = g_h v^T,
    dk_j = sum over the group's heads h of dS_h^T q_h * scale,   dv_j = sum of P_h^T g_h.
A shared head's gradient is the sum over its group, because it is used G times. With G = 1 this
is ordinary multi-head attention. Queries are the last Tq of the Tk positions (a key/value cache
holds the first Tk - Tq). The engine runs the fast version (``minilora.ops.backend.
grouped_attention``); ``tests/ops/test_kernels.py`` holds the two equal.
"""

from __future__ import annotations

import math

import numpy as np

from minilora.errors import ShapeError
from minilora.ops.attention import causal_mask
from minilora.tensor import Tensor


def check_grouped_attention(q: Tensor, k: Tensor, v: Tensor,
                            scale: float | None) -> tuple[int, float]:
    """G and the scale; refuses shapes that are not (B, H, Tq, hd), (B, Hkv, Tk, hd) twice."""
    if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] \
            or q.shape[3] != k.shape[3] or q.shape[1] % k.shape[1] or q.shape[2] > k.shape[2]:
        raise ShapeError(f"grouped_query_attention: q {q.shape}, k {k.shape}, v {v.shape} do not "
                         "fit (expected (B, H, Tq, hd), (B, Hkv, Tk, hd), (B, Hkv, Tk, hd) with "
                         "H a multiple of Hkv and Tq <= Tk)")
    hd = q.shape[3]
    return q.shape[1] // k.shape[1], 1.0 / math.sqrt(hd) if scale is None else float(scale)


def grouped_query_attention(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None) -> Tensor:
    """Causal attention, each key/value head repeated for its group (scale: 1/sqrt(hd) unless
    given).   q: (B, H, Tq, hd), k, v: (B, Hkv, Tk, hd) -> (B, H, Tq, hd)."""
    group, scale = check_grouped_attention(q, k, v, scale)
    b, hkv, t_k, hd = k.shape
    qd, kr, vr = q.data, np.repeat(k.data, group, axis=1), np.repeat(v.data, group, axis=1)
    scores = qd @ kr.swapaxes(-1, -2) * scale  # (B, H, Tq, Tk)
    s = np.where(causal_mask(q.shape[2], t_k), -np.inf, scores)
    p = np.exp(s - s.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)

    def backward(g):
        dp = g @ vr.swapaxes(-1, -2)
        ds = p * (dp - np.sum(dp * p, axis=-1, keepdims=True)) * scale
        dk = ds.swapaxes(-1, -2) @ qd  # per query head, then the group's sum
        dv = p.swapaxes(-1, -2) @ g
        return (ds @ kr, dk.reshape(b, hkv, group, t_k, hd).sum(axis=2),
                dv.reshape(b, hkv, group, t_k, hd).sum(axis=2))

    return Tensor.from_op(p @ vr, (q, k, v), backward)
