"""The fused ops, both as their equations (``ops.reference``) and as the engine's kernels: each VJP
against finite differences, and each op against its composition of primitives (value and
gradient), so every hand-written backward pass has two independent checks.

The compositions below use only primitive ops, written as the equations read. Every test runs
twice, once on each implementation (the ``impl`` fixture swaps ``ops.X`` for ``ops.reference.X``).
"""

import math
import warnings

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minilora import ConfigError, Tensor, ops
from tests.gradcheck import F32_TOL, FAST, assert_same_function, gradcheck, randn, shapes


@pytest.fixture(autouse=True, scope="module", params=["kernel", "reference"])
def impl(request):
    """Run the module's tests on the kernels, then on the reference ops (module-scoped, so that
    Hypothesis sees no per-test fixture)."""
    saved = {name: getattr(ops, name) for name in ops.reference.__all__}
    if request.param == "reference":
        for name in ops.reference.__all__:
            setattr(ops, name, getattr(ops.reference, name))
    try:
        yield request.param
    finally:
        for name, op in saved.items():
            setattr(ops, name, op)

# ---- the compositions ------------------------------------------------------------------------


def softmax_composed(x, axis=-1):
    z = x - ops.max(x, axis=axis, keepdims=True)
    e = ops.exp(z)
    return e / ops.sum(e, axis=axis, keepdims=True)


def log_softmax_composed(x, axis=-1):
    z = x - ops.max(x, axis=axis, keepdims=True)
    return z - ops.log(ops.sum(ops.exp(z), axis=axis, keepdims=True))


def cross_entropy_composed(logits, targets, ignore_index=None):
    """-mean over the counted positions of log_softmax(logits) picked at the targets."""
    flat = ops.reshape(logits, (-1, logits.shape[-1]))  # (N, V)
    t = targets.reshape(-1)  # (N,)
    rows = np.arange(len(t)) if ignore_index is None else np.flatnonzero(t != ignore_index)
    return -ops.mean(ops.getitem(log_softmax_composed(flat), (rows, t[rows])))


def layer_norm_composed(x, weight, bias, eps=1e-5):
    xc = x - ops.mean(x, axis=-1, keepdims=True)
    var = ops.mean(xc * xc, axis=-1, keepdims=True)
    y = xc / ops.sqrt(var + eps)
    y = y if weight is None else y * weight
    return y if bias is None else y + bias


