"""The fast cross-entropy: ``minilora.ops.softmax.cross_entropy``'s equation, keeping no (N, V)
array for the backward pass (the probabilities are recomputed there from the logits)."""

from __future__ import annotations

import numpy as np
from scipy.special import logsumexp

from minilora.ops.softmax import class_targets
from minilora.tensor import Tensor


def cross_entropy(logits: Tensor, targets, ignore_index: int | None = None) -> Tensor:
    """Mean of -log softmax(logits)[target] over the counted positions: the same function as
    ``minilora.ops.softmax.cross_entropy`` (its docstring has the VJP)."""
    x, t, rows = class_targets(logits, targets, ignore_index)  # (N, V), (N,), counted rows
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
        if count != len(t):  # ignored positions get no gradient
            counted = np.zeros(len(t), bool)
            counted[rows] = True
            p[~counted] = 0
        p *= g / max(count, 1)
        return (p.reshape(shape),)

    return Tensor.from_op(np.asarray(loss, dtype=x.dtype), (logits,), backward)
