"""Causal attention in row blocks that skip the keys a block cannot see.

The blocked path must be the same function as plain masked softmax attention, for any length,
including lengths that are not a multiple of the block size, and on the engine's threads.
"""


import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minilora import ops, runtime
from minilora.ops.backend import attention
from tests.gradcheck import assert_same_function, gradcheck
from tests.ops.test_fused import causal_self_attention_composed


@pytest.fixture
def small_row_blocks(monkeypatch):
    monkeypatch.setattr(attention, "ROW_BLOCK", 3)  # blocks of 3 rows from T = 6 on


def test_spans_cover_every_row_and_every_visible_key():
    for t in (1, 5, 127, 128, 200, 256, 300):
        spans = attention.attention_spans(t, t, causal=True)
        assert [r for r0, r1, _ in spans for r in range(r0, r1)] == list(range(t))
        assert all(k1 == r1 for _, r1, k1 in spans)  # the last row of a block sees keys < r1
    assert attention.attention_spans(300, 300, causal=False) == [(0, 300, 300)]


def test_blocked_attention_skips_three_eighths_of_the_scores_at_256():
    spans = attention.attention_spans(256, 256, causal=True)
    assert sum((r1 - r0) * k1 for r0, r1, k1 in spans) / 256**2 == 0.625


@settings(max_examples=20, deadline=None)
@given(t=st.integers(1, 14), heads=st.sampled_from([1, 2]), seed=st.integers(0, 2**16))
def test_blocked_causal_attention_equals_its_composition(t, heads, seed):
    saved, attention.ROW_BLOCK = attention.ROW_BLOCK, 3
    try:
        qkv = np.random.default_rng(seed).standard_normal((2, t, 3 * 2 * heads))
        assert_same_function(lambda x: ops.causal_self_attention(x, heads),
                             lambda x: causal_self_attention_composed(x, heads), qkv)
    finally:
        attention.ROW_BLOCK = saved


def test_blocked_sdpa_gradients_match_finite_differences(small_row_blocks):
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 8, 3)) for _ in range(3))
    gradcheck(lambda a, b, c: ops.scaled_dot_product_attention(a, b, c, causal=True), q, k, v)


def test_blocked_attention_on_threads_equals_one_thread():
    qkv = np.random.default_rng(1).standard_normal((3, 200, 48)).astype(np.float32)
    from minilora import Tensor

    results = []
    for threads in (1, 2):
        x = Tensor(qkv.copy(), requires_grad=True)
        with runtime.parallel(threads):
            y = ops.causal_self_attention(x, 4)
            y.backward(np.ones_like(y.data))
        results.append((y.data, x.grad))
    np.testing.assert_array_equal(results[0][0], results[1][0])  # the same blocks, the same bits
    np.testing.assert_array_equal(results[0][1], results[1][1])


def test_causal_attention_keeps_only_the_scores_it_can_see():
    """The saved probabilities hold one contiguous array per span, and nothing for masked keys:
    5/8 of a full (T, T) matrix at T = 256, which is what config B's backward pass keeps."""
    rng = np.random.default_rng(2)
    q, k, v = (rng.standard_normal((2, 3, 256, 4)).astype(np.float32) for _ in range(3))
    _, p = attention.attention_forward(q, k, v, causal=True, scale=0.5)
    assert all(part.flags.c_contiguous for part in p)
    assert sum(part.size for part in p) == 0.625 * 2 * 3 * 256 * 256
    full = np.concatenate([np.pad(part, [(0, 0)] * 3 + [(0, 256 - part.shape[-1])]) for part in p],
                          axis=-2)
    np.testing.assert_allclose(full.sum(axis=-1), 1.0, rtol=1e-5)  # each row a distribution
    assert not np.triu(full[0, 0], k=1).any()  # no weight on a future position
