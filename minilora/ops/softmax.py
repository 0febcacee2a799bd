"""Softmax, log-softmax and cross-entropy: their equations and vector-Jacobian products.

All three subtract the row maximum first, so they stay finite for logits of +-1e4 in float32.
The engine runs the fast cross-entropy (``minilora.ops.backend.softmax``), which keeps no (N, V)
array for the backward pass; ``tests/ops/test_kernels.py`` holds the two equal.
"""

from __future__ import annotations

import numpy as np
from scipy.special import logsumexp

from minilora.errors import ShapeError
from minilora.tensor import Tensor


def _softmax(x: np.ndarray, axis: int) -> np.ndarray:
    e = x - x.max(axis=axis, keepdims=True)
    np.exp(e, out=e)
    e /= e.sum(axis=axis, keepdims=True)
    return e


def softmax(x: Tensor, axis: int = -1) -> Tensor:
    """exp(x) / sum(exp(x)) along ``axis``.   VJP: y * (g - sum(g * y))."""
    y = _softmax(x.data, axis)

    def backward(g):
        gy = g * y
        return (gy - y * gy.sum(axis=axis, keepdims=True),)

    return Tensor.from_op(y, (x,), backward)


def log_softmax(x: Tensor, axis: int = -1) -> Tensor:
    """x - logsumexp(x) along ``axis``.   VJP: g - softmax(x) * sum(g)."""
    # shift first: x - logsumexp(x) would carry logsumexp's rounding at the logits' scale (~1e-3
    # in float32 for logits of 1e4); the shifted logits cancel exactly and the log-sum is small
    out = x.data - x.data.max(axis=axis, keepdims=True)
    out -= logsumexp(out, axis=axis, keepdims=True)

    def backward(g):
        return (g - np.exp(out) * g.sum(axis=axis, keepdims=True),)

    return Tensor.from_op(out, (x,), backward)


def cross_entropy(logits: Tensor, targets, ignore_index: int | None = None) -> Tensor:
    """Mean of -log softmax(logits)[target] over the counted positions.

    logits: (..., V), targets: (...) integers in [0, V). Positions whose target equals
    ``ignore_index`` count neither in the sum nor in the mean (all ignored gives NaN, as PyTorch).
    VJP: (softmax(logits) - onehot(targets)) * g / count, zero at ignored positions.
    """
    x, t, rows = class_targets(logits, targets, ignore_index)  # (N, V), (N,), counted rows
    logp = x - x.max(axis=1, keepdims=True)
    logp -= logsumexp(logp, axis=1, keepdims=True)  # log softmax, shifted first as above: (N, V)
    count = np.asarray(len(rows), dtype=x.dtype)
    with np.errstate(invalid="ignore", divide="ignore"):  # 0 / 0 = NaN when all are ignored
        loss = -logp[rows, t[rows]].sum() / count

    def backward(g):
        dx = np.zeros_like(x)
        dx[rows] = np.exp(logp[rows])
        dx[rows, t[rows]] -= 1.0
        return ((dx * (g / max(len(rows), 1))).reshape(logits.shape),)

    return Tensor.from_op(np.asarray(loss, dtype=x.dtype), (logits,), backward)


def class_targets(logits: Tensor, targets, ignore_index: int | None):
    """(logits as (N, V), targets as (N,), the counted rows), after checking the targets: a
    ShapeError unless they are integers of shape logits.shape[:-1] in [0, V) (or ignored)."""
    t = np.asarray(targets.data if isinstance(targets, Tensor) else targets)
    if logits.ndim < 1 or logits.shape[:-1] != t.shape:
        raise ShapeError(
            f"cross_entropy: logits {logits.shape} need targets of shape {logits.shape[:-1]}, "
            f"got {t.shape}"
        )
    if not np.issubdtype(t.dtype, np.integer):
        raise ShapeError(f"cross_entropy: targets must be integers, got dtype {t.dtype}")
    vocab = logits.shape[-1]
    t = t.reshape(-1)
    valid = np.ones(t.shape, bool) if ignore_index is None else t != ignore_index
    bad = valid & ((t < 0) | (t >= vocab))
    if bad.any():
        raise ShapeError(f"cross_entropy: target {t[bad][0]} is outside [0, {vocab})")
    return logits.data.reshape(-1, vocab), t, np.flatnonzero(valid)
