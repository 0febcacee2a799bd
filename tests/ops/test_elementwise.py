"""Elementwise ops: every VJP against finite differences, broadcasting pairs included."""

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minilora import Tensor, ops
from tests.gradcheck import FAST, broadcast_pairs, floats, gradcheck, shapes, values

BINARY = {
    "add": ops.add,
    "sub": ops.sub,
    "mul": ops.mul,
}


@st.composite
def broadcast_operands(draw, b_elements=None):
    """Two arrays whose shapes broadcast together (size-1 and missing axes included)."""
    (shape_a, shape_b), _ = draw(broadcast_pairs())
    return draw(values(shape_a)), draw(values(shape_b, b_elements))


@st.composite
def shapes_broadcasting_to(draw, shape):
    """A shape that broadcasts *to* ``shape`` without growing it: trailing axes, some set to 1."""
    kept = draw(st.integers(0, len(shape)))
    tail = shape[len(shape) - kept:]
    return tuple(n if draw(st.booleans()) else 1 for n in tail)


@pytest.mark.parametrize("name", ["add", "sub", "mul"])
@FAST
@given(data=st.data())
def test_binary_op_gradient_matches_finite_differences(name, data):
    a, b = data.draw(broadcast_operands())
    gradcheck(BINARY[name], a, b)


@FAST
@given(operands=broadcast_operands(b_elements=floats(avoid=[0.0], gap=0.5)))
def test_div_gradient_matches_finite_differences(operands):
    gradcheck(ops.div, *operands)  # divisors at least 0.5 from zero: 1/b stays smooth


@FAST
@given(operands=broadcast_operands())
def test_gradient_of_an_operand_that_is_frozen_is_not_computed(operands):
    """With one side frozen, the other side's gradient is still right and the frozen one is None."""
    a, b = operands
    gradcheck(lambda x, y: x * y - x / (y * y + 1.0), a, b, frozen=(1,))


@FAST
@given(a=shapes().flatmap(values))
def test_neg_gradient_matches_finite_differences(a):
    gradcheck(ops.neg, a)


@FAST
@given(a=shapes().flatmap(lambda s: values(s, floats(0.2, 2.0))),
       exponent=st.sampled_from([0.0, 0.5, 1.0, 2.0, 3.0, -1.0, 1.5, -2.5]))
def test_pow_with_a_scalar_exponent_gradient_matches_finite_differences(a, exponent):
    gradcheck(lambda x: x**exponent, a)


@FAST
@given(a=shapes().flatmap(values), exponent=st.sampled_from([2, 3]))
def test_pow_with_an_integer_exponent_accepts_negative_bases(a, exponent):
    gradcheck(lambda x: ops.pow(x, exponent), a)


def test_pow_with_exponent_zero_has_a_zero_gradient_even_at_zero():
    """x**0 is the constant 1; a VJP of 0 * x**-1 would give nan at x = 0."""
    x = Tensor(np.array([0.0, 1.0, -2.0]), requires_grad=True)
    (x**0).backward(np.ones(3))
    np.testing.assert_array_equal(x.grad, np.zeros(3))


@FAST
@given(data=st.data())
def test_pow_with_a_tensor_exponent_gradient_matches_finite_differences(data):
    """Both the base (positive) and the exponent receive gradients: p x^(p-1) and x^p log x."""
    (shape_a, shape_b), _ = data.draw(broadcast_pairs())
    base = data.draw(values(shape_a, floats(0.2, 2.0)))
    exponent = data.draw(values(shape_b))
    gradcheck(ops.pow, base, exponent)


UNARY = {
    "exp": (ops.exp, floats()),
    "log": (ops.log, floats(0.2, 3.0)),  # positive, away from the pole at 0
    "tanh": (ops.tanh, floats()),
    "sqrt": (ops.sqrt, floats(0.2, 3.0)),
    "relu": (ops.relu, floats(avoid=[0.0])),  # the kink at 0
}


@pytest.mark.parametrize("name", sorted(UNARY))
@FAST
@given(data=st.data())
def test_unary_op_gradient_matches_finite_differences(name, data):
    op, elements = UNARY[name]
    gradcheck(op, data.draw(shapes().flatmap(lambda s: values(s, elements))))


