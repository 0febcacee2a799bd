"""The product backend: inside parallel(), split products equal np.matmul."""

import contextlib

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from minilora.ops import backend

# Splitting changes only how BLAS blocks the sums: float32 round-off of a k-term dot product.
RTOL, ATOL = 1e-5, 1e-4


@contextlib.contextmanager
def _split_everything():
    """Split even the smallest products, so every shape takes the threaded path."""
    saved, backend.SPLIT_MIN_MACS = backend.SPLIT_MIN_MACS, 1
    try:
        yield
    finally:
        backend.SPLIT_MIN_MACS = saved


@st.composite
def product_shapes(draw):
    n, k, m = draw(st.integers(1, 300)), draw(st.integers(1, 80)), draw(st.integers(1, 90))
    batch_a, batch_b = draw(hnp.mutually_broadcastable_shapes(num_shapes=2, max_dims=2,
                                                              max_side=5)).input_shapes
    return (*batch_a, n, k), (*batch_b, k, m)


@settings(max_examples=40, deadline=None)
@given(shapes=product_shapes(), threads=st.integers(2, 4), seed=st.integers(0, 2**16))
def test_split_products_equal_numpy_matmul(shapes, threads, seed):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal(shapes[0]).astype(np.float32)
    b = rng.standard_normal(shapes[1]).astype(np.float32)
    with backend.parallel(threads), _split_everything():
        got = backend.mm(a, b)
        got_t = backend.mm(np.swapaxes(np.swapaxes(a, -1, -2).copy(), -1, -2), b)  # strided a
    np.testing.assert_allclose(got, np.matmul(a, b), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(got_t, np.matmul(a, b), rtol=RTOL, atol=ATOL)


def test_parallel_restores_the_previous_setting():
    assert backend.threads() == 1
    with backend.parallel(3):
        assert backend.threads() == 3
        with backend.parallel(2):
            assert backend.threads() == 2
        assert backend.threads() == 3
    assert backend.threads() == 1


@given(n=st.integers(1, 50), threads=st.integers(1, 5))
def test_run_split_covers_each_index_exactly_once(n, threads):
    calls = []
    with backend.parallel(threads):
        backend.run_split(lambda lo, hi: calls.append((lo, hi)), n)
    covered = sorted(i for lo, hi in calls for i in range(lo, hi))
    assert covered == list(range(n))
    assert len(calls) == min(threads, n)
