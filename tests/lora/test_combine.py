"""Combining adapters, as PEFT's ``add_weighted_adapter``: what each combination type computes.

``cat`` is the weighted sum of the deltas, exactly; ``svd`` is the truncated SVD of that sum (the
best rank-k approximation); ``linear`` is (Σ c_i B_i)(Σ sign_i c_i A_i) with c_i = sqrt|w_i s_i|,
the weighted sum plus cross terms B_i A_j, which it equals only for one adapter."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minilora import ConfigError
from minilora.lora import (
    LoRAConfig,
    add_adapter,
    add_weighted_adapter,
    apply_lora,
    get_nb_trainable_parameters,
    named_lora_layers,
)
from tests.lora.helpers import PROPERTY, ToyGPT, assert_unchanged, snapshot, train_every_adapter

TARGETS = [["c_attn"], ["c_attn", "c_fc"], ["c_fc", "wte"], ["c_attn", "wte"]]


@st.composite
def combinable(draw, equal_ranks: bool = False):
    """(a ToyGPT with 2 or 3 trained float64 adapters, their names, weights, some negative)."""
    seed = draw(st.integers(0, 2**31 - 1))
    model = ToyGPT(c=draw(st.integers(2, 4)), n_layer=1, seed=seed)
    names = ["default", "b", "c"][:draw(st.integers(2, 3))]
    r = draw(st.integers(1, 3))
    for i, name in enumerate(names):
        targets = draw(st.sampled_from(TARGETS))
        slices = draw(st.sampled_from([None, {"c_attn": ["q", "v"]}])) \
            if "c_attn" in targets and not equal_ranks else None
        add_adapter(model, name, LoRAConfig(
            r=r if equal_ranks else draw(st.integers(1, 3)), lora_alpha=draw(st.integers(1, 8)),
            use_rslora=draw(st.booleans()), target_modules=targets, target_slices=slices),
            rng=seed + i)
    weights = [draw(st.floats(-2, 2).filter(lambda w: abs(w) > 0.05)) for _ in names]
    return train_every_adapter(model, seed), names, weights


def weighted_delta(layer, names, weights) -> np.ndarray:
    return sum(w * layer.delta_weight(n) for n, w in zip(names, weights, strict=True)
               if n in layer.adapters)


@PROPERTY
@given(case=combinable())
def test_cat_is_the_weighted_sum_of_the_deltas(case):
    model, names, weights = case
    add_weighted_adapter(model, names, weights, "mix", combination_type="cat")
    config = model.peft_config["mix"]
    ranks = [model.peft_config[n].r * (2 if model.peft_config[n].target_slices else 1)
             for n in names]
    assert config.r == config.lora_alpha == sum(ranks)  # ranks add; s = 1
    for _, layer in named_lora_layers(model):
        if "mix" in layer.adapters:
            np.testing.assert_allclose(layer.delta_weight("mix"),
                                       weighted_delta(layer, names, weights),
                                       rtol=1e-12, atol=1e-13)


@PROPERTY
@given(case=combinable(), k=st.integers(1, 4))
def test_svd_is_the_truncated_svd_of_the_weighted_sum(case, k):
    """B A = U_k S_k V_k^T of M = Σ w_i ΔW_i (numpy's SVD here, scipy's in the code): the best
    rank-k approximation; M itself once k >= rank M."""
    model, names, weights = case
    add_weighted_adapter(model, names, weights, "mix", combination_type="svd", svd_rank=k)
    for _, layer in named_lora_layers(model):
        if "mix" not in layer.adapters:
            continue
        M = weighted_delta(layer, names, weights)
        product = M.T if M.shape != (layer.out_features, layer.in_features) else M
        U, S, Vt = np.linalg.svd(product, full_matrices=False)
        best = (U[:, :k] * S[:k]) @ Vt[:k]
        best = best.T if product is not M else best
        scale = max(float(np.abs(M).max()), 1e-300)
        np.testing.assert_allclose(layer.delta_weight("mix"), best, rtol=0, atol=1e-9 * scale)
        if k >= np.linalg.matrix_rank(M):
            np.testing.assert_allclose(layer.delta_weight("mix"), M, rtol=0, atol=1e-9 * scale)


@PROPERTY
@given(case=combinable(equal_ranks=True))
def test_linear_is_the_product_of_the_weighted_sums_not_the_sum_of_the_deltas(case):
    """ΔW = (Σ_i c_i B_i)(Σ_j sign_j c_j A_j), c_i = sqrt|w_i s_i|: the weighted sum of the deltas
    plus the cross terms c_i sign_j c_j B_i A_j (i != j)."""
    model, names, weights = case
    add_weighted_adapter(model, names, weights, "mix", combination_type="linear")
    for _, layer in named_lora_layers(model):
        held = [(n, w) for n, w in zip(names, weights, strict=True) if n in layer.adapters]
        if "mix" not in layer.adapters:
            continue
        A_sum, B_sum = 0.0, 0.0
        for n, w in held:
            A, B = (p.data for p in layer.adapter_parameters(n))
            ws = w * layer.adapters[n].scaling
            A_sum, B_sum = A_sum + np.sign(ws) * np.sqrt(abs(ws)) * A, B_sum + np.sqrt(abs(ws)) * B
        expected = B_sum @ A_sum
        expected = expected.T if expected.shape != layer.weight.shape else expected
        np.testing.assert_allclose(layer.delta_weight("mix"), expected, rtol=1e-12, atol=1e-13)
        if len(held) == 1:
            np.testing.assert_allclose(layer.delta_weight("mix"),
                                       weighted_delta(layer, names, weights), rtol=1e-12,
                                       atol=1e-13)


def test_linear_misses_the_weighted_sum_when_two_adapters_share_a_layer():
    model = ToyGPT(c=3, n_layer=1)
    for name in ("default", "b"):
        add_adapter(model, name, LoRAConfig(r=2, target_modules=["c_fc"]), rng=len(name))
    train_every_adapter(model, 0)
    add_weighted_adapter(model, ["default", "b"], [1.0, 1.0], "mix", combination_type="linear")
    layer = model.transformer.h[0].mlp.c_fc
    wanted = layer.delta_weight("default") + layer.delta_weight("b")
    assert np.abs(layer.delta_weight("mix") - wanted).max() > 1e-3 * np.abs(wanted).max()


def test_the_combination_is_a_new_inactive_frozen_adapter_of_scaling_1():
    model = ToyGPT()
    add_adapter(model, "default", LoRAConfig(r=2, target_modules=["c_attn"]))
    add_adapter(model, "b", LoRAConfig(r=3, target_modules=["c_fc"]))
    trainable = get_nb_trainable_parameters(model)[0]
    add_weighted_adapter(model, ["default", "b"], [0.5, 0.5], "mix", combination_type="svd")
    config = model.peft_config["mix"]
    assert (config.r, config.lora_alpha, config.target_modules) == (3, 3, ("c_attn", "c_fc"))
    assert model.active_adapters == ["default"]
    assert get_nb_trainable_parameters(model)[0] == trainable
    assert all(layer.adapters["mix"].scaling == 1.0 for _, layer in named_lora_layers(model))


@pytest.mark.parametrize(("args", "message"), [
    ((["default", "b"], [1.0], "mix", "cat"), "2 finite numbers"),
    ((["default", "b"], [1.0, float("nan")], "mix", "cat"), "finite numbers"),
    ((["default", "b"], [1.0, 1.0], "mix", "ties"), "not implemented"),
    ((["default", "b"], [1.0, 1.0], "mix", "linear"), "one rank"),
    ((["default", "nope"], [1.0, 1.0], "mix", "cat"), r"no adapter named \['nope'\]"),
    ((["default", "b"], [1.0, 1.0], "b", "cat"), "already has an adapter named 'b'"),
])
def test_a_bad_combination_is_an_error_that_changes_nothing(args, message):
    model = apply_lora(ToyGPT(), LoRAConfig(r=2, target_modules=["c_attn"]))
    add_adapter(model, "b", LoRAConfig(r=3, target_modules=["c_attn"]))
    before = snapshot(model)
    with pytest.raises(ConfigError, match=message):
        add_weighted_adapter(model, *args)
    assert_unchanged(model, before)
