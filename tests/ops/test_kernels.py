"""Every fast kernel (``minilora.ops.backend``) is the same function as its reference op (the
equation in ``minilora.ops``), in value and in every gradient, on any number of threads and with
its work cut into many blocks: products split, row blocks of a few rows, causal spans of 3 rows.
"""

from __future__ import annotations

import contextlib

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minilora import Tensor, ops, runtime
from minilora.ops import reference
from minilora.ops.backend import attention, blocks, products
from minilora.ops.rotary import rope_tables
from tests.gradcheck import assert_same_function, randn

KERNELS = settings(max_examples=25, deadline=None)
THREADS = st.sampled_from([1, 2, 3])


@contextlib.contextmanager
def many_blocks(threads: int):
    """Inside: the engine's threads, every product split, a few rows per block, causal spans of
    3 rows, so that even Hypothesis's small shapes go through every blocked path."""
    saved = (products.SPLIT_MIN_MACS, products.MIN_BLOCK_MACS, blocks.MIN_BLOCK_ELEMENTS,
             attention.ROW_BLOCK)
    products.SPLIT_MIN_MACS = products.MIN_BLOCK_MACS = blocks.MIN_BLOCK_ELEMENTS = 1
    attention.ROW_BLOCK = 3
    try:
        with runtime.parallel(threads):
            yield
    finally:
        (products.SPLIT_MIN_MACS, products.MIN_BLOCK_MACS, blocks.MIN_BLOCK_ELEMENTS,
         attention.ROW_BLOCK) = saved


def rows(draw, width):
    """An input of 1 to 24 rows (in up to two leading axes) of ``width``."""
    lead = draw(hnp.array_shapes(min_dims=1, max_dims=2, min_side=1, max_side=12))
    return draw(randn((*lead, width)))


@KERNELS
@given(data=st.data(), threads=THREADS, bias=st.booleans(), mask=st.booleans(),
       frozen=st.sampled_from([("w", "bias"), ("x", "w", "bias"), (), ("w", "bias", "a")]))
def test_lora_linear_kernel_is_its_equation(data, threads, bias, mask, frozen):
    """LoRA's own case first: W and b frozen; then a first layer (x too), everything, A frozen."""
    in_f, out_f, r = (data.draw(st.integers(1, 6)) for _ in range(3))
    x = rows(data.draw, in_f)
    w, a, b = (data.draw(randn(s)) for s in ((out_f, in_f), (r, in_f), (out_f, r)))
    b = np.where(np.abs(b) < 0.1, 0.1, b)  # B = 0 would make A's gradient zero either way
    keep = data.draw(hnp.arrays(bool, x.shape)) / 0.75 if mask else None
    params = [x, w] + ([data.draw(randn((out_f,)))] if bias else []) + [a, b]
    names = ["x", "w"] + (["bias"] if bias else []) + ["a", "b"]
    frozen = tuple(i for i, name in enumerate(names) if name in frozen)

    def op(fn):
        if bias:
            return lambda x, w, bb, a, b: fn(x, w, bb, a, b, 2.0, keep)
        return lambda x, w, a, b: fn(x, w, None, a, b, 2.0, keep)

    with many_blocks(threads):
        assert_same_function(op(ops.lora_linear), op(reference.lora_linear), *params,
                             frozen=frozen)


@KERNELS
@given(data=st.data(), threads=THREADS, weight=st.booleans(), bias=st.booleans())
def test_layer_norm_kernel_is_its_equation(data, threads, weight, bias):
    c = data.draw(st.integers(1, 9))
    params = [rows(data.draw, c)] + [data.draw(randn((c,))) for _ in range(weight + bias)]

    def op(fn):
        def apply(x, *p):
            p = list(p)
            return fn(x, p.pop(0) if weight else None, p.pop(0) if bias else None)
        return apply

    with many_blocks(threads):
        assert_same_function(op(ops.layer_norm), op(reference.layer_norm), *params)


@KERNELS
@given(data=st.data(), threads=THREADS)
def test_gelu_kernel_is_its_equation(data, threads):
    x = rows(data.draw, data.draw(st.integers(1, 9))) * 3.0
    x.reshape(-1)[0] = 0.0  # the kernel reads sigmoid(2z) back as y / x: x = 0 is its own case
    with many_blocks(threads):
        assert_same_function(ops.gelu, reference.gelu, x)


@KERNELS
@given(data=st.data(), ignore=st.booleans())
def test_cross_entropy_kernel_is_its_equation(data, ignore):
    vocab = data.draw(st.integers(1, 7))
    logits = rows(data.draw, vocab) * 3.0
    targets = data.draw(hnp.arrays(np.int64, logits.shape[:-1], elements=st.integers(0, vocab - 1)))
    if ignore:
        targets = np.where(data.draw(hnp.arrays(bool, targets.shape)), -100, targets)
        targets.reshape(-1)[0] = 0  # at least one counted
    index = -100 if ignore else None
    assert_same_function(lambda t: ops.cross_entropy(t, targets, index),
                         lambda t: reference.cross_entropy(t, targets, index), logits)


@KERNELS
@given(data=st.data(), threads=THREADS, causal=st.booleans(),
       frozen=st.sampled_from([(), (0,), (2,), (0, 1)]))
