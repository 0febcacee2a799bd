"""The checks check: each helper in tests/gradcheck.py fails on a deliberately wrong op.

Everything else in tests/ops trusts these helpers, so their power to fail is pinned here for good,
not only by a one-off experiment.
"""

import numpy as np
import pytest

from minilora import Tensor, ops
from tests.gradcheck import assert_same_function, gradcheck

X = np.array([[0.3, -1.2, 0.7], [1.1, 0.2, -0.4]])


def exp_with_vjp(vjp):
    """exp(x) with a hand-made VJP, to plant mistakes in."""
    def op(x):
        out = np.exp(x.data)
        return Tensor.from_op(out, (x,), lambda g: (vjp(g, out),))
    return op


def test_gradcheck_accepts_a_correct_vjp():
    gradcheck(exp_with_vjp(lambda g, out: g * out), X)


@pytest.mark.parametrize("wrong", [lambda g, out: -g * out, lambda g, out: g * out * 1.001,
                                   lambda g, out: out, lambda g, out: g * out[::-1]],
                         ids=["flipped-sign", "0.1%-off", "ignores-upstream", "misplaced"])
def test_gradcheck_rejects_a_wrong_vjp(wrong):
    """'ignores-upstream' is right for G = 1 only: a random upstream gradient catches it."""
    with pytest.raises(AssertionError, match="gradient of input 0"):
        gradcheck(exp_with_vjp(wrong), X)


def test_gradcheck_rejects_a_gradient_for_a_frozen_input():
    def leaky(x, w):  # hands w a gradient although w does not require one
        out = Tensor.from_op(x.data * w.data, (x,), lambda g: (g * w.data,))
        w.grad = np.ones_like(w.data)
        return out

    with pytest.raises(AssertionError, match="does not require grad"):
        gradcheck(leaky, X, X, frozen=(1,))


def test_composition_check_rejects_a_different_gradient_with_the_same_value():
    with pytest.raises(AssertionError, match="gradient of input 0"):
        assert_same_function(exp_with_vjp(lambda g, out: g * out * (1 + 1e-6)), ops.exp, X)
