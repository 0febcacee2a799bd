"""The final layer norm, ``lm_head`` and cross-entropy as one op: its equation against finite
differences and against the three ops it fuses; the row-chunked kernel equal to the equation, on
any threads and chunking, with frozen inputs; and the kernel never forming the (N, V) logits.
"""

from __future__ import annotations

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minilora import Tensor, ops
from minilora.ops import backend, reference
from minilora.ops.backend import lm_head
from tests.gradcheck import FAST, assert_same_function, gradcheck, randn
from tests.ops.test_kernels import many_blocks

KERNELS = settings(max_examples=25, deadline=None)
# which inputs are frozen: none; LoRA's case (W and the layer norm frozen, x trained); only W
FROZEN = st.sampled_from([(), ("lnw", "lnb", "w"), ("w",), ("x",)])


@st.composite
def operands(draw, max_rows=12, max_vocab=7):
    """(arrays [x, ln_weight?, ln_bias?, W], their names, targets, ignore_index)."""
    lead = draw(hnp.array_shapes(min_dims=1, max_dims=2, min_side=1, max_side=max_rows // 2))
    c, vocab = draw(st.integers(1, 5)), draw(st.integers(1, max_vocab))
    weight, bias = draw(st.booleans()), draw(st.booleans())
    arrays = [draw(randn((*lead, c))) * 2.0]
    names = ["x"]
    for present, name in ((weight, "lnw"), (bias, "lnb")):
        if present:
            arrays.append(draw(randn((c,))))
            names.append(name)
    arrays.append(draw(randn((vocab, c))))
    names.append("w")
    targets = draw(hnp.arrays(np.int64, lead, elements=st.integers(0, vocab - 1)))
    ignore = None
    if draw(st.booleans()):
        ignore = -1
        hidden = draw(hnp.arrays(bool, lead))
        hidden.reshape(-1)[0] = False  # at least one counted
        targets = np.where(hidden, -1, targets)
    return arrays, names, targets, ignore


def as_op(fn, names, targets, ignore):
    """fn(x, ln_weight or None, ln_bias or None, W, targets) as a function of the arrays."""
    def op(*tensors):
        by = dict(zip(names, tensors, strict=True))
        return fn(by["x"], by.get("lnw"), by.get("lnb"), by["w"], targets, 1e-5, ignore)
    return op


def composed(x, lnw, lnb, w, targets, eps, ignore):
    """The three ops the fused one replaces, as GPT.forward applies them."""
    logits = ops.reference.layer_norm(x, lnw, lnb, eps) @ ops.transpose(w)
    return ops.reference.cross_entropy(logits, targets, ignore)


@pytest.mark.parametrize("fn", [reference.lm_head_cross_entropy, ops.lm_head_cross_entropy],
                         ids=["equation", "kernel"])
@FAST
@given(args=operands(max_rows=6, max_vocab=4))
def test_lm_head_cross_entropy_gradient_matches_finite_differences(fn, args):
    arrays, names, targets, ignore = args
    gradcheck(as_op(fn, names, targets, ignore), *arrays)


@FAST
@given(args=operands())
def test_lm_head_cross_entropy_equals_layer_norm_then_linear_then_cross_entropy(args):
    arrays, names, targets, ignore = args
    assert_same_function(as_op(reference.lm_head_cross_entropy, names, targets, ignore),
                         as_op(composed, names, targets, ignore), *arrays)


@KERNELS
@given(args=operands(max_rows=24), threads=st.sampled_from([1, 2, 3]),
       chunk=st.sampled_from([1, 5, 1 << 23]), frozen=FROZEN)
def test_lm_head_kernel_is_its_equation(args, threads, chunk, frozen):
    """On 1-3 threads, chunks of one row to all of them, products split, W frozen or not."""
    arrays, names, targets, ignore = args
    frozen = tuple(i for i, name in enumerate(names) if name in frozen)
    saved = lm_head.CHUNK_ELEMENTS
    lm_head.CHUNK_ELEMENTS = chunk * arrays[-1].shape[0]  # `chunk` rows of logits
    try:
        with many_blocks(threads):
            assert_same_function(as_op(ops.lm_head_cross_entropy, names, targets, ignore),
                                 as_op(reference.lm_head_cross_entropy, names, targets, ignore),
                                 *arrays, frozen=frozen)
    finally:
        lm_head.CHUNK_ELEMENTS = saved


@pytest.mark.parametrize("frozen_w", [False, True], ids=["full", "lora"])
def test_the_kernel_never_forms_the_whole_logits(frozen_w, monkeypatch):
    """Every product that touches W's vocabulary rows covers one chunk of rows at most, in the
    forward and the backward pass alike, and dW's is left out when W is frozen."""
    rng = np.random.default_rng(0)
    n, c, vocab, chunk = 40, 6, 50, 8
    monkeypatch.setattr(lm_head, "CHUNK_ELEMENTS", chunk * vocab)
    x = Tensor(rng.standard_normal((4, 10, c)), requires_grad=True)
    w = Tensor(rng.standard_normal((vocab, c)), requires_grad=not frozen_w)
    targets = rng.integers(0, vocab, (4, 10))
    with backend.record_products() as seen:
        loss = ops.lm_head_cross_entropy(x, None, None, w, targets)
        loss.backward()
    touching = [(a, b) for a, b in seen if vocab in a + b]
    rows = [a[0] if b[-1] == vocab else (a[1] if a[0] == vocab else a[0]) for a, b in touching]
    assert touching and max(rows) <= chunk < n
    macs = sum(np.prod(a) * b[-1] for a, b in touching)
    assert macs == (2 if frozen_w else 3) * n * c * vocab  # logits, dh, and dW unless frozen
    assert (w.grad is None) == frozen_w


def test_a_second_backward_through_a_retained_graph_gives_the_same_gradients():
    """The kernel hands its gradients out once and forgets them; walked again, it recomputes."""
    rng = np.random.default_rng(1)
    x = Tensor(rng.standard_normal((3, 4)), requires_grad=True)
    w = Tensor(rng.standard_normal((5, 4)), requires_grad=True)
    loss = ops.lm_head_cross_entropy(x, None, None, w, np.array([0, 4, 2]))
    loss.backward(retain_graph=True)
    first = x.grad.copy(), w.grad.copy()
    loss.backward(np.array(2.0))
    np.testing.assert_allclose(x.grad, 3 * first[0], rtol=1e-12)
    np.testing.assert_allclose(w.grad, 3 * first[1], rtol=1e-12)


def test_every_target_ignored_is_nan_as_in_cross_entropy():
    x, w = Tensor(np.ones((2, 3))), Tensor(np.eye(3))
    assert np.isnan(ops.lm_head_cross_entropy(x, None, None, w, np.array([-1, -1]),
                                              ignore_index=-1).item())
