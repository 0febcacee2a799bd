"""Llama's ops: RMSNorm, rotary position embedding, SiLU and SwiGLU, grouped-query attention.

For each: the equation's VJP against finite differences (float64, Hypothesis-drawn shapes), the
equation against its composition of primitives, and what defines the op. The fast kernels are held
equal to these equations in ``tests/ops/test_kernels.py``, and to themselves on any number of
threads in ``tests/ops/test_backend.py``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minilora import Tensor, ops
from minilora.ops import reference
from minilora.ops.rotary import rope_inv_freq, rope_tables
from tests.gradcheck import FAST, assert_same_function, gradcheck, randn, shapes


def with_weight(fn, eps):
    return lambda x, w: fn(x, w, eps)


# ---- RMSNorm --------------------------------------------------------------------------------

def rms_norm_composed(x, w, eps):
    return x * (ops.mean(x * x, axis=-1, keepdims=True) + eps) ** -0.5 * w


@st.composite
def rms_operands(draw):
    x = draw(shapes(min_dims=1).flatmap(randn))
    return x, draw(randn(x.shape[-1:])), draw(st.sampled_from([1e-6, 1e-5, 0.5]))


@FAST
@given(args=rms_operands(), weighted=st.booleans())
def test_rms_norm_gradient_matches_finite_differences(args, weighted):
    x, w, eps = args
    if weighted:
        gradcheck(with_weight(reference.rms_norm, eps), x, w)
    else:
        gradcheck(lambda t: reference.rms_norm(t, None, eps), x)


@FAST
@given(args=rms_operands())
def test_rms_norm_equals_its_composition(args):
    x, w, eps = args
    assert_same_function(with_weight(reference.rms_norm, eps),
                         with_weight(rms_norm_composed, eps), x, w)


def test_rms_norm_gives_unit_root_mean_square_rows():
    x = np.random.default_rng(0).standard_normal((4, 16)) * 7.0
    y = ops.rms_norm(Tensor(x), None, eps=0.0).data
    np.testing.assert_allclose(np.sqrt(np.mean(y * y, axis=-1)), 1.0, rtol=1e-12)


# ---- rotary position embedding ----------------------------------------------------------------

@st.composite
def rope_operands(draw, min_dims=2):
    """x: (..., T, hd), hd even, and the tables of T positions from a drawn offset and theta."""
    lead = draw(shapes(min_dims=min_dims - 2, max_dims=2))
    t, hd = draw(st.integers(1, 4)), 2 * draw(st.integers(1, 3))
    offset, theta = draw(st.integers(0, 50)), draw(st.sampled_from([10.0, 1e4, 5e5]))
    x = draw(randn((*lead, t, hd)))
    return x, rope_tables(offset + np.arange(t), hd, theta, np.float64)


def rope_composed(x, cos, sin):
    h = x.shape[-1] // 2
    rotated = ops.concatenate([-x[..., h:], x[..., :h]], axis=-1)  # rotate_half, from primitives
    c, s = np.concatenate([cos, cos], -1), np.concatenate([sin, sin], -1)
    return x * c + rotated * s


@FAST
@given(args=rope_operands())
def test_rotary_embedding_gradient_matches_finite_differences(args):
    x, (cos, sin) = args
    gradcheck(lambda t: reference.rotary_embedding(t, cos, sin), x)


@FAST
@given(args=rope_operands())
def test_rotary_embedding_equals_its_composition(args):
    x, (cos, sin) = args
    assert_same_function(lambda t: reference.rotary_embedding(t, cos, sin),
                         lambda t: rope_composed(t, cos, sin), x)


@FAST
@given(args=rope_operands(), seed=st.integers(0, 99))
def test_rotary_vjp_is_the_inverse_rotation(args, seed):
    """dx = R(-a) g: the VJP is the embedding with the angles negated (sin -> -sin)."""
    x, (cos, sin) = args
    g = np.random.default_rng(seed).standard_normal(x.shape)
    t = Tensor(x, requires_grad=True)
    ops.rotary_embedding(t, cos, sin).backward(g)
    np.testing.assert_allclose(t.grad, ops.rotary_embedding(Tensor(g), cos, -sin).data,
                               rtol=1e-13, atol=1e-14)


@FAST
@given(args=rope_operands())
def test_rotary_embedding_keeps_the_length_of_each_pair(args):
    x, (cos, sin) = args
    y = ops.rotary_embedding(Tensor(x), cos, sin).data
    h = x.shape[-1] // 2
    np.testing.assert_allclose(np.hypot(y[..., :h], y[..., h:]), np.hypot(x[..., :h], x[..., h:]),
                               rtol=1e-12, atol=1e-14)


@FAST
@given(hd=st.integers(1, 4).map(lambda n: 2 * n), p=st.integers(0, 40), p2=st.integers(0, 40),
       shift=st.integers(1, 40), seed=st.integers(0, 99))
def test_rotated_scores_depend_only_on_the_relative_position(hd, p, p2, shift, seed):
    """<R(p) q, R(p') k> = <R(p + s) q, R(p' + s) k>: why RoPE encodes relative positions."""
    q, k = np.random.default_rng(seed).standard_normal((2, 1, hd))

    def score(pq, pk):
        rq = ops.rotary_embedding(Tensor(q), *rope_tables(np.array([pq]), hd, 1e4, np.float64))
        rk = ops.rotary_embedding(Tensor(k), *rope_tables(np.array([pk]), hd, 1e4, np.float64))
        return float(np.sum(rq.data * rk.data))

    assert score(p, p2) == pytest.approx(score(p + shift, p2 + shift), rel=1e-9, abs=1e-9)


def test_rope_tables_at_an_offset_are_the_rows_of_the_full_table():
    """What a key/value cache relies on: positions 5..8 alone give the full table's rows 5..8."""
    full = rope_tables(np.arange(9), 8, 1e4, np.float32)
    part = rope_tables(np.arange(5, 9), 8, 1e4, np.float32)
    for a, b in zip(full, part, strict=True):
        np.testing.assert_array_equal(a[5:], b)