def test_attention_kernel_is_its_equation(data, threads, causal, frozen):
    """Causal queries may be the last Tq of Tk positions (a key/value cache's case)."""
    lead = data.draw(hnp.array_shapes(min_dims=1, max_dims=2, max_side=3))
    t_k, hd = data.draw(st.integers(1, 10)), data.draw(st.integers(1, 4))
    t_q = data.draw(st.integers(1, t_k)) if causal else data.draw(st.integers(1, 10))
    q, k, v = (data.draw(randn((*lead, t, hd))) for t in (t_q, t_k, t_k))
    scale = data.draw(st.sampled_from([None, 0.7]))
    with many_blocks(threads):
        assert_same_function(
            lambda q, k, v: ops.scaled_dot_product_attention(q, k, v, causal, scale),
            lambda q, k, v: reference.scaled_dot_product_attention(q, k, v, causal, scale),
            q, k, v, frozen=frozen)


@KERNELS
@given(data=st.data(), threads=THREADS)
def test_causal_self_attention_kernel_is_its_equation(data, threads):
    b, t, n_head, hd = (data.draw(st.integers(1, n)) for n in (2, 10, 3, 3))
    qkv = data.draw(randn((b, t, 3 * n_head * hd)))
    with many_blocks(threads):
        assert_same_function(lambda x: ops.causal_self_attention(x, n_head),
                             lambda x: reference.causal_self_attention(x, n_head), qkv)


@KERNELS
@given(data=st.data(), threads=THREADS, weight=st.booleans(),
       frozen=st.sampled_from([(), (0,), (1,)]))
def test_rms_norm_kernel_is_its_equation(data, threads, weight, frozen):
    c = data.draw(st.integers(1, 9))
    eps = data.draw(st.sampled_from([1e-6, 0.5]))
    params = [rows(data.draw, c)] + ([data.draw(randn((c,)))] if weight else [])

    def op(fn):
        return lambda x, *w: fn(x, w[0] if w else None, eps)

    with many_blocks(threads):
        assert_same_function(op(ops.rms_norm), op(reference.rms_norm), *params,
                             frozen=frozen if weight else ())


@KERNELS
@given(data=st.data(), threads=THREADS)
def test_rotary_embedding_kernel_is_its_equation(data, threads):
    """Tables of T positions from an offset (a key/value cache's), over 1 or 2 leading axes."""
    lead = data.draw(hnp.array_shapes(min_dims=1, max_dims=2, max_side=4))
    t, hd = data.draw(st.integers(1, 6)), 2 * data.draw(st.integers(1, 4))
    cos, sin = rope_tables(data.draw(st.integers(0, 50)) + np.arange(t), hd,
                           data.draw(st.sampled_from([10.0, 1e4])), np.float64)
    with many_blocks(threads):
        assert_same_function(lambda x: ops.rotary_embedding(x, cos, sin),
                             lambda x: reference.rotary_embedding(x, cos, sin),
                             data.draw(randn((*lead, t, hd))))


@KERNELS
@given(data=st.data(), threads=THREADS, frozen=st.sampled_from([(), (0,), (1,)]))
def test_swiglu_kernel_is_its_equation(data, threads, frozen):
    gate = rows(data.draw, data.draw(st.integers(1, 9))) * 3.0
    gate.reshape(-1)[::2] = 0.0  # the kernel reads sigmoid(gate) back as silu / gate: 1/2 at 0
    with many_blocks(threads):
        assert_same_function(ops.swiglu, reference.swiglu, gate, data.draw(randn(gate.shape)),
                             frozen=frozen)


@KERNELS
@given(data=st.data(), threads=THREADS,
       frozen=st.sampled_from([(), (0,), (1,), (2,), (0, 1), (1, 2)]))
def test_grouped_query_attention_kernel_is_its_equation(data, threads, frozen):
    """H = G Hkv query heads (G = 1 is multi-head attention), the queries the last Tq of Tk."""
    b, hkv, group, hd = (data.draw(st.integers(1, n)) for n in (2, 2, 3, 3))
    t_k = data.draw(st.integers(1, 10))
    t_q = data.draw(st.integers(1, t_k))
    q = data.draw(randn((b, hkv * group, t_q, hd)))
    k, v = (data.draw(randn((b, hkv, t_k, hd))) for _ in range(2))
    scale = data.draw(st.sampled_from([None, 0.3]))
    with many_blocks(threads):
        assert_same_function(lambda q, k, v: ops.grouped_query_attention(q, k, v, scale),
                             lambda q, k, v: reference.grouped_query_attention(q, k, v, scale),
                             q, k, v, frozen=frozen)


def test_attention_with_dropout_on_its_weights_is_the_reference():
    """The kernel has no dropout: given a mask, it runs the equation, mask and all."""
    rng = np.random.default_rng(0)
    qkv = rng.standard_normal((2, 5, 12))
    mask = ops.dropout_mask((2, 2, 5, 5), 0.5, rng, np.float64)
    assert_same_function(lambda x: ops.causal_self_attention(x, 2, mask),
                         lambda x: reference.causal_self_attention(x, 2, mask), qkv)
    without = ops.causal_self_attention(Tensor(qkv), 2).data
    assert not np.allclose(ops.causal_self_attention(Tensor(qkv), 2, mask).data, without)


@pytest.mark.parametrize("name", reference.__all__)
def test_every_reference_has_its_kernel_or_is_its_own(name):
    """The engine's ops are the kernels; only softmax, log-softmax, SiLU, the paths of the other
    adapters (lora_slices, lora_embedding: no hot path) and DoRA's dora_linear (no kernel yet)
    are the equations as is."""
    if name in ("softmax", "log_softmax", "silu", "lora_slices", "lora_embedding", "dora_linear"):
        assert getattr(ops, name) is getattr(reference, name)
    else:
        assert getattr(ops, name) is not getattr(reference, name)
        assert getattr(ops, name).__module__.startswith("minilora.ops.backend.")
