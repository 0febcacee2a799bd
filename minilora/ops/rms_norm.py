"""RMSNorm (Llama's normalization): its equation and its vector-Jacobian product.

    y = w * x * r,   r = 1 / sqrt(mean(x^2) + eps)  over the last axis    x: (..., C), w: (C,)

With xhat = x r and gh = g * w, the vector-Jacobian product is
    dx = r (gh - xhat mean(gh * xhat)),   dw = sum over rows of g * xhat.

Hugging Face's ``LlamaRMSNorm`` computes the statistics in float32 whatever the input's dtype (an
upcast for half inputs, a downcast for float64). minilora computes in the input's dtype: for
float32 that is the same formula step for step (statistics, then ``x * r``, then ``w *``);
float64 stays float64 (docs/llama.md). The engine runs the fast version
(``minilora.ops.backend.rms_norm``); ``tests/ops/test_kernels.py`` holds the two equal.
"""

from __future__ import annotations

import numpy as np

from minilora.errors import ShapeError
from minilora.tensor import Tensor


def check_rms_norm(x: Tensor, weight: Tensor | None) -> int:
    """C, or a ShapeError unless x: (..., C) and weight (if given): (C,)."""
    c = x.shape[-1] if x.ndim else 0
    if x.ndim == 0 or (weight is not None and weight.shape != (c,)):
        raise ShapeError(f"rms_norm: input {x.shape} and weight "
                         f"{None if weight is None else weight.shape} do not fit "
                         "(expected (..., C) and (C,))")
    return c


def rms_norm(x: Tensor, weight: Tensor | None, eps: float = 1e-6) -> Tensor:
    """w * x / sqrt(mean(x^2) + eps) over the last axis.   x: (..., C), weight: (C,) or None."""
    check_rms_norm(x, weight)
    xd, eps = x.data, float(eps)  # a Python float keeps float32 float32
    r = 1.0 / np.sqrt(np.mean(xd * xd, axis=-1, keepdims=True) + eps)  # (..., 1)
    xhat = xd * r
    w = None if weight is None else weight.data
    y = xhat if w is None else w * xhat

    def backward(g):
        gh = g if w is None else g * w
        gx = r * (gh - xhat * np.mean(gh * xhat, axis=-1, keepdims=True))
        gw = None if w is None else np.sum(g * xhat, axis=tuple(range(g.ndim - 1)))
        return (gx,) if w is None else (gx, gw)

    return Tensor.from_op(y, (x,) if weight is None else (x, weight), backward)
