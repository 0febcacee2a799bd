"""The paths of the other adapters: ``lora_slices`` (an adapter on row slices of a fused output,
or one of several adapters on a layer) and ``lora_embedding`` (LoRA on an embedding). Each is held
to finite differences and to its composition of primitives, in float64."""

from __future__ import annotations

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minilora import ShapeError, Tensor, ops
from tests.gradcheck import FAST, assert_same_function, gradcheck, randn


@st.composite
def slices_operands(draw, mask: bool):
    """x: (..., in), A: (k r, in), B: (k w, r) with B non-zero (with B = 0, dA = 0 whatever the
    VJP), k of ``parts`` slices w wide, a mask of 0 and 1/(1-p) or None, s."""
    lead = draw(hnp.array_shapes(min_dims=0, max_dims=2, max_side=3))
    parts, w, in_f, r = (draw(st.integers(1, 3)) for _ in range(4))
    chosen = sorted(draw(st.sets(st.integers(0, parts - 1), min_size=1)))
    slices = tuple((i * w, (i + 1) * w) for i in chosen)
    k = len(slices)
    x, a, b = (draw(randn(s)) for s in ((*lead, in_f), (k * r, in_f), (k * w, r)))
    b = np.where(np.abs(b) < 0.1, 0.1, b)
    keep = draw(hnp.arrays(bool, (*lead, in_f))) / 0.75 if mask else None
    return (x, a, b), slices, parts * w, draw(st.sampled_from([0.5, 2.0, 16.0])), keep


def slices_composed(x, a, b, s, slices, out, mask):
    """The same path from primitives: each slice's x A_i^T B_i^T, zeros between, concatenated."""
    xd = x if mask is None else x * mask
    r, w = a.shape[0] // len(slices), b.shape[0] // len(slices)
    pieces, at = [], 0
    for i, (lo, hi) in enumerate(slices):
        if lo > at:
            pieces.append(Tensor(np.zeros((*x.shape[:-1], lo - at))))
        a_i = ops.getitem(a, slice(i * r, (i + 1) * r))
        b_i = ops.getitem(b, slice(i * w, (i + 1) * w))
        pieces.append(s * ops.linear(ops.linear(xd, a_i), b_i))
        at = hi
    if out > at:
        pieces.append(Tensor(np.zeros((*x.shape[:-1], out - at))))
    return ops.concatenate(pieces, axis=-1)


@pytest.mark.parametrize("mask", [False, True], ids=["no-dropout", "dropout"])
@FAST
@given(data=st.data())
def test_lora_slices_gradient_matches_finite_differences(mask, data):
    arrays, slices, out, s, keep = data.draw(slices_operands(mask))
    gradcheck(lambda x, a, b: ops.lora_slices(x, a, b, s, slices, out, keep), *arrays)


@pytest.mark.parametrize("mask", [False, True], ids=["no-dropout", "dropout"])
@FAST
@given(data=st.data())
def test_lora_slices_equals_its_composition(mask, data):
    arrays, slices, out, s, keep = data.draw(slices_operands(mask))
    assert_same_function(lambda x, a, b: ops.lora_slices(x, a, b, s, slices, out, keep),
                         lambda x, a, b: slices_composed(x, a, b, s, slices, out, keep), *arrays)


@FAST
@given(data=st.data())
def test_lora_linear_is_the_linear_plus_the_one_slice_path(data):
    """A full adapter is the case k = 1: the fused op equals linear + lora_slices((0, out))."""
    in_f, out_f, r = (data.draw(st.integers(1, 4)) for _ in range(3))
    lead = data.draw(hnp.array_shapes(min_dims=0, max_dims=2, max_side=3))
    arrays = [data.draw(randn(shape)) for shape in ((*lead, in_f), (out_f, in_f), (r, in_f),
                                                    (out_f, r))]
    assert_same_function(
        lambda x, w, a, b: ops.lora_linear(x, w, None, a, b, 2.0),
        lambda x, w, a, b: ops.linear(x, w) + ops.lora_slices(x, a, b, 2.0, ((0, out_f),), out_f),
        *arrays)