def test_rope_frequencies_are_theta_to_the_minus_two_i_over_hd():
    np.testing.assert_allclose(rope_inv_freq(8, 1e4, np.float64),
                               [1.0, 1e4 ** -0.25, 1e4 ** -0.5, 1e4 ** -0.75], rtol=1e-15)
    assert rope_inv_freq(8, 1e4).dtype == np.float32


# ---- SiLU and SwiGLU --------------------------------------------------------------------------

def silu_composed(x):
    return x / (1.0 + ops.exp(-x))


@FAST
@given(x=shapes().flatmap(randn))
def test_silu_gradient_matches_finite_differences(x):
    gradcheck(ops.silu, x * 3.0)


@FAST
@given(x=shapes().flatmap(randn))
def test_silu_equals_its_composition(x):
    assert_same_function(ops.silu, silu_composed, x * 3.0)


@st.composite
def gate_and_up(draw, zeros=False):
    gate = draw(shapes().flatmap(randn)) * 3.0
    if zeros:  # the fast op reads sigmoid(gate) back as silu(gate) / gate: 1/2 where gate = 0
        gate = np.where(np.arange(gate.size).reshape(gate.shape) % 2 == 0, 0.0, gate)
    return gate, draw(randn(gate.shape))


@FAST
@given(args=gate_and_up())
def test_swiglu_gradient_matches_finite_differences(args):
    gradcheck(reference.swiglu, *args)


@FAST
@given(args=gate_and_up())
def test_swiglu_equals_silu_of_gate_times_up(args):
    assert_same_function(reference.swiglu, lambda g, u: ops.silu(g) * u, *args)


def test_silu_stays_finite_for_huge_float32_inputs():
    x = np.array([-1e4, -100.0, 0.0, 100.0, 1e4], np.float32)
    y = ops.swiglu(Tensor(x, requires_grad=True), Tensor(np.ones(5, np.float32)))
    y.backward(np.ones(5, np.float32))
    assert y.dtype == np.float32 and np.all(np.isfinite(y.data))
    np.testing.assert_array_equal(y.data, [0.0, 0.0, 0.0, 100.0, 1e4])


# ---- grouped-query attention ------------------------------------------------------------------

@st.composite
def gqa_operands(draw, max_t=4):
    """q: (B, H, Tq, hd), k, v: (B, Hkv, Tk, hd), H = G Hkv, queries the last Tq of Tk."""
    b, hkv, group, hd = (draw(st.integers(1, n)) for n in (2, 2, 3, 3))
    t_k = draw(st.integers(1, max_t))
    t_q = draw(st.integers(1, t_k))
    q = draw(randn((b, hkv * group, t_q, hd)))
    k, v = draw(randn((b, hkv, t_k, hd))), draw(randn((b, hkv, t_k, hd)))
    return (q, k, v), draw(st.sampled_from([None, 0.3]))


def gqa_composed(q, k, v, scale):
    """Each key/value head gathered for its group (HF's repeat_kv), then masked attention."""
    heads = np.arange(q.shape[1]) // (q.shape[1] // k.shape[1])
    kr, vr = (ops.getitem(z, (slice(None), heads)) for z in (k, v))  # (B, H, Tk, hd)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = ops.matmul(q, ops.swapaxes(kr, -1, -2)) * scale
    t_q, t_k = q.shape[2], k.shape[2]
    s = ops.masked_fill(s, np.triu(np.ones((t_q, t_k), bool), 1 + t_k - t_q), -np.inf)
    return ops.matmul(ops.softmax(s, axis=-1), vr)


@FAST
@given(args=gqa_operands())
def test_grouped_query_attention_gradient_matches_finite_differences(args):
    qkv, scale = args
    gradcheck(lambda q, k, v: reference.grouped_query_attention(q, k, v, scale), *qkv)


@FAST
@given(args=gqa_operands())
def test_grouped_query_attention_equals_its_composition(args):
    qkv, scale = args
    assert_same_function(lambda q, k, v: reference.grouped_query_attention(q, k, v, scale),
                         lambda q, k, v: gqa_composed(q, k, v, scale), *qkv)


@FAST
@given(args=gqa_operands())
def test_shared_key_value_gradient_is_the_sum_over_its_group(args):
    """dk_j, dv_j = the sums of the per-head gradients of multi-head attention on k, v repeated."""
    (q, k, v), scale = args
    group = q.shape[1] // k.shape[1]
    g = np.random.default_rng(0).standard_normal(q.shape)
    shared = [Tensor(z, requires_grad=True) for z in (k, v)]
    ops.grouped_query_attention(Tensor(q), *shared, scale).backward(g)
    repeated = [Tensor(np.repeat(z, group, axis=1), requires_grad=True) for z in (k, v)]
    ops.scaled_dot_product_attention(Tensor(q), *repeated, causal=True, scale=scale).backward(g)
    for mine, per_head in zip(shared, repeated, strict=True):
        b, hkv, t, hd = mine.shape
        summed = per_head.grad.reshape(b, hkv, group, t, hd).sum(axis=2)
        np.testing.assert_allclose(mine.grad, summed, rtol=1e-12, atol=1e-13)


def test_grouped_query_attention_refuses_heads_that_do_not_group():
    q, kv = Tensor(np.zeros((1, 3, 2, 4))), Tensor(np.zeros((1, 2, 2, 4)))
    with pytest.raises(ValueError, match=r"H a multiple of Hkv"):
        ops.grouped_query_attention(q, kv, kv)
