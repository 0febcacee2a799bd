"""Ops that move numbers: reshape, transpose, swapaxes, getitem (incl. gather), concatenate,
stack, split. Their VJPs only move numbers back, so any misplaced element shows up at once."""

import itertools

import hypothesis.extra.numpy as hnp
import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from minilora import Tensor, ops
from tests.gradcheck import FAST, gradcheck, shapes, values


@FAST
@given(data=st.data())
def test_reshape_gradient_matches_finite_differences(data):
    a = data.draw(shapes().flatmap(values))
    # any shape of the same size: shuffle the prime factors of the size into new axes
    factors = [p for n in a.shape for p in _prime_factors(n)]
    order = data.draw(st.permutations(factors))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(order)), max_size=3)))
    bounds = [0, *cuts, len(order)]
    new_shape = tuple(int(np.prod(order[i:j], dtype=int)) for i, j in itertools.pairwise(bounds))
    if data.draw(st.booleans()) and new_shape:
        new_shape = (-1, *new_shape[1:])
    gradcheck(lambda x: ops.reshape(x, new_shape), a)


def _prime_factors(n: int) -> list[int]:
    out, p = [], 2
    while n > 1:
        while n % p == 0:
            out.append(p)
            n //= p
        p += 1
    return out


@FAST
@given(data=st.data())
def test_transpose_gradient_matches_finite_differences(data):
    """Up to 4 axes: with 3 or fewer, most permutations are their own inverse, and a VJP that
    permuted g by ``axes`` instead of by its inverse would pass."""
    a = data.draw(shapes(max_dims=4, max_side=2).flatmap(values))
    axes = data.draw(st.one_of(st.none(), st.permutations(range(a.ndim))))
    if axes is not None and data.draw(st.booleans()):
        axes = [ax - a.ndim for ax in axes]  # negative axes name the same permutation
    gradcheck(lambda x: ops.transpose(x, axes), a)


def test_transpose_by_a_cycle_sends_each_gradient_back_to_its_element():
    """A 3-cycle is not its own inverse: the fixed example behind the property above."""
    x = Tensor(np.zeros((2, 3, 4)), requires_grad=True)
    g = np.arange(24.0).reshape(3, 4, 2)
    ops.transpose(x, (1, 2, 0)).backward(g)
    np.testing.assert_array_equal(x.grad, g.transpose(2, 0, 1))


@FAST
@given(data=st.data())
def test_swapaxes_gradient_matches_finite_differences(data):
    a = data.draw(shapes(min_dims=1).flatmap(values))
    axis1, axis2 = (data.draw(st.integers(-a.ndim, a.ndim - 1)) for _ in range(2))
    gradcheck(lambda x: ops.swapaxes(x, axis1, axis2), a)


@FAST
@given(data=st.data())
def test_getitem_with_basic_indices_gradient_matches_finite_differences(data):
    """Ints, slices (steps, negative ones), None and Ellipsis."""
    a = data.draw(shapes(min_dims=1).flatmap(values))
    index = data.draw(hnp.basic_indices(a.shape, allow_newaxis=True))
    gradcheck(lambda x: ops.getitem(x, index), a)


@FAST
@given(data=st.data())
def test_getitem_with_integer_arrays_gradient_adds_up_repeated_indices(data):
    """A gather, the basis of embeddings: a row picked twice gets both rows' gradients."""
    a = data.draw(shapes(min_dims=1).flatmap(values))
    index = data.draw(hnp.integer_array_indices(a.shape, result_shape=shapes(max_dims=2)))
    gradcheck(lambda x: ops.getitem(x, index), a)


@FAST
@given(data=st.data())
def test_getitem_mixing_an_integer_array_and_a_slice_gradient_matches_finite_differences(data):
    a = data.draw(shapes(min_dims=2).flatmap(values))
    picks = st.integers(-a.shape[0], a.shape[0] - 1)  # negative rows count from the end
    rows = data.draw(hnp.arrays(np.intp, st.integers(1, 5), elements=picks))
    gradcheck(lambda x: ops.getitem(x, (rows, slice(None, None, -1))), a)


def test_getitem_gather_of_a_repeated_row_sums_its_gradients():
    """The fixed example behind the property: row 1 picked three times gets 1 + 2 + 3."""
    table = Tensor(np.zeros((3, 2)), requires_grad=True)
    ops.getitem(table, np.array([1, 0, 1, 1])).backward(np.array([[1.0] * 2, [5.0] * 2, [2.0] * 2,
                                                                  [3.0] * 2]))
    np.testing.assert_array_equal(table.grad, [[5.0, 5.0], [6.0, 6.0], [0.0, 0.0]])


@st.composite
def along_an_axis(draw):
    """1 to 3 arrays equal in every axis but ``axis``, and the axis (maybe negative)."""
    shape = list(draw(shapes(min_dims=1)))
    axis = draw(st.integers(-len(shape), len(shape) - 1))
    arrays = []
    for _ in range(draw(st.integers(1, 3))):
        shape[axis] = draw(st.integers(1, 3))
        arrays.append(draw(values(tuple(shape))))
    return arrays, axis


@FAST
@given(args=along_an_axis())
def test_concatenate_gradient_matches_finite_differences(args):
    arrays, axis = args
    gradcheck(lambda *xs: ops.concatenate(xs, axis=axis), *arrays)


@FAST
@given(data=st.data())
def test_stack_gradient_matches_finite_differences(data):
    shape = data.draw(shapes(max_dims=2))
    arrays = [data.draw(values(shape)) for _ in range(data.draw(st.integers(1, 3)))]
    axis = data.draw(st.integers(-len(shape) - 1, len(shape)))
    gradcheck(lambda *xs: ops.stack(xs, axis=axis), *arrays)


@FAST
@given(data=st.data())
def test_split_into_sections_gradient_matches_finite_differences(data):
    a = data.draw(shapes(min_dims=1).flatmap(values))
    axis = data.draw(st.integers(-a.ndim, a.ndim - 1))
    n = a.shape[axis]
    sections = data.draw(st.sampled_from([d for d in range(1, n + 1) if n % d == 0]))
    gradcheck(lambda x: ops.split(x, sections, axis=axis), a)


@FAST
@given(data=st.data())
def test_split_at_indices_gradient_matches_finite_differences(data):
    """Indices as np.split takes them: negative, repeated, out of order, past either end."""
    a = data.draw(shapes(min_dims=1).flatmap(values))
    axis = data.draw(st.integers(-a.ndim, a.ndim - 1))
    n = a.shape[axis]
    indices = data.draw(st.lists(st.integers(-n - 1, n + 1), max_size=3))
    pieces = ops.split(Tensor(a), indices, axis=axis)
    for got, expected in zip(pieces, np.split(a, indices, axis=axis), strict=True):
        np.testing.assert_array_equal(got.data, expected)
    gradcheck(lambda x: ops.split(x, indices, axis=axis), a)