def gelu_composed(x):
    return 0.5 * x * (1.0 + ops.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def future_mask(t_q, t_k):
    """True where query i (the last t_q of t_k positions) would look at a later key."""
    return np.triu(np.ones((t_q, t_k), dtype=bool), k=1 + t_k - t_q)


def attention_composed(q, k, v, causal, scale):
    s = ops.matmul(q, ops.swapaxes(k, -1, -2)) * scale  # (..., Tq, Tk)
    if causal:
        s = ops.masked_fill(s, future_mask(q.shape[-2], k.shape[-2]), -np.inf)
    return ops.matmul(softmax_composed(s), v)  # (..., Tq, hd)


def causal_self_attention_composed(qkv, n_head):
    b, t, c3 = qkv.shape
    hd = c3 // 3 // n_head
    q, k, v = (ops.transpose(ops.reshape(part, (b, t, n_head, hd)), (0, 2, 1, 3))  # (B, H, T, hd)
               for part in ops.split(qkv, 3, axis=-1))
    y = attention_composed(q, k, v, True, 1.0 / math.sqrt(hd))  # (B, H, T, hd)
    return ops.reshape(ops.transpose(y, (0, 2, 1, 3)), (b, t, c3 // 3))  # (B, T, C)


def lora_linear_composed(x, w, b, a, bm, scaling, mask):
    xd = x if mask is None else x * mask
    return ops.linear(x, w, b) + scaling * ops.linear(ops.linear(xd, a), bm)


# ---- what they take --------------------------------------------------------------------------


@st.composite
def logits_and_axis(draw):
    x = draw(shapes(min_dims=1).flatmap(randn))
    return x, draw(st.integers(-x.ndim, x.ndim - 1))


@st.composite
def logits_and_targets(draw, ignore=False):
    """logits (..., V) and integer targets (...); with ``ignore``, some targets are -100."""
    lead = draw(hnp.array_shapes(min_dims=0, max_dims=2, max_side=3))
    vocab = draw(st.integers(1, 4))
    logits = draw(randn((*lead, vocab))) * 3.0
    targets = draw(hnp.arrays(np.int64, lead, elements=st.integers(0, vocab - 1)))
    if ignore:
        hidden = draw(hnp.arrays(bool, lead))
        hidden.reshape(-1)[draw(st.integers(0, hidden.size - 1))] = False  # keep one counted
        targets = np.where(hidden, -100, targets)
    return logits, targets


@st.composite
def attention_operands(draw, causal):
    """q: (..., Tq, hd), k, v: (..., Tk, hd); causal queries are the last Tq of Tk positions."""
    batch = draw(hnp.array_shapes(min_dims=0, max_dims=2, max_side=2))
    t_k, hd = draw(st.integers(1, 4)), draw(st.integers(1, 3))
    t_q = draw(st.integers(1, t_k)) if causal else draw(st.integers(1, 4))
    q, k, v = (draw(randn((*batch, t, hd))) for t in (t_q, t_k, t_k))
    scale = draw(st.sampled_from([None, 0.3, 2.0]))
    return (q, k, v), scale


@st.composite
def lora_operands(draw, bias, mask):
    """x: (..., in), W: (out, in), b: (out,), A: (r, in), B: (out, r), s, mask of 0 and 1/(1-p).

    B is drawn non-zero on purpose: with B = 0 (how LoRA starts) dL/dA = s (G B)^T x is exactly
    zero, and a check of A's gradient would pass whatever the VJP did.
    """
    lead = draw(hnp.array_shapes(min_dims=0, max_dims=2, max_side=3))
    in_f, out_f, r = (draw(st.integers(1, 4)) for _ in range(3))
    x, w, a, bm = (draw(randn(s)) for s in ((*lead, in_f), (out_f, in_f), (r, in_f), (out_f, r)))
    bm = np.where(np.abs(bm) < 0.1, 0.1, bm)
    params = [x, w] + ([draw(randn((out_f,)))] if bias else []) + [a, bm]
    scaling = draw(st.sampled_from([0.5, 2.0, 16.0]))
    keep_mask = None
    if mask:
        keep = draw(hnp.arrays(bool, (*lead, in_f)))
        keep_mask = keep / (1.0 - 0.25)  # inverted dropout with p = 0.25
    return params, scaling, keep_mask


def lora_op(bias, scaling, mask, fn=None):
    """lora_linear (or its composition) as a function of its tensors only, bias present or not."""
    fn = fn or (lambda *args: ops.lora_linear(*args))  # looked up at call time: see impl
    if bias:
        return lambda x, w, b, a, bm: fn(x, w, b, a, bm, scaling, mask)
    return lambda x, w, a, bm: fn(x, w, None, a, bm, scaling, mask)


# ---- softmax, log_softmax, cross_entropy -----------------------------------------------------


@FAST
@given(args=logits_and_axis())
def test_softmax_gradient_matches_finite_differences(args):
    x, axis = args
    gradcheck(lambda t: ops.softmax(t, axis=axis), x)


@FAST
@given(args=logits_and_axis())
def test_softmax_equals_its_composition(args):
    x, axis = args
    assert_same_function(lambda t: ops.softmax(t, axis=axis),
                         lambda t: softmax_composed(t, axis=axis), x)


@FAST
@given(args=logits_and_axis())
def test_log_softmax_gradient_matches_finite_differences(args):
    x, axis = args
    gradcheck(lambda t: ops.log_softmax(t, axis=axis), x)


@FAST
@given(args=logits_and_axis())
def test_log_softmax_equals_its_composition(args):
    x, axis = args
    assert_same_function(lambda t: ops.log_softmax(t, axis=axis),
                         lambda t: log_softmax_composed(t, axis=axis), x)


@pytest.mark.parametrize("ignore", [False, True], ids=["all-counted", "ignore-index"])
@FAST
@given(data=st.data())
def test_cross_entropy_gradient_matches_finite_differences(ignore, data):
    logits, targets = data.draw(logits_and_targets(ignore))
    index = -100 if ignore else None
    gradcheck(lambda x: ops.cross_entropy(x, targets, ignore_index=index), logits)


@pytest.mark.parametrize("ignore", [False, True], ids=["all-counted", "ignore-index"])
@FAST
@given(data=st.data())
def test_cross_entropy_equals_its_composition(ignore, data):
    logits, targets = data.draw(logits_and_targets(ignore))
    index = -100 if ignore else None
    assert_same_function(lambda x: ops.cross_entropy(x, targets, ignore_index=index),
                         lambda x: cross_entropy_composed(x, targets, ignore_index=index), logits)


def test_cross_entropy_with_every_target_ignored_is_nan_as_in_pytorch():
    loss = ops.cross_entropy(Tensor(np.zeros((2, 3))), np.array([-100, -100]), ignore_index=-100)
    assert np.isnan(loss.item())


@pytest.mark.parametrize("op", [ops.softmax, ops.log_softmax], ids=["softmax", "log_softmax"])
def test_softmaxes_stay_finite_and_accurate_for_huge_float32_logits(op):
    """The docstring's claim: subtracting the row maximum keeps logits of +-1e4 finite."""
    x = np.array([[1e4, -1e4, 1e4 - 3.0], [-1e4, -1e4 + 1.0, -1e4 + 2.0]])
    out = op(Tensor(x.astype(np.float32)))
    assert out.dtype == np.float32 and np.all(np.isfinite(out.data))
    np.testing.assert_allclose(out.data, op(Tensor(x)).data, **F32_TOL)


def test_cross_entropy_stays_finite_for_huge_float32_logits():
    x = np.array([[1e4, -1e4, 1e4 - 3.0], [-1e4, -1e4 + 1.0, -1e4 + 2.0]])
    targets = np.array([2, 0])
    loss = ops.cross_entropy(Tensor(x.astype(np.float32)), targets)
    assert loss.dtype == np.float32 and np.isfinite(loss.item())
    np.testing.assert_allclose(loss.item(), ops.cross_entropy(Tensor(x), targets).item(), **F32_TOL)


# ---- layer_norm --------------------------------------------------------------------------------


@st.composite
def layer_norm_operands(draw, weight, bias):
    x = draw(shapes(min_dims=1).flatmap(randn))
    c = x.shape[-1]
    return [x] + ([draw(randn((c,)))] if weight else []) + ([draw(randn((c,)))] if bias else [])


def layer_norm_op(weight, bias, fn=None):
    """fn(x, weight or None, bias or None) as a function of the tensors that are present."""
    fn = fn or (lambda *args: ops.layer_norm(*args))  # looked up at call time: see impl

    def op(x, *params):
        params = list(params)
        w = params.pop(0) if weight else None
        b = params.pop(0) if bias else None
        return fn(x, w, b)
    return op


AFFINE = pytest.mark.parametrize("weight, bias", [(True, True), (True, False), (False, True),
                                                  (False, False)],
                                 ids=["weight+bias", "weight", "bias", "plain"])


@AFFINE
@FAST
@given(data=st.data())
def test_layer_norm_gradient_matches_finite_differences(weight, bias, data):
    gradcheck(layer_norm_op(weight, bias), *data.draw(layer_norm_operands(weight, bias)))


@AFFINE
@FAST
@given(data=st.data())
def test_layer_norm_equals_its_composition(weight, bias, data):
    assert_same_function(layer_norm_op(weight, bias),
                         layer_norm_op(weight, bias, fn=layer_norm_composed),
                         *data.draw(layer_norm_operands(weight, bias)))


@FAST
@given(data=st.data())
def test_layer_norm_with_a_frozen_input_still_trains_weight_and_bias(data):
    gradcheck(layer_norm_op(True, True), *data.draw(layer_norm_operands(True, True)), frozen=(0,))


# ---- gelu, dropout -----------------------------------------------------------------------------


@FAST
@given(x=shapes().flatmap(randn))
def test_gelu_gradient_matches_finite_differences(x):
    gradcheck(lambda t: ops.gelu(t), x * 2.0)


@FAST
@given(x=shapes().flatmap(randn))
def test_gelu_equals_its_composition(x):
    assert_same_function(lambda t: ops.gelu(t), gelu_composed, x * 2.0)


@FAST
@given(x=shapes().flatmap(randn), p=st.sampled_from([0.1, 0.5, 0.9]), seed=st.integers(0, 99))
def test_dropout_gradient_matches_finite_differences(x, p, seed):
    gradcheck(lambda t: ops.dropout(t, p, np.random.default_rng(seed)), x)


@FAST
@given(x=shapes().flatmap(randn), p=st.sampled_from([0.1, 0.5, 0.9]), seed=st.integers(0, 99))
def test_dropout_equals_x_times_a_mask_of_zeros_and_inverse_keep_probability(x, p, seed):
    """The mask read back from the output holds only 0 and 1/(1-p), and x * mask is dropout."""
    y = ops.dropout(Tensor(x), p, np.random.default_rng(seed)).data
    mask = np.where(y != 0, 1.0 / (1.0 - p), 0.0)  # x from randn is never exactly 0
    np.testing.assert_allclose(y[y != 0] / x[y != 0], 1.0 / (1.0 - p), rtol=1e-12)
    assert_same_function(lambda t: ops.dropout(t, p, np.random.default_rng(seed)),
                         lambda t: t * mask, x)


def test_dropout_with_the_same_seed_gives_the_same_mask():
    x = Tensor(np.ones((4, 8), np.float32))
    first = ops.dropout(x, 0.5, np.random.default_rng(7)).data
    again = ops.dropout(x, 0.5, np.random.default_rng(7)).data
    other = ops.dropout(x, 0.5, np.random.default_rng(8)).data
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


@pytest.mark.parametrize("p", [1.0, -0.1, 1.5])
def test_dropout_probability_outside_zero_to_one_is_an_error(p):
    """p = 1 would divide by zero in the 1/(1-p) scaling (PyTorch returns zeros there; minilora
    refuses it, as a rate that trains nothing is a mistake)."""
    with pytest.raises(ConfigError, match=f"dropout.p must be a number in \\[0, 1\\), got {p}"):
        ops.dropout(Tensor(np.ones(3)), p, np.random.default_rng(0))


@pytest.mark.parametrize("p, training", [(0.0, True), (0.5, False)], ids=["p=0", "eval"])
def test_dropout_is_the_identity_when_off(p, training):
    x = Tensor(np.arange(6.0))
    assert ops.dropout(x, p, np.random.default_rng(0), training=training) is x


# ---- attention ---------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@FAST
@given(data=st.data())
def test_scaled_dot_product_attention_gradient_matches_finite_differences(causal, data):
    qkv, scale = data.draw(attention_operands(causal))
    gradcheck(lambda q, k, v: ops.scaled_dot_product_attention(q, k, v, causal, scale), *qkv)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@FAST
@given(data=st.data())
def test_scaled_dot_product_attention_equals_its_composition(causal, data):
    qkv, scale = data.draw(attention_operands(causal))
    default = 1.0 / math.sqrt(qkv[0].shape[-1])
    assert_same_function(
        lambda q, k, v: ops.scaled_dot_product_attention(q, k, v, causal, scale),
        lambda q, k, v: attention_composed(q, k, v, causal, default if scale is None else scale),
        *qkv,
    )


@FAST
@given(data=st.data(), frozen=st.sampled_from([(0,), (1,), (2,), (0, 1)]))
def test_scaled_dot_product_attention_with_frozen_inputs_gradient_matches(data, frozen):
    """The backward skips what is not needed (dv alone, or dq/dk alone): the rest stays right."""
    qkv, scale = data.draw(attention_operands(True))
    gradcheck(lambda q, k, v: ops.scaled_dot_product_attention(q, k, v, True, scale), *qkv,
              frozen=frozen)


@st.composite
def qkv_and_heads(draw):
    """qkv: (B, T, 3C) with C = n_head * hd."""
    b, t, n_head, hd = (draw(st.integers(1, n)) for n in (2, 4, 2, 2))
    return draw(randn((b, t, 3 * n_head * hd))), n_head


@FAST
@given(args=qkv_and_heads())
def test_causal_self_attention_gradient_matches_finite_differences(args):
    qkv, n_head = args
    gradcheck(lambda x: ops.causal_self_attention(x, n_head), qkv)


@FAST
@given(args=qkv_and_heads())
def test_causal_self_attention_equals_its_composition(args):
    qkv, n_head = args
    assert_same_function(lambda x: ops.causal_self_attention(x, n_head),
                         lambda x: causal_self_attention_composed(x, n_head), qkv)


# ---- lora_linear -------------------------------------------------------------------------------

LORA_VARIANTS = pytest.mark.parametrize(
    "bias, mask", [(True, False), (False, False), (True, True), (False, True)],
    ids=["bias", "no-bias", "bias+dropout", "dropout"],
)


@LORA_VARIANTS
@FAST
@given(data=st.data())
def test_lora_linear_gradient_matches_finite_differences(bias, mask, data):
    params, scaling, keep = data.draw(lora_operands(bias, mask))
    gradcheck(lora_op(bias, scaling, keep), *params)


@LORA_VARIANTS
@FAST
@given(data=st.data())
def test_lora_linear_equals_its_composition(bias, mask, data):
    params, scaling, keep = data.draw(lora_operands(bias, mask))
    assert_same_function(lora_op(bias, scaling, keep),
                         lora_op(bias, scaling, keep, fn=lora_linear_composed), *params)


@FAST
@given(data=st.data(), frozen=st.sampled_from([(1, 2), (0, 1, 2), (1, 2, 3), (1, 2, 4)]))
def test_lora_linear_with_a_frozen_base_layer_gradient_matches_finite_differences(data, frozen):
    """How LoRA trains: W and b frozen (x too in a first layer, or A or B in some variants);
    whatever still trains gets its gradient, and nothing frozen gets one."""
    params, scaling, keep = data.draw(lora_operands(True, True))
    gradcheck(lora_op(True, scaling, keep), *params, frozen=frozen)


def test_lora_linear_gives_a_a_non_zero_gradient_once_b_is_non_zero():
    """The trap the property tests avoid: with B = 0, dA = s (G B)^T x is exactly zero."""
    rng = np.random.default_rng(0)
    x, w, a = rng.standard_normal((5, 3)), rng.standard_normal((4, 3)), rng.standard_normal((2, 3))
    g = rng.standard_normal((5, 4))
    grads = {}
    for name, b_init in (("zero", np.zeros((4, 2))), ("non-zero", rng.standard_normal((4, 2)))):
        lora_a, lora_b = Tensor(a, requires_grad=True), Tensor(b_init, requires_grad=True)
        ops.lora_linear(Tensor(x), Tensor(w), None, lora_a, lora_b, 2.0).backward(g)
        grads[name] = lora_a.grad, lora_b.grad
    assert np.all(grads["zero"][0] == 0) and np.any(grads["zero"][1] != 0)
    assert np.all(grads["non-zero"][0] != 0)


def test_lora_linear_with_a_frozen_weight_never_forms_dw(mm_calls, impl):
    """No backward product has W's shape (out, in): the saving LoRA promises."""
    if impl == "reference":
        pytest.skip("the reference's products are plain @, not counted; it checks requires_grad")
    n, in_f, out_f, r = 7, 5, 6, 2  # all different, so a product's shape says what it is
    x = Tensor(np.ones((n, in_f)), requires_grad=True)
    w = Tensor(np.ones((out_f, in_f)))
    lora_a = Tensor(np.ones((r, in_f)), requires_grad=True)
    lora_b = Tensor(np.ones((out_f, r)), requires_grad=True)
    y = ops.lora_linear(x, w, None, lora_a, lora_b, 2.0)
    forward_calls = len(mm_calls)
    y.backward(np.ones((n, out_f)))
    backward_outputs = [out for _, _, out in mm_calls[forward_calls:]]
    assert (out_f, in_f) not in backward_outputs
    assert (r, in_f) in backward_outputs or (in_f, r) in backward_outputs  # dA, or dA^T
    assert (out_f, r) in backward_outputs or (r, out_f) in backward_outputs  # dB, or dB^T
    assert w.grad is None


# ---- what mutation testing found unchecked ------------------------------------------------------

def test_gelu_at_exactly_zero_and_far_below_it():
    """GELU'(0) = 1/2 (the backward reads s = y / x, so x = 0 is its own case), and a very
    negative input gives 0 with no overflow warning, in float32 as in float64."""
    for dtype in (np.float32, np.float64):
        x = Tensor(np.array([0.0, -1000.0, 1.0], dtype=dtype), requires_grad=True)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            y = ops.gelu(x)
            y.backward(np.ones(3, dtype=dtype))
        np.testing.assert_array_equal(y.data[:2], [0.0, 0.0])
        k = math.sqrt(2 / math.pi)  # GELU'(1) from its formula
        t = math.tanh(k * (1 + 0.044715))
        want = 0.5 * (1 + t) + 0.5 * (1 - t * t) * k * (1 + 3 * 0.044715)
        np.testing.assert_allclose(x.grad, [0.5, 0.0, want], rtol=1e-6)


@pytest.mark.parametrize("causal", [False, True])
def test_attention_rows_of_very_different_scale_stay_finite(causal):
    """Each row of scores is shifted by its own maximum: a row of scores near 1e4 beside one near
    0 must not underflow the second (a shift by the global maximum would give 0 / 0)."""
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 2, 130, 8)) for _ in range(3))  # > 2 row blocks
    q[0, 0] *= 3000.0  # head 0: scores of thousands; head 1: ordinary ones
    want = attention_composed(*(Tensor(a) for a in (q, k, v)), causal, 1 / math.sqrt(8)).data
    # float32 scores of ~1e4 carry round-off of ~1e-3 into the exponent, so into the weights
    for dtype, tol in ((np.float64, {"rtol": 1e-10, "atol": 1e-12}),
                       (np.float32, {"rtol": 1e-3, "atol": 1e-3})):
        got = ops.scaled_dot_product_attention(*(Tensor(a.astype(dtype)) for a in (q, k, v)),
                                               causal=causal).data
        assert got.dtype == dtype and np.all(np.isfinite(got))
        np.testing.assert_allclose(got, want, **tol)


def test_attention_computes_no_product_for_a_frozen_input(mm_calls):
    """dK and dV need two products of their own: with k and v frozen the kernel must not run
    them (the equation, ops.reference, is written for reading and computes all three)."""
    from minilora.ops.backend.attention import scaled_dot_product_attention as kernel

    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal((2, 16, 4)) for _ in range(3))

    def products_of_backward(trainable):
        t = [Tensor(a, requires_grad=i in trainable) for i, a in enumerate((q, k, v))]
        out = kernel(*t, causal=True)
        before = len(mm_calls)
        out.backward(np.ones_like(out.data))
        return len(mm_calls) - before

    every, only_q, only_v = products_of_backward({0, 1, 2}), products_of_backward({0}), \
        products_of_backward({2})
    assert only_q < every and only_v < every and only_v < only_q
