"""The product backend and the runtime: inside parallel(), split products equal np.matmul, and
products, fused kernels and a whole training step give the same bits on any number of threads;
with BLAS's own threads (parallel(blas=True)), the same bits on the same number of threads and
float32 round-off across numbers of threads."""

import contextlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from minilora import runtime
from minilora.ops import backend
from minilora.ops.backend import products

# Splitting changes only how BLAS blocks the sums: float32 round-off of a k-term dot product.
RTOL, ATOL = 1e-5, 1e-4


@contextlib.contextmanager
def _split_everything():
    """Split even the smallest products into many blocks, so every shape takes the split path
    (small products are where BLAS's kernels are most sensitive to a call's shape)."""
    saved = products.SPLIT_MIN_MACS, products.MIN_BLOCK_MACS
    products.SPLIT_MIN_MACS, products.MIN_BLOCK_MACS = 1, 1
    try:
        yield
    finally:
        products.SPLIT_MIN_MACS, products.MIN_BLOCK_MACS = saved


def _blas_kernel() -> str:
    from threadpoolctl import threadpool_info

    return ", ".join(sorted({str(lib.get("architecture")) for lib in threadpool_info()
                             if lib["user_api"] == "blas"}))


@st.composite
def product_shapes(draw):
    n, k, m = draw(st.integers(1, 300)), draw(st.integers(1, 80)), draw(st.integers(1, 90))
    batch_a, batch_b = draw(hnp.mutually_broadcastable_shapes(num_shapes=2, max_dims=2,
                                                              max_side=5)).input_shapes
    return (*batch_a, n, k), (*batch_b, k, m)


@settings(max_examples=40, deadline=None)
@given(shapes=product_shapes(), threads=st.integers(2, 4), with_bias=st.booleans(),
       seed=st.integers(0, 2**16))
def test_split_products_equal_numpy_matmul(shapes, threads, with_bias, seed):
    """Row and column blocks, a strided operand, and the bias each block adds for itself."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal(shapes[0]).astype(np.float32)
    b = rng.standard_normal(shapes[1]).astype(np.float32)
    bias = rng.standard_normal(shapes[1][-1]).astype(np.float32) if with_bias else None
    want = np.matmul(a, b) + (0 if bias is None else bias)
    with runtime.parallel(threads), _split_everything():
        got = backend.mm(a, b, bias)
        got_t = backend.mm(np.swapaxes(np.swapaxes(a, -1, -2).copy(), -1, -2), b, bias)  # strided
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(got_t, want, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize(("shape_a", "shape_b", "split"), [
    ((3, 40, 16), (3, 16, 24), True),   # a stack of products: blocks of whole matrices
    ((24, 16), (16, 40), True),         # wider than tall: blocks of columns, each its part of bias
    ((40, 16), (16, 24), True),         # taller than wide: blocks of rows
    ((40, 16), (16, 24), False),        # inside parallel() but below the split threshold
], ids=["stack", "columns", "rows", "unsplit"])
def test_every_split_path_adds_the_bias(shape_a, shape_b, split):
    """Each way a product can be cut adds the bias itself (Hypothesis may not draw all four
    with a bias): a block that forgets it is off by the bias, far beyond round-off. And float32
    stays float32."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal(shape_a).astype(np.float32)
    b = rng.standard_normal(shape_b).astype(np.float32)
    bias = rng.uniform(1, 2, shape_b[-1]).astype(np.float32)
    with runtime.parallel(2), (_split_everything() if split else contextlib.nullcontext()):
        got = backend.mm(a, b, bias)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, np.matmul(a, b) + bias, rtol=RTOL, atol=ATOL)


@settings(max_examples=40, deadline=None)
@given(shapes=product_shapes(), transposed=st.booleans(), seed=st.integers(0, 2**16))
def test_split_products_give_the_same_bits_on_any_number_of_threads(shapes, transposed, seed):
    """The blocks a product is cut into depend on its shape alone, so 1, 2, 3 or 4 threads make
    the same BLAS calls: the bits cannot depend on how a kernel rounds a call's last rows."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal(shapes[0]).astype(np.float32)
    b = rng.standard_normal(shapes[1]).astype(np.float32)
    if transposed:  # a strided b, as x W^T passes it
        b = np.swapaxes(np.swapaxes(b, -1, -2).copy(), -1, -2)
    results = []
    for threads in (1, 2, 3, 4):
        with runtime.parallel(threads), _split_everything():
            results.append(backend.mm(a, b))
    for got in results[1:]:
        np.testing.assert_array_equal(got, results[0])


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


@pytest.mark.parametrize("op", ["layer_norm", "lora_linear", "gelu", "rms_norm",
                                "rotary_embedding", "swiglu", "grouped_query_attention"])
def test_fused_kernels_give_the_same_bits_on_any_number_of_threads(op):
    """Per-block partial sums (dW of layer norm and RMSNorm, dA and dB of LoRA) are added in block
    order, and the blocks do not depend on the thread count, so a resumed run may use any
    --threads. The sizes cut each kernel's work into several blocks."""
    from minilora import Tensor, ops
    from minilora.ops.rotary import rope_tables

    rng = np.random.default_rng(0)
    arrays = {"x": rng.standard_normal((300, 700), dtype=np.float32),
              "w": rng.standard_normal((50, 700), dtype=np.float32),
              "a": rng.standard_normal((4, 700), dtype=np.float32),
              "b": rng.standard_normal((50, 4), dtype=np.float32),
              "g": rng.standard_normal(700, dtype=np.float32),
              "u": rng.standard_normal((300, 700), dtype=np.float32),
              "heads": rng.standard_normal((6, 4, 130, 64), dtype=np.float32),
              "q": rng.standard_normal((2, 4, 200, 16), dtype=np.float32),
              "kv": rng.standard_normal((2, 2, 2, 200, 16), dtype=np.float32)}
    cos, sin = rope_tables(np.arange(130), 64, 1e4)

    def make():
        t = {k: Tensor(v.copy(), requires_grad=True) for k, v in arrays.items()}
        if op == "layer_norm":
            return [t["x"], t["g"]], ops.layer_norm(t["x"], t["g"], None)
        if op == "gelu":
            return [t["x"]], ops.gelu(t["x"])
        if op == "rms_norm":
            return [t["x"], t["g"]], ops.rms_norm(t["x"], t["g"])
        if op == "rotary_embedding":
            return [t["heads"]], ops.rotary_embedding(t["heads"], cos, sin)
        if op == "swiglu":
            return [t["x"], t["u"]], ops.swiglu(t["x"], t["u"])
        if op == "grouped_query_attention":
            k, v = (Tensor(a.copy(), requires_grad=True) for a in arrays["kv"])
            return [t["q"], k, v], ops.grouped_query_attention(t["q"], k, v)
        return [t["x"], t["a"], t["b"]], ops.lora_linear(t["x"], t["w"], None, t["a"], t["b"], 2.0)

    one = _grads_on(1, make)
    for threads in (2, 3):
        for g1, gn in zip(one, _grads_on(threads, make), strict=True):
            np.testing.assert_array_equal(g1, gn)


