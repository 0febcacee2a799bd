"""The LoRA properties docs/theory.md derives (merge, unmerge, a fresh adapter, frozen weights,
counts, closed-form gradients, full rank...), each a test of its own, over random in, out, r,
alpha, dtype (float32, float64) and seeds. Tolerance: helpers.py."""

from __future__ import annotations

import copy
import io
import json
import math

import numpy as np
import pytest
import scipy.linalg
from hypothesis import given
from hypothesis import strategies as st

from minilora import Tensor, ops
from minilora.lora import (
    LoRAConfig,
    LoRALinear,
    apply_lora,
    disable_adapter,
    get_nb_trainable_parameters,
    load_lora_state_dict,
    lora_parameter_counts,
    lora_state_dict,
    named_lora_layers,
)
from minilora.nn import Linear
from tests.lora.helpers import (
    DTYPES,
    PROPERTY,
    ToyGPT,
    assert_within_rounding,
    layer_specs,
    oracle_output,
    tokens,
)

TARGETS = st.lists(st.sampled_from(["c_attn", "c_proj", "c_fc", "attn.c_proj", "mlp.c_proj"]),
                   min_size=1, max_size=3, unique=True)


@st.composite
def adapted_models(draw, **config):
    """(base-model seed, ToyGPT adapted by a random config, that config); B left at 0."""
    seed, dtype = draw(st.integers(0, 2**31 - 1)), draw(st.sampled_from(DTYPES))
    cfg = LoRAConfig(r=draw(st.integers(1, 6)), lora_alpha=draw(st.integers(1, 32)),
                     target_modules=draw(TARGETS), use_rslora=draw(st.booleans()), **config)
    c = draw(st.integers(2, 6))  # c = 1 would make LayerNorm's output 0: nothing to learn
    model = ToyGPT(c=c, n_layer=draw(st.integers(1, 2)), dtype=dtype, seed=seed)
    return seed, apply_lora(model, cfg, rng=seed + 1), cfg


def train_adapters(model, seed: int) -> None:
    """Stand in for training: every lora_B gets non-zero values, so adapters change the output."""
    rng = np.random.default_rng(seed)
    for _, layer in named_lora_layers(model):
        layer.lora_B.data = rng.normal(0, 0.5, layer.lora_B.shape).astype(layer.lora_B.dtype)


# ---- 1. merge ----------------------------------------------------------------------------------

@PROPERTY
@given(spec=layer_specs())
def test_merged_weight_equals_w_plus_scaled_ba(spec):
    layer = spec.build()
    W, A, B = (p.data.astype(np.float64) for p in (layer.weight, layer.lora_A, layer.lora_B))
    layer.merge()
    s = spec.scaling
    assert layer.merged and layer.weight.dtype == np.dtype(spec.dtype)
    assert_within_rounding(layer.weight.data, W + s * (B @ A),
                           np.abs(W) + s * (np.abs(B) @ np.abs(A)), spec.r, spec.dtype)


# ---- 2. merged = unmerged; unmerge(merge(W)) = W; merge twice = merge once --------------------

@PROPERTY
@given(spec=layer_specs())
def test_merged_output_equals_unmerged_output(spec):
    layer, x = spec.build(), spec.inputs()
    unmerged = layer(Tensor(x)).data
    layer.merge()
    merged = layer(Tensor(x)).data
    _, M = oracle_output(layer, x, spec.scaling)  # magnitude only; both sides are computed
    assert_within_rounding(merged, unmerged, M, spec.in_features + spec.r + 2, spec.dtype)


@PROPERTY
@given(spec=layer_specs())
def test_unmerge_after_merge_gives_back_w(spec):
    layer = spec.build()
    W = layer.weight.data.copy()
    D = np.abs(layer.delta_weight().astype(np.float64))
    layer.merge()
    layer.unmerge()
    assert not layer.merged and D.any()
    np.testing.assert_array_equal(layer.weight.data, W)  # the array merge replaced: bit for bit


@PROPERTY
@given(spec=layer_specs())
def test_merging_or_unmerging_twice_changes_nothing(spec):
    layer = spec.build()
    layer.merge()
    once = layer.weight.data.copy()
    with pytest.warns(UserWarning, match="already merged"):  # as PEFT: nothing to do, said
        layer.merge()
    np.testing.assert_array_equal(layer.weight.data, once)
    layer.unmerge()
    back = layer.weight.data.copy()
    layer.unmerge()
    np.testing.assert_array_equal(layer.weight.data, back)


# ---- 3. a fresh adapter changes nothing ----------------------------------------------------------

