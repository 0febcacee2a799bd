"""Reductions: sum, mean, max, with NumPy's ``axis=`` and ``keepdims=``."""

from __future__ import annotations

import numpy as np

from minilora.errors import ShapeError
from minilora.tensor import Tensor


def _axes(axis, ndim: int) -> tuple[int, ...]:
    """``axis`` (None, int or tuple) as a sorted tuple of non-negative axes."""
    if axis is None:
        return tuple(range(ndim))
    axes = (axis,) if isinstance(axis, (int, np.integer)) else tuple(axis)
    limit = ndim if ndim else 1  # not max(ndim, 1): in this module, max is the op below
    out = []
    for ax in axes:
        if not -ndim <= ax < limit:
            raise ShapeError(f"axis {ax} is out of range for a tensor with {ndim} dimensions")
        out.append(int(ax) % limit)
    return tuple(sorted(set(out)))


def _expand(g: np.ndarray, axes: tuple[int, ...], keepdims: bool, shape) -> np.ndarray:
    """Put the reduced axes back into ``g`` and broadcast it to ``shape``."""
    if not keepdims:
        g = np.expand_dims(g, axes)
    return np.broadcast_to(g, shape)


def sum(a: Tensor, axis=None, keepdims: bool = False) -> Tensor:
    """Sum over ``axis`` (all axes by default)."""
    axes = _axes(axis, a.ndim)
    out = np.sum(a.data, axis=axes, keepdims=keepdims)
    shape = a.shape
    return Tensor.from_op(np.asarray(out), (a,), lambda g: (_expand(g, axes, keepdims, shape),))


def mean(a: Tensor, axis=None, keepdims: bool = False) -> Tensor:
    """Mean over ``axis`` (all axes by default)."""
    axes = _axes(axis, a.ndim)
    count = int(np.prod([a.shape[i] for i in axes])) if a.ndim else 1
    out = np.mean(a.data, axis=axes, keepdims=keepdims)

    shape = a.shape

    def backward(g):
        return (_expand(g / count, axes, keepdims, shape),)

    return Tensor.from_op(np.asarray(out), (a,), backward)


def max(a: Tensor, axis=None, keepdims: bool = False) -> Tensor:
    """Maximum over ``axis``; the gradient is shared equally among tied maxima."""
    axes = _axes(axis, a.ndim)
    if a.size == 0:
        raise ShapeError(f"max() of an empty tensor of shape {a.shape}")
    ad = a.data
    top = np.max(ad, axis=axes, keepdims=True)

    def backward(g):
        winners = ad == top
        share = winners / winners.sum(axis=axes, keepdims=True, dtype=ad.dtype)
        return (share * _expand(g, axes, keepdims, top.shape),)

    out = top if keepdims else np.squeeze(top, axis=axes)
    return Tensor.from_op(out, (a,), backward)
