"""The LoRA linear layer as one fused op.

    y = x W^T + b + s * (d(x) A^T) B^T          x: (..., in), W: (out, in), A: (r, in), B: (out, r)

d is dropout on the adapter path (a fixed 0/scale mask, or none). ``B A`` is never formed: the
adapter costs r (in + out) multiply-adds per row. With G = dL/dy, h = d(x) A^T and u = G B:
    dB = s G^T h,   dA = s u^T d(x),   dx = G W + s d'(u A),   dW = G^T x (only if W trains).
"""

from __future__ import annotations

import numpy as np

from minilora.errors import ShapeError
from minilora.ops.backend import mm
from minilora.tensor import Tensor


def lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor,
                scaling: float, dropout_mask: np.ndarray | None = None) -> Tensor:
    """x W^T + b + scaling * ((x * dropout_mask) A^T) B^T.   x: (..., in) -> (..., out).

    dropout_mask: None, or an array broadcastable to x holding 0 and 1/(1-p) (inverted dropout).
    """
    out_f, in_f = weight.shape
    r = lora_A.shape[0]
    if x.shape[-1] != in_f or lora_A.shape != (r, in_f) or lora_B.shape != (out_f, r):
        raise ShapeError(
            f"lora_linear: x {x.shape}, W {weight.shape}, A {lora_A.shape}, B {lora_B.shape} "
            "do not fit "
            f"(expected x (..., {in_f}), A (r, {in_f}), B ({out_f}, r))"
        )
    scaling = float(scaling)  # an np.float64 scaling (alpha / np.sqrt(r)) would make dA, dB float64
    if dropout_mask is not None:
        dropout_mask = np.asarray(dropout_mask, dtype=x.dtype)  # so would a float64 mask
    x2 = x.data.reshape(-1, in_f)
    xd = x2 if dropout_mask is None else (x.data * dropout_mask).reshape(-1, in_f)
    h = mm(xd, lora_A.data.T)  # (N, r)
    y = mm(x2, weight.data.T)
    if bias is not None:
        y += bias.data
    y += mm(h * scaling, lora_B.data.T)

    # Keep only what the wanted gradients use. A frozen W keeps no x for dW; dA needs d(x).
    need_x, need_w, need_a, need_b = (t.requires_grad for t in (x, weight, lora_A, lora_B))
    has_bias, x_shape = bias is not None, x.shape
    need_bias = has_bias and bias.requires_grad
    w = weight.data if need_x else None
    a = lora_A.data if need_x else None
    b = lora_B.data if need_x or need_a else None
    saved_h = h if need_b else None
    saved_xd = xd if need_a else None
    saved_x = x2 if need_w else None

    def backward(g):
        g2 = g.reshape(-1, out_f)
        u = mm(g2, b) if b is not None else None  # G B: (N, r)
        gB = mm(saved_h.T * scaling, g2).T if need_b else None  # (s h^T G)^T: (out, r)
        gA = mm(u.T * scaling, saved_xd) if need_a else None
        gx = None
        if need_x:
            adapter = mm(u * scaling, a)
            if dropout_mask is not None:
                adapter = (adapter.reshape(x_shape) * dropout_mask).reshape(-1, in_f)
            gx = mm(g2, w)
            gx += adapter
            gx = gx.reshape(x_shape)
        gW = mm(g2.T, saved_x) if need_w else None
        gb = g2.sum(axis=0) if need_bias else None
        return [gx, gW] + ([gb] if has_bias else []) + [gA, gB]

    parents = (x, weight) + ((bias,) if bias is not None else ()) + (lora_A, lora_B)
    return Tensor.from_op(y.reshape(*x.shape[:-1], out_f), parents, backward)