@PROPERTY
@given(case=adapted_models(lora_dropout=0.25), data=st.data())
def test_fresh_adapter_gives_exactly_the_base_output(case, data):
    seed, model, _ = case
    base = ToyGPT(c=model.lm_head.in_features, n_layer=len(model.transformer.h),
                  dtype=model.lm_head.weight.dtype, seed=seed)
    idx, _ = tokens(seed)
    model.train(data.draw(st.booleans()))  # dropout on the adapter path or not: B = 0 either way
    np.testing.assert_array_equal(model(idx).data, base(idx).data)


# ---- 4. frozen stays frozen --------------------------------------------------------------------

class MinimalSGD:
    """SGD with momentum and (coupled) weight decay, as torch.optim.SGD; skips grad-less params."""

    def __init__(self, params, lr=0.1, momentum=0.9, weight_decay=0.1):
        self.params, self.lr, self.mu, self.wd = list(params), lr, momentum, weight_decay
        self.buf = {}

    def step(self):
        for p in self.params:
            if p.grad is None:
                continue
            g = p.grad + self.wd * p.data
            self.buf[id(p)] = g if id(p) not in self.buf else self.mu * self.buf[id(p)] + g
            p.data = p.data - self.lr * self.buf[id(p)]


class MinimalAdamW:
    """AdamW (decoupled weight decay, bias correction), as torch.optim.AdamW; skips grad-less."""

    def __init__(self, params, lr=0.01, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1):
        self.params, self.lr, self.betas, self.eps = list(params), lr, betas, eps
        self.wd = weight_decay
        self.m, self.v, self.t = {}, {}, 0

    def step(self):
        self.t += 1
        b1, b2 = self.betas
        for p in self.params:
            if p.grad is None:
                continue
            k = id(p)
            self.m[k] = b1 * self.m.get(k, 0) + (1 - b1) * p.grad
            self.v[k] = b2 * self.v.get(k, 0) + (1 - b2) * p.grad * p.grad
            m_hat, v_hat = self.m[k] / (1 - b1**self.t), self.v[k] / (1 - b2**self.t)
            p.data = (p.data * (1 - self.lr * self.wd)
                      - self.lr * m_hat / (np.sqrt(v_hat) + self.eps)).astype(p.dtype)


@PROPERTY
@given(case=adapted_models(bias="lora_only"), optimizer=st.sampled_from([MinimalSGD, MinimalAdamW]),
       steps=st.integers(1, 4))
def test_frozen_parameters_are_bit_identical_after_training(case, optimizer, steps):
    seed, model, _ = case
    # what must train, from the names alone (not from requires_grad, which is what is under test)
    trains = {f"{n}.{p}" for n, _ in named_lora_layers(model) for p in ("lora_A", "lora_B", "bias")}
    frozen = {n: p.data.copy() for n, p in model.named_parameters() if n not in trains}
    assert "transformer.wte.weight" in frozen and any(n.endswith("c_fc.weight") for n in frozen)
    lora_B = {n: p.data.copy() for n, p in model.named_parameters() if n.endswith("lora_B")}
    opt = optimizer(model.parameters())  # every parameter, frozen ones included
    for step in range(steps):
        idx, targets = tokens(seed + step)
        model.zero_grad()
        ops.cross_entropy(model(idx), targets).backward()
        opt.step()
    params = dict(model.named_parameters())
    for name, before in frozen.items():
        assert params[name].grad is None, name  # never computed, so nothing to step with
        np.testing.assert_array_equal(params[name].data, before, err_msg=name)
    assert any(not np.array_equal(params[n].data, b) for n, b in lora_B.items())  # B did train


# ---- 5. counting -------------------------------------------------------------------------------

@PROPERTY
@given(c=st.integers(1, 8), n_layer=st.integers(1, 3), r=st.integers(1, 8), targets=TARGETS,
       r_first_block=st.integers(1, 8))
def test_trainable_count_is_sum_of_r_times_in_plus_out(c, n_layer, r, targets, r_first_block):
    model = ToyGPT(c=c, n_layer=n_layer)
    config = LoRAConfig(r=r, target_modules=targets, rank_pattern={r"h\.0\..*": r_first_block})
    shapes = {n: m.weight.shape for n, m in model.named_modules() if isinstance(m, Linear)}
    adapted = [n for n in shapes if any(n == t or n.endswith("." + t) for t in targets)]
    rank = {n: r_first_block if ".h.0." in n else r for n in adapted}
    expected = sum(rank[n] * (shapes[n][0] + shapes[n][1]) for n in adapted)  # Σ r (in + out)
    apply_lora(model, config)
    trainable, total = get_nb_trainable_parameters(model)
    assert trainable == expected
    assert sum(count.lora_params for count in lora_parameter_counts(model)) == expected
    assert total == ToyGPT(c=c, n_layer=n_layer).num_parameters() + expected


# ---- 6. gradients in closed form --------------------------------------------------------------

