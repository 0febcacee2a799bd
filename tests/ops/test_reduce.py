"""Reductions: sum, mean and max over all axes, one axis or a tuple of them, keepdims or not."""

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minilora import Tensor, ops
from tests.gradcheck import FAST, distinct, gradcheck, shapes, values


@st.composite
def axes_for(draw, ndim: int):
    """None, one axis (maybe negative) or a tuple of distinct axes, as NumPy takes them."""
    if ndim == 0:
        return draw(st.sampled_from([None, ()]))
    return draw(st.one_of(st.none(), st.integers(-ndim, ndim - 1), hnp.valid_tuple_axes(ndim)))


@pytest.mark.parametrize("op", [ops.sum, ops.mean], ids=["sum", "mean"])
@FAST
@given(data=st.data(), keepdims=st.booleans())
def test_sum_and_mean_gradients_match_finite_differences(op, data, keepdims):
    a = data.draw(shapes().flatmap(values))
    axis = data.draw(axes_for(a.ndim))
    gradcheck(lambda x: op(x, axis=axis, keepdims=keepdims), a)


@pytest.mark.parametrize(
    "op, reference", [(ops.sum, np.sum), (ops.mean, np.mean), (ops.max, np.max)],
    ids=["sum", "mean", "max"],
)
@FAST
@given(data=st.data(), keepdims=st.booleans())
def test_reductions_give_numpys_value_and_shape(op, reference, data, keepdims):
    a = data.draw(shapes().flatmap(distinct))
    axis = data.draw(axes_for(a.ndim))
    out = op(Tensor(a), axis=axis, keepdims=keepdims)
    np.testing.assert_allclose(out.data, reference(a, axis=axis, keepdims=keepdims), rtol=1e-12)
    assert out.shape == np.shape(reference(a, axis=axis, keepdims=keepdims))


@FAST
@given(data=st.data(), keepdims=st.booleans())
def test_max_gradient_matches_finite_differences(data, keepdims):
    a = data.draw(shapes().flatmap(distinct))  # no ties: one winner, even after a step of H
    axis = data.draw(axes_for(a.ndim))
    gradcheck(lambda x: ops.max(x, axis=axis, keepdims=keepdims), a)


def test_max_shares_the_gradient_equally_among_ties():
    """A subgradient choice, so not a finite-difference claim: each of k tied maxima gets 1/k."""
    x = Tensor(np.array([[1.0, 3.0, 3.0], [2.0, 0.0, 2.0]]), requires_grad=True)
    ops.max(x, axis=1).backward(np.array([1.0, 4.0]))
    np.testing.assert_array_equal(x.grad, [[0.0, 0.5, 0.5], [2.0, 0.0, 2.0]])
