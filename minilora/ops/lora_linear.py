"""The LoRA linear layer as one op: its equation and its vector-Jacobian product.

The engine runs the fast version (``minilora.ops.backend.lora_linear``), which computes the same
numbers in row blocks on the engine's threads; ``tests/ops/test_kernels.py`` holds the two equal.
"""

from __future__ import annotations

import numpy as np

from minilora.errors import ShapeError
from minilora.tensor import Tensor


def lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor,
                scaling: float, dropout_mask: np.ndarray | None = None) -> Tensor:
    """y = x W^T + b + s (d(x) A^T) B^T.   x: (..., in), W: (out, in), A: (r, in), B: (out, r).

    d(x) = x * dropout_mask (0 or 1/(1-p), broadcastable to x), or x. ``B A`` is never formed.
    With G = dL/dy, h = d(x) A^T and u = G B (rows summed over the leading axes):
    dB = s G^T h,  dA = s u^T d(x),  dx = G W + s d(u A),  dW = G^T x,  db = sum(G).
    """
    check_lora_linear(x, weight, lora_A, lora_B)
    s, (W, A, B) = float(scaling), (weight.data, lora_A.data, lora_B.data)
    mask = None if dropout_mask is None else np.asarray(dropout_mask, dtype=x.dtype)
    xd = x.data if mask is None else x.data * mask        # d(x): (..., in)
    h = xd @ A.T                                          # (..., r)
    y = x.data @ W.T + s * (h @ B.T) + (0.0 if bias is None else bias.data)  # (..., out)

    def backward(g):                                      # g: (..., out)
        u = g @ B                                         # G B: (..., r)
        gx = None
        if x.requires_grad:
            du = s * (u @ A)                              # s u A: (..., in), through d too
            gx = g @ W + (du if mask is None else du * mask)
        gW = _rows(g).T @ _rows(x.data) if weight.requires_grad else None  # never for frozen W
        gb = [_rows(g).sum(axis=0)] if bias is not None else []
        gA = s * _rows(u).T @ _rows(xd)                   # (r, in)
        gB = s * _rows(g).T @ _rows(h)                    # (out, r)
        return [gx, gW, *gb, gA, gB]

    parents = (x, weight) + ((bias,) if bias is not None else ()) + (lora_A, lora_B)
    return Tensor.from_op(y, parents, backward)


def _rows(a: np.ndarray) -> np.ndarray:
    """(..., n) -> (N, n): the leading axes as one axis of rows."""
    return a.reshape(-1, a.shape[-1])


def check_lora_linear(x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor) -> None:
    """A ShapeError unless x: (..., in), W: (out, in), A: (r, in), B: (out, r)."""
    out_f, in_f = weight.shape
    r = lora_A.shape[0]
    if x.shape[-1] != in_f or lora_A.shape != (r, in_f) or lora_B.shape != (out_f, r):
        raise ShapeError(
            f"lora_linear: x {x.shape}, W {weight.shape}, A {lora_A.shape}, B {lora_B.shape} "
            f"do not fit (expected x (..., {in_f}), A (r, {in_f}), B ({out_f}, r))"
        )


def lora_slices(x: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float,
                slices: tuple[tuple[int, int], ...], out_features: int,
                dropout_mask: np.ndarray | None = None) -> Tensor:
    """The low-rank path alone, written into row slices of the output: (..., out).

    x: (..., in); A: (k r, in) = [A_1; ...; A_k]; B: (k w, r) = [B_1; ...; B_k]; ``slices``: k
    pairs (lo, hi), hi - lo = w, apart, inside [0, out) (loralib's ``MergedLinear`` layout).
    y[..., lo_i:hi_i] = s (d(x) A_i^T) B_i^T, and 0 outside the slices: an adapter on q and v of
    a fused q, k, v projection. A full adapter is the case k = 1, slices = ((0, out),).
    With G = dL/dy, G_i = G[..., lo_i:hi_i], h_i = d(x) A_i^T and u = [G_1 B_1, ..., G_k B_k]:
    dB_i = s G_i^T h_i,  dA = s u^T d(x) (row block i is s (G_i B_i)^T d(x)),  dx = s d(u A).
    """
    check_lora_slices(x, lora_A, lora_B, slices, out_features)
    s, A, B, k = float(scaling), lora_A.data, lora_B.data, len(slices)
    r, w = A.shape[0] // k, B.shape[0] // k
    mask = None if dropout_mask is None else np.asarray(dropout_mask, dtype=x.dtype)
    xd = x.data if mask is None else x.data * mask        # d(x): (..., in)
    h = xd @ A.T                                          # (..., k r)
    y = np.zeros((*x.shape[:-1], out_features), dtype=np.result_type(xd, A, B))
    for i, (lo, hi) in enumerate(slices):
        y[..., lo:hi] = s * (h[..., i * r:(i + 1) * r] @ B[i * w:(i + 1) * w].T)
    need_x = x.requires_grad

    def backward(g):                                      # g: (..., out)
        u = np.concatenate([g[..., lo:hi] @ B[i * w:(i + 1) * w]
                            for i, (lo, hi) in enumerate(slices)], axis=-1)  # (..., k r)
        gx = None
        if need_x:
            du = s * (u @ A)                              # (..., in), through d too
            gx = du if mask is None else du * mask
        gA = s * _rows(u).T @ _rows(xd)                   # (k r, in)
        gB = np.concatenate([s * _rows(g[..., lo:hi]).T @ _rows(h[..., i * r:(i + 1) * r])
                             for i, (lo, hi) in enumerate(slices)], axis=0)  # (k w, r)
        return [gx, gA, gB]

    return Tensor.from_op(y, (x, lora_A, lora_B), backward)


def check_lora_slices(x: Tensor, lora_A: Tensor, lora_B: Tensor,
                      slices: tuple[tuple[int, int], ...], out_features: int) -> None:
    """A ShapeError unless A: (k r, in), B: (k w, r) and the k slices are w wide, apart and
    inside [0, out)."""
    k = len(slices)
    widths = {hi - lo for lo, hi in slices}
    ordered = sorted(slices)
    fits = (k > 0 and lora_A.ndim == 2 and lora_B.ndim == 2 and x.shape[-1] == lora_A.shape[1]
            and lora_A.shape[0] % k == 0 and lora_B.shape[0] % k == 0
            and lora_B.shape[1] == lora_A.shape[0] // k and widths == {lora_B.shape[0] // k}
            and ordered[0][0] >= 0 and ordered[-1][1] <= out_features
            and all(a[1] <= b[0] for a, b in zip(ordered, ordered[1:], strict=False)))
    if not fits:
        raise ShapeError(f"lora_slices: x {x.shape}, A {lora_A.shape}, B {lora_B.shape}, slices "
                         f"{slices} of {out_features} outputs do not fit (expected A (k r, in), "
                         "B (k w, r) and k slices w wide, apart, inside the outputs)")