@PROPERTY
@given(spec=layer_specs(), p=st.sampled_from([0.0, 0.5]))
def test_lora_gradients_match_their_closed_forms(spec, p):
    layer = spec.build(lora_dropout=p)
    mask_rng = copy.deepcopy(layer.rng)  # the generator the layer draws its dropout mask from
    x = Tensor(spec.inputs(), requires_grad=True)
    y = layer(x)
    G = np.random.default_rng(spec.seed + 2).normal(0, 1, y.shape).astype(spec.dtype)
    y.backward(G)

    mask = 1.0
    if p > 0:
        mask = (mask_rng.random(x.shape, dtype=spec.dtype) >= p).astype(np.float64) / (1 - p)
    X = (x.data.astype(np.float64) * mask).reshape(-1, spec.in_features)  # d(x): (N, in)
    G = G.astype(np.float64).reshape(-1, spec.out_features)  # dL/dy: (N, out)
    A, B, W = (q.data.astype(np.float64) for q in (layer.lora_A, layer.lora_B, layer.weight))
    s, n_rows = spec.scaling, X.shape[0]
    h = X @ A.T  # (N, r)
    assert_within_rounding(layer.lora_B.grad, s * G.T @ h,  # dL/dB = s G^T h
                           s * np.abs(G).T @ (np.abs(X) @ np.abs(A).T), n_rows + spec.in_features,
                           spec.dtype)
    assert_within_rounding(layer.lora_A.grad, s * (G @ B).T @ X,  # dL/dA = s (G B)^T d(x)
                           s * (np.abs(G) @ np.abs(B)).T @ np.abs(X), n_rows + spec.out_features,
                           spec.dtype)
    dx = (G @ W).reshape(x.shape) + s * ((G @ B) @ A).reshape(x.shape) * mask  # dL/dx
    dx_mag = ((np.abs(G) @ np.abs(W)).reshape(x.shape)
              + s * ((np.abs(G) @ np.abs(B)) @ np.abs(A)).reshape(x.shape) * mask)
    assert_within_rounding(x.grad, dx, dx_mag, spec.out_features + spec.r + 2, spec.dtype)
    assert layer.weight.grad is None and (layer.bias is None or layer.bias.grad is None)


# ---- 7. full rank can express full fine-tuning --------------------------------------------------

@PROPERTY
@given(in_f=st.integers(1, 10), out_f=st.integers(1, 10), alpha=st.integers(1, 32),
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**31 - 1))
def test_full_rank_lora_represents_any_delta_w(in_f, out_f, alpha, dtype, seed):
    rng = np.random.default_rng(seed)
    r = min(in_f, out_f)
    layer = LoRALinear(Linear(in_f, out_f, dtype=dtype, rng=rng), r, alpha, rng=rng)
    W, s = layer.weight.data.astype(np.float64), alpha / r
    delta = rng.normal(0, 1, (out_f, in_f))  # any target ΔW: (out, in), full rank almost surely
    Q = np.linalg.qr(rng.normal(0, 1, (r, r)))[0]  # a well-conditioned factor to hold fixed
    if r == in_f:  # A = Q (r, in) square: least squares for B in  A^T (s B^T) = ΔW^T
        A = Q
        B = scipy.linalg.lstsq(A.T, delta.T)[0].T / s
    else:  # r == out: B = Q (out, r) square: least squares for A in  B (s A) = ΔW
        B = Q
        A = scipy.linalg.lstsq(B, delta)[0] / s
    layer.lora_A.data, layer.lora_B.data = A.astype(dtype), B.astype(dtype)
    A, B = layer.lora_A.data.astype(np.float64), layer.lora_B.data.astype(np.float64)
    # least squares is normwise (not elementwise) accurate: its error is bounded by a multiple of
    # the largest |ΔW|, so that joins the elementwise magnitude s |B| |A| of the product
    magnitude = s * np.abs(B) @ np.abs(A) + np.abs(delta).max()
    assert_within_rounding(layer.delta_weight(), delta, magnitude, 2 * r + 2, dtype)
    layer.merge()  # and the merged layer is the fully fine-tuned one, W + ΔW
    assert_within_rounding(layer.weight.data, W + delta, np.abs(W) + magnitude, r + 3, dtype)


@PROPERTY
@given(in_f=st.integers(2, 9), out_f=st.integers(2, 9), alpha=st.integers(1, 32),
       data=st.data(), seed=st.integers(0, 2**31 - 1))
