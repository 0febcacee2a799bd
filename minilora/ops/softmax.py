"""Fused softmax, log-softmax and cross-entropy, each with a hand-written backward.

All three subtract the row maximum first (through ``scipy.special.logsumexp`` or explicitly), so
they stay finite for logits of +-1e4 in float32.
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
    """Mean negative log-likelihood of integer ``targets`` under ``softmax(logits)``.

    logits: (..., V), targets: (...) integers in [0, V). Positions whose target equals
    ``ignore_index`` count neither in the sum nor in the mean (all ignored gives NaN, as PyTorch).
    VJP: (softmax(logits) - onehot(targets)) * g / count.
    """
    t = np.asarray(targets.data if isinstance(targets, Tensor) else targets)
    if logits.ndim < 1 or logits.shape[:-1] != t.shape:
        raise ShapeError(
            f"cross_entropy: logits {logits.shape} need targets of shape {logits.shape[:-1]}, "
            f"got {t.shape}"
        )
    if not np.issubdtype(t.dtype, np.integer):
        raise ShapeError(f"cross_entropy: targets must be integers, got dtype {t.dtype}")
    vocab = logits.shape[-1]
    x = logits.data.reshape(-1, vocab)
    t = t.reshape(-1)
    valid = np.ones(t.shape, bool) if ignore_index is None else t != ignore_index
    bad = valid & ((t < 0) | (t >= vocab))
    if bad.any():
        raise ShapeError(f"cross_entropy: target {t[bad][0]} is outside [0, {vocab})")
    rows = np.flatnonzero(valid)
    picked = t[rows]
    # log-probabilities as (x - top) - lse, as in log_softmax: nothing of the logits' scale is lost
    top = x.max(axis=1, keepdims=True)  # (N, 1)
    lse = logsumexp(x - top, axis=1)  # (N,)
    count = len(rows)
    with np.errstate(invalid="ignore", divide="ignore"):
        nll = lse[rows].sum() - (x[rows, picked] - top[rows, 0]).sum()
        loss = nll / np.asarray(count, dtype=x.dtype)

    shape = logits.shape

    def backward(g):
        p = x - top  # recomputed, not saved: (N, V) can be large for a big vocabulary
        p -= lse[:, None]
        np.exp(p, out=p)
        p[rows, picked] -= 1
        if count != len(t):
            p[~valid] = 0
        p *= g / max(count, 1)
        return (p.reshape(shape),)

    return Tensor.from_op(np.asarray(loss, dtype=x.dtype), (logits,), backward)
