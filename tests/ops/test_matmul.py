"""matmul (batched, broadcasting batch axes, 1-D operands) and the fused linear."""

import hypothesis.extra.numpy as hnp
import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from minilora import Tensor, ops
from tests.gradcheck import FAST, assert_same_function, gradcheck, randn, values


@st.composite
def matmul_operands(draw):
    """a: (..., n, k) or (k,), b: (..., k, m) or (k,); the batch axes broadcast together."""
    (batch_a, batch_b), _ = draw(hnp.mutually_broadcastable_shapes(num_shapes=2, max_dims=2,
                                                                   max_side=3))
    n, k, m = (draw(st.integers(1, 3)) for _ in range(3))
    shape_a = (k,) if draw(st.booleans()) else (*batch_a, n, k)
    shape_b = (k,) if draw(st.booleans()) else (*batch_b, k, m)
    return draw(values(shape_a)), draw(values(shape_b))


@FAST
@given(operands=matmul_operands())
def test_matmul_gives_numpys_value_and_shape(operands):
    a, b = operands
    out = ops.matmul(Tensor(a), Tensor(b))
    assert out.shape == np.matmul(a, b).shape
    np.testing.assert_allclose(out.data, np.matmul(a, b), rtol=1e-12, atol=1e-12)


@FAST
@given(operands=matmul_operands())
def test_matmul_gradient_matches_finite_differences(operands):
    gradcheck(ops.matmul, *operands)


@FAST
@given(operands=matmul_operands(), frozen=st.sampled_from([0, 1]))
def test_matmul_with_one_frozen_operand_gradient_matches_finite_differences(operands, frozen):
    gradcheck(ops.matmul, *operands, frozen=(frozen,))


@st.composite
def linear_operands(draw):
    """x: (..., in) (leading axes from none to two), W: (out, in), b: (out,)."""
    lead = draw(hnp.array_shapes(min_dims=0, max_dims=2, max_side=3))
    in_f, out_f = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    return draw(randn((*lead, in_f))), draw(randn((out_f, in_f))), draw(randn((out_f,)))


@FAST
@given(operands=linear_operands())
def test_linear_gradient_matches_finite_differences(operands):
    gradcheck(ops.linear, *operands)


@FAST
@given(operands=linear_operands())
def test_linear_without_bias_gradient_matches_finite_differences(operands):
    gradcheck(ops.linear, *operands[:2])


@FAST
@given(operands=linear_operands(), frozen=st.sampled_from([(1,), (0,), (0, 1), (1, 2)]))
def test_linear_with_frozen_inputs_gradient_matches_finite_differences(operands, frozen):
    """E.g. LoRA's base layer (W frozen) or a first layer (x frozen): the rest stays right."""
    gradcheck(ops.linear, *operands, frozen=frozen)


@FAST
@given(operands=linear_operands())
def test_linear_equals_its_composition(operands):
    """linear(x, W, b) = x @ W^T + b."""
    assert_same_function(ops.linear, lambda x, w, b: ops.matmul(x, w.T) + b, *operands)


def test_linear_with_a_frozen_weight_runs_one_backward_matmul(mm_calls):
    """dW = G^T x never runs for a frozen W, only dx = G W: LoRA's saving, made real."""
    x = Tensor(np.ones((5, 3)), requires_grad=True)
    w = Tensor(np.ones((4, 3)))
    y = ops.linear(x, w)
    forward_calls = len(mm_calls)
    y.backward(np.ones((5, 4)))
    assert len(mm_calls) - forward_calls == 1
    assert mm_calls[-1][2] == (5, 3)  # the product that gives dx, not (4, 3) for dW
    assert w.grad is None


def test_matmul_with_a_frozen_operand_runs_one_backward_matmul(mm_calls):
    a = Tensor(np.ones((2, 5, 3)), requires_grad=True)
    b = Tensor(np.ones((3, 4)))
    y = ops.matmul(a, b)
    forward_calls = len(mm_calls)
    y.backward(np.ones((2, 5, 4)))
    assert len(mm_calls) - forward_calls == 1
    assert b.grad is None