def test_rank_below_min_cannot_represent_a_full_rank_delta_w(in_f, out_f, alpha, data, seed):
    """The converse, so the claim above is not vacuous. Below full rank the closest adapter is the
    truncated SVD (Eckart-Young-Mirsky): through a merged layer it misses W + ΔW by sigma_{r+1} in
    the spectral norm and by sqrt(sigma_{r+1}^2 + ... + sigma_min^2) in the Frobenius norm, which
    is larger whenever two or more singular values are left out; another rank-r adapter (a random
    A and the best B for it) misses by at least as much in both."""
    rng = np.random.default_rng(seed)
    r = data.draw(st.integers(1, min(in_f, out_f) - 1), label="r")
    layer = LoRALinear(Linear(in_f, out_f, dtype="float64", rng=rng), r, alpha, rng=rng)
    W, s = layer.weight.data.copy(), layer.scaling
    delta = rng.normal(0, 1, (out_f, in_f))  # full rank almost surely
    U, sigma, Vt = scipy.linalg.svd(delta, full_matrices=False)
    spectral, frobenius = sigma[r], math.sqrt(np.sum(sigma[r:] ** 2))
    layer.lora_B.data, layer.lora_A.data = U[:, :r] * sigma[:r] / s, Vt[:r].copy()
    layer.merge()
    miss = W + delta - layer.weight.data
    assert np.linalg.norm(miss, 2) == pytest.approx(spectral, rel=1e-9)
    assert np.linalg.norm(miss) == pytest.approx(frobenius, rel=1e-9)
    if len(sigma) - r >= 2:
        assert frobenius > spectral * (1 + 1e-6)  # the two norms' answers differ
    A = rng.normal(0, 1, (r, in_f))
    B = scipy.linalg.lstsq(A.T, delta.T)[0].T / s  # the best B for this A
    other = delta - s * B @ A
    assert np.linalg.norm(other, 2) >= spectral * (1 - 1e-9)
    assert np.linalg.norm(other) >= frobenius * (1 - 1e-9)


# ---- 8. disable_adapter ------------------------------------------------------------------------

@PROPERTY
@given(case=adapted_models())
def test_disable_adapter_restores_the_base_output_exactly_and_keeps_adapters(case):
    seed, model, _ = case
    base = ToyGPT(c=model.lm_head.in_features, n_layer=len(model.transformer.h),
                  dtype=model.lm_head.weight.dtype, seed=seed)
    train_adapters(model, seed)
    idx, _ = tokens(seed)
    adapted = model(idx).data
    adapters = lora_state_dict(model)
    assert not np.array_equal(adapted, base(idx).data)  # the adapters do change the output
    with disable_adapter(model):
        np.testing.assert_array_equal(model(idx).data, base(idx).data)
    np.testing.assert_array_equal(model(idx).data, adapted)
    for name, value in lora_state_dict(model).items():
        np.testing.assert_array_equal(value, adapters[name])


# ---- 9. state dicts round-trip bit for bit ------------------------------------------------------

@PROPERTY
@given(case=adapted_models(bias="lora_only"))
def test_lora_state_dict_round_trip_is_bit_exact(case):
    seed, model, config = case
    train_adapters(model, seed)
    for _, layer in named_lora_layers(model):  # trained biases travel with the adapter
        if layer.bias is not None:
            layer.bias.data = layer.bias.data + 1
    adapter = lora_state_dict(model)
    buffer = io.BytesIO()  # through a file and JSON, as a LoRA run saves it
    np.savez(buffer, **adapter)
    buffer.seek(0)
    with np.load(buffer, allow_pickle=False) as f:
        loaded = {k: f[k] for k in f.files}
    config_back = LoRAConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert config_back == config

    dtype = model.lm_head.weight.dtype
    other = ToyGPT(c=model.lm_head.in_features, n_layer=len(model.transformer.h), dtype=dtype,
                   seed=seed)
    apply_lora(other, config_back, rng=seed + 99)  # a different A until loaded
    load_lora_state_dict(other, loaded)
    back = lora_state_dict(other)
    assert list(back) == list(adapter)
    for name, value in adapter.items():
        np.testing.assert_array_equal(back[name], value, err_msg=name)
        assert back[name].dtype == value.dtype
    idx, _ = tokens(seed)
    np.testing.assert_array_equal(other(idx).data, model(idx).data)


@PROPERTY
@given(case=adapted_models())
def test_full_state_dict_of_an_adapted_model_round_trips_bit_exact(case):
    seed, model, config = case
    train_adapters(model, seed)
    state = model.state_dict()
    other = apply_lora(ToyGPT(c=model.lm_head.in_features, n_layer=len(model.transformer.h),
                              dtype=model.lm_head.weight.dtype, seed=seed + 1), config)
    other.load_state_dict(state)
    assert list(other.state_dict()) == list(state)
    for name, value in other.state_dict().items():
        np.testing.assert_array_equal(value, state[name], err_msg=name)


def test_scaling_is_alpha_over_r_or_over_sqrt_r():
    base = Linear(3, 2, rng=0)
    assert LoRALinear(base, 4, 8).scaling == 2.0
    assert LoRALinear(Linear(3, 2, rng=0), 4, 8, use_rslora=True).scaling == 8 / math.sqrt(4)