def _one_step(threads: int, blas: bool):
    """One training step of a small GPT (some products large enough to split) inside
    ``parallel(threads, blas)``: (gradients, weights after the step)."""
    from minilora.bench.step import BenchConfig, build, train_step

    cfg = BenchConfig(n_layer=1, n_head=4, n_embd=128, block_size=64, batch_size=12)
    model, opt, x, y = build(cfg, lora=False)
    with runtime.parallel(threads, blas=blas):
        train_step(model, opt, x, y)
    params = list(model.parameters())
    return [p.grad for p in params], [p.data for p in params]


def test_a_training_step_gives_the_same_bits_on_any_number_of_the_engines_threads():
    """parallel() cuts products and kernels into blocks fixed by their shapes and adds per-block
    sums in block order: one step ends with the same weights bit for bit on 1, 2 or 3 threads,
    whatever BLAS kernel the machine picks, so a run may be resumed with any --threads."""
    print(f"BLAS kernel: {_blas_kernel()}")
    grads_one, weights_one = _one_step(1, blas=False)
    for threads in (2, 3):
        grads, weights = _one_step(threads, blas=False)
        for a, b in zip(grads_one + weights_one, grads + weights, strict=True):
            np.testing.assert_array_equal(a, b)


# BLAS's own threads split each product as the library decides, so a product's rows round as its
# kernel rounds the rows of each thread's share. Bound on the difference in a step's gradients,
# relative to each gradient's largest entry: 1e-5 is ~170 float32 units of round-off (u = 2^-24);
# measured worst 7.1e-7 on OpenBLAS's Haswell kernel, 0 on SkylakeX's (docs/engine.md).
BLAS_THREADS_RTOL = 1e-5


def test_a_training_step_on_blas_threads_is_reproducible_and_round_off_equal_across_counts():
    """parallel(blas=True) lets BLAS thread the products: the same number of threads gives the
    same bits; another number gives gradients equal to float32 round-off (BLAS_THREADS_RTOL)."""
    print(f"BLAS kernel: {_blas_kernel()}")
    grads_one, _ = _one_step(1, blas=True)
    for threads in (2, 3):
        grads, weights = _one_step(threads, blas=True)
        again_grads, again_weights = _one_step(threads, blas=True)
        for a, b in zip(grads + weights, again_grads + again_weights, strict=True):
            np.testing.assert_array_equal(a, b)
        for g1, gn in zip(grads_one, grads, strict=True):
            assert np.abs(gn - g1).max() <= BLAS_THREADS_RTOL * np.abs(g1).max()


def test_step_threading_lets_blas_thread_only_a_step_of_small_products():
    from threadpoolctl import threadpool_info

    from minilora.bench.step import CONFIGS
    from minilora.models import GPT
    from minilora.train.loop import largest_product

    def blas_threads():
        return max(lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas")

    sizes = {}
    for name in ("A", "B"):  # vocabulary 65: the MLP is the widest layer (C's is lm_head)
        cfg = CONFIGS[name]
        tokens = cfg.batch_size * cfg.block_size
        sizes[name] = largest_product(GPT(cfg.gpt(), seed=0), tokens)
        assert sizes[name] == tokens * 4 * cfg.n_embd * cfg.n_embd  # the MLP's c_fc and c_proj
    with runtime.step_threading(sizes["A"], threads=2):
        assert runtime.threads() == 1 and blas_threads() == 2  # A: BLAS threads its products
    with runtime.step_threading(sizes["B"], threads=2):
        assert runtime.threads() == 2 and blas_threads() == 1  # B: the engine splits them


def test_the_old_names_still_work_and_say_where_things_went():
    """parallel_for is step_threading; the block helpers moved to ops.backend.blocks; a kernel
    that still announces a product with note_product is still counted."""
    from minilora.ops.backend import blocks

    with pytest.warns(DeprecationWarning, match="step_threading"):
        with runtime.parallel_for(1 << 30, threads=2):
            assert runtime.threads() == 2
    with pytest.warns(DeprecationWarning, match="ops.backend.blocks.for_blocks"):
        assert runtime.for_blocks is blocks.for_blocks
    with backend.record_products() as seen, pytest.warns(DeprecationWarning, match="matmul"):
        backend.note_product((3, 4), (4, 5))
    assert seen == [((3, 4), (4, 5))]
