"""The product backend and the runtime: inside parallel(), split products equal np.matmul,
and fused kernels give the same bits on any number of threads."""

import contextlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from minilora import runtime
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
    with runtime.parallel(threads), _split_everything():
        got = backend.mm(a, b)
        got_t = backend.mm(np.swapaxes(np.swapaxes(a, -1, -2).copy(), -1, -2), b)  # strided a
    np.testing.assert_allclose(got, np.matmul(a, b), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(got_t, np.matmul(a, b), rtol=RTOL, atol=ATOL)


def test_parallel_restores_the_previous_setting():
    assert runtime.threads() == 1
    with runtime.parallel(3):
        assert runtime.threads() == 3
        with runtime.parallel(2):
            assert runtime.threads() == 2
        assert runtime.threads() == 3
    assert runtime.threads() == 1


@given(n=st.integers(1, 50), threads=st.integers(1, 5))
def test_run_split_covers_each_index_exactly_once(n, threads):
    calls = []
    with runtime.parallel(threads):
        runtime.run_split(lambda lo, hi: calls.append((lo, hi)), n)
    covered = sorted(i for lo, hi in calls for i in range(lo, hi))
    assert covered == list(range(n))
    assert len(calls) == min(threads, n)


def _grads_on(threads: int, make):
    """Run ``make()`` (forward) and its backward on ``threads`` threads; the gradients, as bits."""
    from minilora import Tensor  # noqa: F401  (make builds Tensors)

    with runtime.parallel(threads):
        inputs, out = make()
        out.backward(np.ones_like(out.data))
    return [t.grad for t in inputs]


@pytest.mark.parametrize("op", ["layer_norm", "lora_linear", "gelu"])
def test_fused_kernels_give_the_same_bits_on_any_number_of_threads(op):
    """Per-block partial sums (dW of layer norm, dA and dB of LoRA) are added in block order, and
    the blocks do not depend on the thread count, so a resumed run may use any --threads."""
    from minilora import Tensor, ops

    rng = np.random.default_rng(0)
    arrays = {"x": rng.standard_normal((300, 700), dtype=np.float32),
              "w": rng.standard_normal((50, 700), dtype=np.float32),
              "a": rng.standard_normal((4, 700), dtype=np.float32),
              "b": rng.standard_normal((50, 4), dtype=np.float32),
              "g": rng.standard_normal(700, dtype=np.float32)}

    def make():
        t = {k: Tensor(v.copy(), requires_grad=True) for k, v in arrays.items()}
        if op == "layer_norm":
            return [t["x"], t["g"]], ops.layer_norm(t["x"], t["g"], None)
        if op == "gelu":
            return [t["x"]], ops.gelu(t["x"])
        return [t["x"], t["a"], t["b"]], ops.lora_linear(t["x"], t["w"], None, t["a"], t["b"], 2.0)

    one = _grads_on(1, make)
    for threads in (2, 3):
        for g1, gn in zip(one, _grads_on(threads, make), strict=True):
            np.testing.assert_array_equal(g1, gn)


@pytest.mark.parametrize("blas", [False, True], ids=["engine's threads", "BLAS's threads"])
def test_a_training_step_gives_the_same_bits_however_the_threads_are_used(blas):
    """parallel() splits products and kernels over the engine's threads, parallel(blas=True) lets
    BLAS thread the products: one step of a GPT ends with the same weights bit for bit as on
    one thread, so a run may be resumed with any --threads."""
    from minilora.bench.step import BenchConfig, build, train_step

    cfg = BenchConfig(n_layer=1, n_head=4, n_embd=128, block_size=64, batch_size=12)

    def weights_after_a_step(threads, use_blas):
        model, opt, x, y = build(cfg, lora=False)
        with runtime.parallel(threads, blas=use_blas):
            train_step(model, opt, x, y)
        return [p.data for p in model.parameters()]

    one = weights_after_a_step(1, False)
    for threads in (2, 3):
        for w1, wn in zip(one, weights_after_a_step(threads, blas), strict=True):
            np.testing.assert_array_equal(w1, wn)


def test_parallel_for_lets_blas_thread_only_a_step_of_small_products():
    from threadpoolctl import threadpool_info

    from minilora.bench.step import CONFIGS
    from minilora.models import GPT
    from minilora.train.loop import largest_product

    def blas_threads():
        return max(lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas")

    sizes = {}
    for name, cfg in CONFIGS.items():
        tokens = cfg.batch_size * cfg.block_size
        sizes[name] = largest_product(GPT(cfg.gpt(), seed=0), tokens)
        assert sizes[name] == tokens * 4 * cfg.n_embd * cfg.n_embd  # the MLP's c_fc and c_proj
    with runtime.parallel_for(sizes["A"], threads=2):
        assert runtime.threads() == 1 and blas_threads() == 2  # A: BLAS threads its products
    with runtime.parallel_for(sizes["B"], threads=2):
        assert runtime.threads() == 2 and blas_threads() == 1  # B: the engine splits them
