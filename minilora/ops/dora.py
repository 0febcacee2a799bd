"""DoRA's linear layer as one op: its equation and its vector-Jacobian product.

DoRA (Liu et al., 2024) writes the adapted weight as a magnitude times a direction,
``W' = m / ||W + s B A||_row * (W + s B A)``, with m: (out,) trained beside A and B. The row norm
is detached from the graph (the paper's section 4.3, and PEFT's ``DoraLinearLayer``): it is a
constant of each step, so m, A and B get the gradients of ``c * (...)`` with c = m / n held fixed
but for m. No kernel: the equation is the op the layer runs.
"""

from __future__ import annotations

import numpy as np

from minilora.errors import ShapeError
from minilora.ops.lora_linear import _rows, check_lora_linear
from minilora.tensor import Tensor


def dora_weight_norm(weight: np.ndarray, lora_A: np.ndarray, lora_B: np.ndarray,
                     scaling: float) -> np.ndarray:
    """n = ||W + s B A||, one 2-norm per row of W: (out,), in W's dtype; no graph (detached).

    As PEFT's ``get_weight_norm``: the adapted weight is formed for its norm only, never for the
    output."""
    return np.linalg.norm(weight + float(scaling) * (lora_B @ lora_A), axis=1).astype(
        weight.dtype, copy=False)


def dora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor,
                magnitude: Tensor, scaling: float, dropout_mask: np.ndarray | None = None,
                with_base: bool = True) -> Tensor:
    """y = x W^T + b + (c - 1) * (d(x) W^T) + c * s (d(x) A^T) B^T,  c = m / n,  n = ||W + s B A||.

    x: (..., in), W: (out, in), A: (r, in), B: (out, r), m: (out,); n: (out,) detached. Without
    dropout (d(x) = x) that is ``c * (x W^T + s x A^T B^T) + b``, DoRA's ``m / n * W' x + b``;
    with it, PEFT's form: the base output of x, plus DoRA's correction on the dropped d(x).
    with_base=False: the path alone, without ``x W^T + b`` (one of several adapters).
    With G = dL/dy, G_c = c * G, z = d(x) W^T, h = d(x) A^T, u = G_c B:
    dm = sum_rows(G * (z + s h B^T)) / n,  dB = s G_c^T h,  dA = s u^T d(x),
    dx = G W [with the base] + d((G_c - G) W + s u A),  dW = G^T x [base] + (G_c - G)^T d(x),
    db = sum_rows(G).
    """
    check_dora_linear(x, weight, lora_A, lora_B, magnitude)
    s, (W, A, B, m) = float(scaling), (weight.data, lora_A.data, lora_B.data, magnitude.data)
    n = dora_weight_norm(W, A, B, s)                      # (out,), a constant of the step
    c = m / n                                             # (out,)
    mask = None if dropout_mask is None else np.asarray(dropout_mask, dtype=x.dtype)
    xd = x.data if mask is None else x.data * mask        # d(x): (..., in)
    z = xd @ W.T                                          # (..., out)
    h = xd @ A.T                                          # (..., r)
    v = z + s * (h @ B.T)                                 # (W + s B A) d(x): (..., out)
    y = c * v if with_base and mask is None else (c - 1) * z + c * (v - z)  # the correction
    if with_base and mask is not None:
        y = y + x.data @ W.T
    if with_base and bias is not None:
        y = y + bias.data

    def backward(g):                                      # g: (..., out)
        gc = c * g                                        # G_c
        u = gc @ B                                        # (..., r)
        gx = gW = None
        if x.requires_grad and with_base and mask is None:
            gx = gc @ W + s * (u @ A)                     # G W + (G_c - G) W in one product
        elif x.requires_grad:
            through_d = (gc - g) @ W + s * (u @ A)        # (..., in)
            gx = through_d if mask is None else through_d * mask
            if with_base:
                gx = gx + g @ W
        if weight.requires_grad:                          # never for a frozen W
            gW = _rows(gc - g).T @ _rows(xd)
            if with_base:
                gW = gW + _rows(g).T @ _rows(x.data)
        gb = [_rows(g).sum(axis=0)] if with_base and bias is not None else []
        gA = s * _rows(u).T @ _rows(xd)                   # (r, in)
        gB = s * _rows(gc).T @ _rows(h)                   # (out, r)
        gm = _rows(g * v).sum(axis=0) / n                 # (out,)
        return [gx, gW, *gb, gA, gB, gm]

    parents = (x, weight) + ((bias,) if with_base and bias is not None else ()) + \
        (lora_A, lora_B, magnitude)
    return Tensor.from_op(y, parents, backward)


def check_dora_linear(x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor,
                      magnitude: Tensor) -> None:
    """A ShapeError unless the LoRA shapes fit and m: (out,)."""
    check_lora_linear(x, weight, lora_A, lora_B)
    if magnitude.shape != (weight.shape[0],):
        raise ShapeError(f"dora_linear: magnitude {magnitude.shape} does not fit W {weight.shape} "
                         f"(expected ({weight.shape[0]},), one per output row)")
