"""DoRA's op, ``ops.dora_linear``: held to finite differences and to its composition of
primitives in float64, with and without dropout, the base and a bias, and with a frozen W.

The row norm n = ||W + s B A|| is detached (a constant of the step, the paper's section 4.3), so
the function whose finite differences the VJP must match holds n at its value at the point:
``detached`` rescales m by n(W, A, B) / n0, which cancels the op's own n as the inputs move and
is exactly 1 at the point, where the engine differentiates.
"""

from __future__ import annotations

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minilora import ShapeError, Tensor, ops
from minilora.ops.dora import dora_weight_norm
from tests.gradcheck import FAST, assert_same_function, gradcheck, randn


@st.composite
def dora_operands(draw, mask: bool):
    """x: (..., in), W: (out, in), b: (out,), A: (r, in), B: (out, r) non-zero (with B = 0,
    dA = 0 whatever the VJP), m: (out,) away from n, a mask of 0 and 1/(1-p) or None, s."""
    lead = draw(hnp.array_shapes(min_dims=0, max_dims=2, max_side=3))
    in_f, out_f, r = (draw(st.integers(1, 4)) for _ in range(3))
    x, w, bias, a, b = (draw(randn(shape)) for shape in ((*lead, in_f), (out_f, in_f), (out_f,),
                                                         (r, in_f), (out_f, r)))
    b = np.where(np.abs(b) < 0.1, 0.1, b)
    s = draw(st.sampled_from([0.5, 2.0]))
    m = dora_weight_norm(w, a, b, s) * draw(st.floats(0.5, 2.0))  # c = m / n, not 1
    keep = draw(hnp.arrays(bool, (*lead, in_f))) / 0.75 if mask else None
    return (x, w, bias, a, b, m), s, keep


def detached(s, keep, with_base=True, bias=True):
    """dora_linear(x, W, b, A, B, m') with m' = m n(W, A, B) / n0: n held at n0 under finite
    differences, and the op's own gradient at the point."""
    point = []  # n0: the norm at the first call, the point gradcheck differentiates at

    def f(x, w, b, a, bm, m):
        n_now = dora_weight_norm(w.data, a.data, bm.data, s)  # moves with the inputs
        point[:] = point or [n_now]
        return ops.dora_linear(x, w, b if bias else None, a, bm, m * Tensor(n_now / point[0]), s,
                               keep, with_base)
    return f


def dora_composed(s, keep, with_base=True):
    """The same function from primitives, n a constant Tensor:
    x W^T + b + (c - 1) d(x) W^T + c s (d(x) A^T) B^T."""
    def f(x, w, b, a, bm, m):
        c = m / Tensor(dora_weight_norm(w.data, a.data, bm.data, s))
        xd = x if keep is None else x * Tensor(keep)
        y = (c - 1.0) * ops.linear(xd, w) + c * (s * ops.linear(ops.linear(xd, a), bm))
        return ops.linear(x, w, b) + y if with_base else y
    return f


@pytest.mark.parametrize("with_base", [True, False], ids=["layer", "path"])
@pytest.mark.parametrize("mask", [False, True], ids=["no-dropout", "dropout"])
@FAST
@given(data=st.data())
def test_dora_linear_gradient_matches_finite_differences(mask, with_base, data):
    arrays, s, keep = data.draw(dora_operands(mask))
    gradcheck(detached(s, keep, with_base), *arrays, frozen=() if with_base else (2,))


@pytest.mark.parametrize("mask", [False, True], ids=["no-dropout", "dropout"])
@FAST
@given(data=st.data())
def test_dora_linear_with_a_frozen_weight_gradient_matches_finite_differences(mask, data):
    """The LoRA case: W and b frozen get no gradient, m, A, B and x do."""
    arrays, s, keep = data.draw(dora_operands(mask))
    gradcheck(detached(s, keep), *arrays, frozen=(1, 2))


@pytest.mark.parametrize("with_base", [True, False], ids=["layer", "path"])
@pytest.mark.parametrize("mask", [False, True], ids=["no-dropout", "dropout"])
@FAST
@given(data=st.data())
def test_dora_linear_equals_its_composition(mask, with_base, data):
    arrays, s, keep = data.draw(dora_operands(mask))
    assert_same_function(detached(s, keep, with_base), dora_composed(s, keep, with_base), *arrays,
                         frozen=() if with_base else (2,))


@FAST
@given(data=st.data())
def test_dora_linear_without_dropout_is_m_over_n_times_the_adapted_weight(data):
    """y = m / ||W + s B A||_row * (W + s B A) x + b: the merged form, which the op never forms."""
    (x, w, bias, a, b, m), s, _ = data.draw(dora_operands(False))
    adapted = w + s * b @ a
    wanted = x @ ((m / np.linalg.norm(adapted, axis=1))[:, None] * adapted).T + bias
    got = ops.dora_linear(*(Tensor(v) for v in (x, w, bias, a, b, m)), s)
    np.testing.assert_allclose(got.data, wanted, rtol=1e-12, atol=1e-12)


def test_the_norm_is_detached_so_the_gradient_of_a_differs_from_the_undetached_one():
    """Finite differences of the op itself (n moving with A) are not its gradient: the norm's
    term is left out on purpose, as the paper's section 4.3 and PEFT do."""
    rng = np.random.default_rng(0)
    x, w, a, b = (rng.standard_normal(s) for s in ((3, 4), (5, 4), (2, 4), (5, 2)))
    m = dora_weight_norm(w, a, b, 2.0) * 1.5
    with pytest.raises(AssertionError, match="gradient of input 2"):
        gradcheck(lambda x, w, a, b, m: ops.dora_linear(x, w, None, a, b, m, 2.0),
                  x, w, a, b, m, frozen=(1,))


def test_dora_linear_refuses_a_magnitude_of_the_wrong_shape():
    w, a, b = np.ones((5, 4)), np.ones((2, 4)), np.ones((5, 2))
    with pytest.raises(ShapeError, match="dora_linear: magnitude"):
        ops.dora_linear(Tensor(np.ones((3, 4))), Tensor(w), None, Tensor(a), Tensor(b),
                        Tensor(np.ones(4)), 1.0)
