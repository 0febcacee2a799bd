"""The model's last three steps as one op: final layer norm, ``lm_head`` and cross-entropy.

    h = LN(x) = xhat * gamma + beta      z = h W^T (N, V)      loss = mean over counted rows of
    lse(z_n) - z_n[t_n]

Its VJP, with g the upstream scalar, P = softmax(z) and Y the one-hot targets (zero rows where a
target is ignored), n the number of counted rows:

    dz = (P - Y) g / n      dW = dz^T h      dh = dz W      then LN's VJP on dh (gamma, beta, x).

Written here whole, the (N, V) logits and their gradient exist in full. The engine runs the
kernel of ``minilora.ops.backend.lm_head``, which computes the same function in row blocks and
never holds them; ``tests/ops/test_kernels.py`` holds the two equal.
"""

from __future__ import annotations

import numpy as np
from scipy.special import logsumexp

from minilora.errors import ShapeError
from minilora.ops.normalization import check_layer_norm
from minilora.tensor import Tensor


def lm_head_cross_entropy(x: Tensor, ln_weight: Tensor | None, ln_bias: Tensor | None,
                          weight: Tensor, targets, eps: float = 1e-5,
                          ignore_index: int | None = None) -> Tensor:
    """Mean cross-entropy of the logits LN(x) W^T against ``targets``.

    x: (..., C); ln_weight, ln_bias: (C,) or None; weight W: (V, C), lm_head's (tied to wte in
    GPT-2); targets: (...) integers in [0, V), those equal to ``ignore_index`` not counted.
    """
    x2, t, rows = check_lm_head(x, ln_weight, ln_bias, weight, targets, ignore_index)
    xc = x2 - x2.mean(axis=1, keepdims=True)
    r = 1.0 / np.sqrt((xc * xc).mean(axis=1, keepdims=True) + float(eps))  # (N, 1)
    xhat = xc * r
    h = xhat if ln_weight is None else xhat * ln_weight.data
    h = h if ln_bias is None else h + ln_bias.data  # (N, C)
    z = h @ weight.data.T  # (N, V): the logits, whole
    logp = z - z.max(axis=1, keepdims=True)
    logp -= logsumexp(logp, axis=1, keepdims=True)  # log softmax
    count = np.asarray(len(rows), dtype=x2.dtype)
    with np.errstate(invalid="ignore", divide="ignore"):  # 0 / 0 = NaN when all are ignored
        loss = -logp[rows, t[rows]].sum() / count

    def backward(g):
        dz = np.zeros_like(z)
        dz[rows] = np.exp(logp[rows])
        dz[rows, t[rows]] -= 1.0
        dz *= g / max(len(rows), 1)
        dh = dz @ weight.data  # (N, C)
        gh = dh if ln_weight is None else dh * ln_weight.data
        dx = r * (gh - gh.mean(axis=1, keepdims=True)
                  - xhat * (gh * xhat).mean(axis=1, keepdims=True))
        return ([dx.reshape(x.shape)] + ([(dh * xhat).sum(axis=0)] if ln_weight is not None
                                          else [])
                + ([dh.sum(axis=0)] if ln_bias is not None else []) + [dz.T @ h])

    parents = (x,) + tuple(p for p in (ln_weight, ln_bias) if p is not None) + (weight,)
    return Tensor.from_op(np.asarray(loss, dtype=x2.dtype), parents, backward)


def check_lm_head(x: Tensor, ln_weight: Tensor | None, ln_bias: Tensor | None, weight: Tensor,
                  targets, ignore_index: int | None):
    """(x as (N, C), targets as (N,), the counted rows), after checking every shape: a
    ShapeError naming what was expected and what came."""
    check_layer_norm(x, ln_weight, ln_bias)
    c = x.shape[-1]
    if weight.ndim != 2 or weight.shape[1] != c:
        raise ShapeError(f"lm_head_cross_entropy: weight of shape {weight.shape}, expected "
                         f"(vocab, {c}) for input {x.shape}")
    t = np.asarray(targets.data if isinstance(targets, Tensor) else targets)
    if t.shape != x.shape[:-1]:
        raise ShapeError(f"lm_head_cross_entropy: input {x.shape} needs targets of shape "
                         f"{x.shape[:-1]}, got {t.shape}")
    if not np.issubdtype(t.dtype, np.integer):
        raise ShapeError(f"lm_head_cross_entropy: targets must be integers, got dtype {t.dtype}")
    vocab = weight.shape[0]
    t = t.reshape(-1)
    valid = np.ones(t.shape, bool) if ignore_index is None else t != ignore_index
    bad = valid & ((t < 0) | (t >= vocab))
    if bad.any():
        raise ShapeError(f"lm_head_cross_entropy: target {t[bad][0]} is outside [0, {vocab})")
    return x.data.reshape(-1, c), t, np.flatnonzero(valid)
