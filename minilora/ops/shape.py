"""Ops that move numbers without changing them: reshape, transpose, indexing, concatenate, split."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from minilora.errors import ShapeError
from minilora.tensor import Tensor


def reshape(a: Tensor, shape) -> Tensor:
    """``a`` with a new shape of the same size (one entry may be -1)."""
    shape = (shape,) if isinstance(shape, (int, np.integer)) else tuple(shape)
    try:
        out = a.data.reshape(shape)
    except ValueError:
        raise ShapeError(f"cannot reshape tensor of shape {a.shape} into {shape}") from None
    shape_in = a.shape
    return Tensor.from_op(out, (a,), lambda g: (g.reshape(shape_in),))


def transpose(a: Tensor, axes=None) -> Tensor:
    """``a`` with its axes permuted (reversed by default), as ``np.transpose``."""
    given = tuple(range(a.ndim))[::-1] if axes is None else tuple(int(x) for x in axes)
    axes = tuple(x % a.ndim if -a.ndim <= x < a.ndim else x for x in given)  # wrap only valid axes
    if sorted(axes) != list(range(a.ndim)):
        raise ShapeError(f"transpose axes {given} are not a permutation of {a.ndim} axes")
    inverse = tuple(np.argsort(axes))
    return Tensor.from_op(a.data.transpose(axes), (a,), lambda g: (g.transpose(inverse),))


def swapaxes(a: Tensor, axis1: int, axis2: int) -> Tensor:
    """``a`` with two axes exchanged."""
    if not (-a.ndim <= axis1 < a.ndim and -a.ndim <= axis2 < a.ndim):
        raise ShapeError(f"swapaxes({axis1}, {axis2}) is out of range for a tensor of {a.shape}")
    axes = list(range(a.ndim))
    axes[axis1], axes[axis2] = axes[axis2], axes[axis1]
    return transpose(a, axes)


def _is_basic(index) -> bool:
    """True if ``index`` only slices (ints, slices, None, ...): each element taken at most once."""
    parts = index if isinstance(index, tuple) else (index,)
    return all(p is None or p is Ellipsis or isinstance(p, (int, np.integer, slice)) for p in parts)


def getitem(a: Tensor, index) -> Tensor:
    """``a[index]`` for ints, slices and integer arrays (a gather: the basis of embeddings)."""
    if isinstance(index, Tensor):
        index = index.data
    elif isinstance(index, tuple):
        index = tuple(i.data if isinstance(i, Tensor) else i for i in index)
    try:
        out = np.asarray(a.data[index])  # a view for slices, a copy for integer arrays
    except IndexError as err:
        raise ShapeError(f"index {index!r} does not fit tensor of shape {a.shape}: {err}") from None
    basic = _is_basic(index)

    shape, dtype = a.shape, a.dtype

    def backward(g):
        ga = np.zeros(shape, dtype=dtype)
        if basic:
            ga[index] = g
        elif isinstance(index, np.ndarray) and np.issubdtype(index.dtype, np.integer):
            _scatter_add_rows(ga, index, g)
        else:  # an integer array may pick the same row twice: gradients must add up
            np.add.at(ga, index, g)
        return (ga,)

    return Tensor.from_op(out, (a,), backward)


def _scatter_add_rows(target: np.ndarray, rows: np.ndarray, g: np.ndarray) -> None:
    """target[rows[i]] += g[i] for every i, repeated rows adding up (an embedding's backward).

    Sorting the rows and summing each run with ``np.add.reduceat`` is faster than ``np.add.at``
    (docs/performance.md), and deterministic (each run is summed in order).
    """
    rows = rows.reshape(-1) % max(target.shape[0], 1)  # negative indices, as NumPy reads them
    g = g.reshape(len(rows), *target.shape[1:])
    if len(rows) == 0:
        return
    order = np.argsort(rows, kind="stable")
    sorted_rows = rows[order]
    starts = np.flatnonzero(np.concatenate(([True], sorted_rows[1:] != sorted_rows[:-1])))
    target[sorted_rows[starts]] += np.add.reduceat(g[order], starts, axis=0)


def concatenate(tensors: Sequence[Tensor], axis: int = 0) -> Tensor:
    """Join tensors along an existing axis."""
    tensors = tuple(tensors)
    if not tensors:
        raise ShapeError("concatenate() needs at least one tensor")
    try:
        out = np.concatenate([t.data for t in tensors], axis=axis)
    except ValueError as err:
        shapes = [t.shape for t in tensors]
        raise ShapeError(f"cannot concatenate shapes {shapes} along axis {axis}: {err}") from None
    bounds = np.cumsum([t.shape[axis] for t in tensors])[:-1]

    def backward(g):
        return tuple(np.split(g, bounds, axis=axis))

    return Tensor.from_op(out, tensors, backward)


def stack(tensors: Sequence[Tensor], axis: int = 0) -> Tensor:
    """Join same-shaped tensors along a new axis."""
    tensors = tuple(tensors)
    shapes = {t.shape for t in tensors}
    if len(shapes) != 1:
        raise ShapeError(f"stack() needs tensors of one shape, got {sorted(shapes)}")
    ndim = tensors[0].ndim + 1
    if not -ndim <= axis < ndim:
        raise ShapeError(f"stack(): axis {axis} is out of range for {ndim} dimensions")
    axis = axis % ndim
    return concatenate([reshape(t, t.shape[:axis] + (1,) + t.shape[axis:]) for t in tensors], axis)


def split(a: Tensor, indices_or_sections, axis: int = 0) -> list[Tensor]:
    """Split along ``axis`` into equal sections or at the given indices, as ``np.split``."""
    if not -a.ndim <= axis < a.ndim:
        raise ShapeError(f"split(): axis {axis} is out of range for a tensor of shape {a.shape}")
    axis = axis % a.ndim
    n = a.shape[axis]
    if isinstance(indices_or_sections, (int, np.integer)):
        sections = int(indices_or_sections)
        if sections <= 0 or n % sections:
            raise ShapeError(f"split(): axis {axis} of length {n} does not divide into {sections}")
        bounds = list(range(0, n + 1, n // sections))
    else:
        # negative indices as slicing reads them
        cuts = (int(i) + n if i < 0 else int(i) for i in indices_or_sections)
        bounds = [0, *(min(max(i, 0), n) for i in cuts), n]
    pieces = []
    for start, stop in zip(bounds[:-1], bounds[1:], strict=True):
        index = (slice(None),) * axis + (slice(start, max(start, stop)),)
        pieces.append(getitem(a, index))
    return pieces