@FAST
@given(data=st.data())
def test_where_gradient_goes_to_the_chosen_side(data):
    """The condition broadcasts against both operands; each side gets g only where it was taken."""
    (shape_c, shape_a, shape_b), _ = data.draw(
        hnp.mutually_broadcastable_shapes(num_shapes=3, max_dims=3, max_side=3)
    )
    cond = data.draw(values(shape_c)) > 0
    a, b = data.draw(values(shape_a)), data.draw(values(shape_b))
    gradcheck(lambda x, y: ops.where(cond, x, y), a, b)


@FAST
@given(data=st.data())
def test_masked_fill_gradient_is_zero_where_filled(data):
    shape = data.draw(shapes())
    mask_shape = data.draw(shapes_broadcasting_to(shape))
    mask = data.draw(values(mask_shape)) > 0
    gradcheck(lambda x: ops.masked_fill(x, mask, -7.0), data.draw(values(shape)))


@FAST
@given(a=shapes().flatmap(lambda s: values(s, floats(avoid=[-0.5, 0.5]))))
def test_clip_gradient_matches_finite_differences(a):
    gradcheck(lambda x: ops.clip(x, -0.5, 0.5), a)  # values keep clear of the limits (kinks)


@FAST
@given(a=shapes().flatmap(lambda s: values(s, floats(avoid=[0.5]))), lower=st.booleans())
def test_clip_with_one_limit_gradient_matches_finite_differences(a, lower):
    limits = (0.5, None) if lower else (None, 0.5)
    gradcheck(lambda x: ops.clip(x, *limits), a)


@FAST
@given(a=shapes().flatmap(values))
def test_astype_gradient_comes_back_in_the_input_dtype(a):
    """float64 -> float32 -> float64: the float32 round trip is the identity up to float32 rounding,
    so the VJP is exact (1) while finite differences would see float32 steps; check it directly."""
    x = Tensor(a, requires_grad=True)
    y = ops.astype(x, np.float32)
    assert y.dtype == np.float32
    g = np.random.default_rng(0).standard_normal(a.shape).astype(np.float32)
    y.backward(g)
    assert x.grad.dtype == np.float64
    np.testing.assert_array_equal(x.grad, g.astype(np.float64))


@FAST
@given(a=shapes().flatmap(values))
def test_astype_through_a_wider_float_gradient_matches_finite_differences(a):
    """float64 -> longdouble -> float64 loses nothing, so finite differences can see it."""
    gradcheck(lambda x: ops.astype(ops.astype(x, np.longdouble) * 3.0, np.float64), a)


# ---- what mutation testing found unchecked ------------------------------------------------------

@pytest.mark.parametrize("name", ["mul", "div", "pow"])  # add and sub pass g on: no product
@pytest.mark.parametrize("frozen", [0, 1], ids=["a-frozen", "b-frozen"])
def test_the_vjp_returns_none_for_a_frozen_operand(name, frozen):
    """Checked on the VJP itself: the engine would drop a frozen operand's gradient anyway, so
    through .grad a VJP that computes it (a wasted product) looks the same."""
    operands = [Tensor(np.full(3, 1.5), requires_grad=True),
                Tensor(np.full(3, 2.0), requires_grad=True)]
    operands[frozen] = Tensor(operands[frozen].data)
    grads = getattr(ops, name)(*operands).grad_fn.backward(np.ones(3))
    assert grads[frozen] is None and grads[1 - frozen] is not None


def test_clip_with_one_limit_and_its_gradient_at_the_limits():
    x = Tensor(np.array([-2.0, -1.0, 0.0, 1.0, 2.0]), requires_grad=True)
    np.testing.assert_array_equal(ops.clip(x, None, 1.0).data, [-2.0, -1.0, 0.0, 1.0, 1.0])
    np.testing.assert_array_equal(ops.clip(x, -1.0, None).data, [-1.0, -1.0, 0.0, 1.0, 2.0])
    ops.clip(x, -1.0, 1.0).sum().backward()
    np.testing.assert_array_equal(x.grad, [0.0, 1.0, 1.0, 1.0, 0.0])  # at a limit: 1, as torch


def test_astype_sends_the_gradient_back_in_the_source_dtype():
    x = Tensor(np.ones(3, dtype=np.float32), requires_grad=True)
    y = ops.astype(x, np.float64)
    assert y.dtype == np.float64
    assert y.grad_fn.backward(np.ones(3))[0].dtype == np.float32
