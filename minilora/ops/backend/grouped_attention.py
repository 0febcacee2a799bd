"""The fast grouped-query attention: ``minilora.ops.grouped_attention``'s equation on the blocked
causal attention kernel GPT uses, with no copy of the shared key/value heads."""

from __future__ import annotations

import numpy as np

from minilora.ops.backend.attention import attention_backward, attention_forward
from minilora.ops.grouped_attention import check_grouped_attention
from minilora.tensor import Tensor


def grouped_query_attention(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None) -> Tensor:
    """Causal grouped-query attention.   q: (B, H, Tq, hd), k, v: (B, Hkv, Tk, hd) -> q's shape.

    The same function as ``minilora.ops.grouped_attention.grouped_query_attention``, on the
    blocked attention kernel of ``minilora.ops.backend.attention`` (its products counted there).
    The G query heads of a group become one stack, (B * Hkv, G, Tq, hd), a view of q; their
    key/value head is broadcast over the stack (a zero-stride view, no copy), so the kernel runs
    unchanged, skipping the keys a causal block cannot see. It returns per-query-head dk and dv,
    which are summed over the group.
    """
    group, scale = check_grouped_attention(q, k, v, scale)
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