def test_lora_slices_writes_nothing_outside_its_slices():
    """q and v of a q, k, v output: the k columns are exactly zero, and so is their gradient's
    contribution (dx, dA, dB do not depend on G's k columns)."""
    rng = np.random.default_rng(0)
    x, a, b = (rng.standard_normal(shape) for shape in ((2, 5, 4), (6, 4), (6, 3)))
    y = ops.lora_slices(Tensor(x), Tensor(a), Tensor(b), 2.0, ((0, 3), (6, 9)), 9)
    assert np.all(y.data[..., 3:6] == 0) and np.all(y.data[..., :3] != 0)
    grads = []
    for g_k in (0.0, 5.0):  # change only G's k columns: no gradient may move
        xs, as_, bs = (Tensor(v, requires_grad=True) for v in (x, a, b))
        g = np.ones((2, 5, 9))
        g[..., 3:6] = g_k
        ops.lora_slices(xs, as_, bs, 2.0, ((0, 3), (6, 9)), 9).backward(g)
        grads.append([t.grad for t in (xs, as_, bs)])
    for before, after in zip(*grads, strict=True):
        np.testing.assert_array_equal(before, after)


@pytest.mark.parametrize("slices, a, b", [
    (((0, 3), (2, 5)), (4, 4), (6, 2)),   # overlapping
    (((0, 3), (6, 9)), (4, 4), (4, 2)),   # B's rows are not k slices of width 3
    (((0, 3), (9, 12)), (4, 4), (6, 2)),  # outside the 9 outputs
    (((0, 3),), (3, 4), (3, 2)),          # A has 3 rows, B has rank 2
])
def test_lora_slices_refuses_operands_that_do_not_fit(slices, a, b):
    with pytest.raises(ShapeError, match="lora_slices"):
        ops.lora_slices(Tensor(np.ones((2, 4))), Tensor(np.ones(a)), Tensor(np.ones(b)), 1.0,
                        slices, 9)


# ---- lora_embedding ------------------------------------------------------------------------------

@st.composite
def embedding_operands(draw):
    """idx (...) with repeats likely, A: (r, vocab), B: (dim, r), both non-zero, s."""
    vocab, dim, r = draw(st.integers(1, 5)), draw(st.integers(1, 4)), draw(st.integers(1, 3))
    lead = draw(hnp.array_shapes(min_dims=0, max_dims=2, max_side=4))
    idx = draw(hnp.arrays(np.int64, lead, elements=st.integers(0, vocab - 1)))
    a, b = draw(randn((r, vocab))), draw(randn((dim, r)))
    return idx, (np.where(np.abs(a) < 0.1, 0.1, a), np.where(np.abs(b) < 0.1, 0.1, b)), \
        draw(st.sampled_from([0.5, 2.0, 16.0]))


@FAST
@given(operands=embedding_operands())
def test_lora_embedding_gradient_matches_finite_differences(operands):
    idx, arrays, s = operands
    gradcheck(lambda a, b: ops.lora_embedding(idx, a, b, s), *arrays)


@FAST
@given(operands=embedding_operands())
def test_lora_embedding_equals_the_one_hot_product(operands):
    """The lookup of A's columns is s onehot(idx) A^T B^T, which the test builds and the op
    never does."""
    idx, arrays, s = operands
    vocab = arrays[0].shape[1]
    one_hot = Tensor(np.eye(vocab)[idx])
    assert_same_function(lambda a, b: ops.lora_embedding(idx, a, b, s),
                         lambda a, b: s * ops.linear(ops.linear(one_hot, a), b), *arrays)


def test_lora_embedding_scatters_a_repeated_token_into_one_column():
    a = Tensor(np.ones((2, 4)), requires_grad=True)
    b = Tensor(np.ones((3, 2)), requires_grad=True)
    ops.lora_embedding(np.array([1, 1, 3]), a, b, 1.0).backward(np.ones((3, 3)))
    np.testing.assert_array_equal(a.grad, [[0, 6, 0, 3], [0, 6, 0, 3]])  # G B = 3 per row


@pytest.mark.parametrize("idx", [np.array([0, 5]), np.array([-1]), np.array([0.5])])
def test_lora_embedding_refuses_an_index_outside_the_vocabulary(idx):
    with pytest.raises(ShapeError, match="lora_embedding"):
        ops.lora_embedding(idx, Tensor(np.ones((2, 5))), Tensor(np.ones((3, 2))), 1.0)
