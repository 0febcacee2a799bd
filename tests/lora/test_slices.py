"""The LoRA paper's adapter on q and v of GPT-2's fused c_attn: an adapter per chosen slice of a
fused output (``target_slices``, loralib's ``MergedLinear``). What defines it: the other slices'
outputs never change, merging adds ΔW into the chosen rows only, and its full form (what a PEFT
file holds) is a rank-k r adapter whose B is zero outside the slices."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minilora import GPT, ConfigError, TargetModuleError, Tensor
from minilora.lora import LoRAConfig, LoRALinear, apply_lora, lora_parameter_counts
from minilora.nn import Linear
from minilora.optim import AdamW
from tests.lora.helpers import (
    PROPERTY,
    ToyGPT,
    assert_unchanged,
    assert_within_rounding,
    snapshot,
    train_every_adapter,
)

PARTS = ("q", "k", "v")


@st.composite
def sliced_layers(draw):
    """(a LoRALinear on c slices of a (3c, in) projection, trained; the slices; x (2, 3, in))."""
    c, in_f, r = draw(st.integers(1, 4)), draw(st.integers(1, 5)), draw(st.integers(1, 3))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    chosen = draw(st.sets(st.sampled_from(PARTS), min_size=1, max_size=2))
    names = [p for p in PARTS if p in chosen]
    rows = tuple((PARTS.index(n) * c, (PARTS.index(n) + 1) * c) for n in names)
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    layer = LoRALinear(Linear(in_f, 3 * c, dtype=dtype, rng=rng), r, draw(st.integers(1, 8)),
                       rng=rng, slices=rows, slice_names=tuple(names))
    layer.lora_B.data = rng.normal(0.0, 1.0, layer.lora_B.shape).astype(dtype)
    return layer, rows, rng.normal(0.0, 1.0, (2, 3, in_f)).astype(dtype)


def untouched(rows, out_f):
    return [i for i in range(out_f) if not any(lo <= i < hi for lo, hi in rows)]


@PROPERTY
@given(case=sliced_layers(), steps=st.integers(1, 3))
def test_an_adapter_on_q_and_v_never_changes_k(case, steps):
    """Trained, stepped by AdamW, merged: the outputs of the slices not adapted are the base
    layer's, bit for bit, and so are W's rows for them."""
    layer, rows, x = case
    other = untouched(rows, layer.out_features)
    W = layer.weight.data.copy()
    optimizer = AdamW([layer.lora_A, layer.lora_B], lr=0.1, weight_decay=0.1)
    for _ in range(steps):
        y = layer(Tensor(x))
        np.testing.assert_array_equal(y.data[..., other], ops_linear(x, layer)[..., other])
        optimizer.zero_grad()
        (y * y).sum().backward()
        optimizer.step()
    layer.merge()
    np.testing.assert_array_equal(layer.weight.data[other], W[other])
    np.testing.assert_array_equal(layer(Tensor(x)).data[..., other],
                                  ops_linear(x, layer)[..., other])


def ops_linear(x, layer):
    from minilora import ops

    return ops.linear(Tensor(x), layer.weight, layer.bias).data


@PROPERTY
@given(case=sliced_layers())
def test_merging_adds_s_b_i_a_i_into_slice_i_only(case):
    layer, rows, _ = case
    W, A, B = (p.data.astype(np.float64) for p in (layer.weight, layer.lora_A, layer.lora_B))
    s, r, w = layer.scaling, layer.r, rows[0][1] - rows[0][0]
    expected, magnitude = W.copy(), np.abs(W)
    for i, (lo, hi) in enumerate(rows):
        b, a = B[i * w:(i + 1) * w], A[i * r:(i + 1) * r]
        expected[lo:hi] += s * b @ a
        magnitude[lo:hi] += s * np.abs(b) @ np.abs(a)
    layer.merge()
    assert_within_rounding(layer.weight.data, expected, magnitude, r, layer.weight.dtype)
    other = untouched(rows, layer.out_features)
    np.testing.assert_array_equal(layer.weight.data[other], W[other].astype(layer.weight.dtype))


@PROPERTY
@given(case=sliced_layers())
def test_the_full_form_is_rank_k_r_with_b_zero_outside_the_slices(case):
    """What a PEFT file holds: A as it is (k r, in) and B (out, k r) block-structured, B_i at
    rows lo_i:hi_i and columns i r:(i+1) r, zero rows for the slices not adapted."""
    layer, rows, _ = case
    adapter = layer.adapters["default"]
    A, B = (p.data.astype(np.float64) for p in (layer.lora_A, layer.lora_B))
    full_A, full_B = adapter.full_form(A, B, layer.out_features)
    k, r, w = len(rows), layer.r, rows[0][1] - rows[0][0]
    assert full_A.shape == (k * r, layer.in_features)
    assert full_B.shape == (layer.out_features, k * r)
    for i, (lo, hi) in enumerate(rows):
        block = np.zeros_like(full_B)
        block[lo:hi, i * r:(i + 1) * r] = B[i * w:(i + 1) * w]
        np.testing.assert_array_equal(full_B[:, i * r:(i + 1) * r], block[:, i * r:(i + 1) * r])
    assert not full_B[untouched(rows, layer.out_features)].any()
    np.testing.assert_allclose(layer.scaling * full_B @ full_A, layer.delta_weight(), rtol=1e-6,
                               atol=1e-6 * np.abs(layer.delta_weight()).max())


def test_an_adapter_on_q_and_v_counts_two_adapters_of_rank_r():
    model = apply_lora(ToyGPT(c=4, n_layer=1),
                       LoRAConfig(r=3, target_modules=["c_attn"],
                                  target_slices={"c_attn": ["v", "q"]}))
    layer = model.transformer.h[0].attn.c_attn
    assert layer.adapters["default"].names == ("q", "v")  # the output's order, whatever given
    assert layer.lora_A.shape == (6, 4) and layer.lora_B.shape == (8, 3)
    (count,) = lora_parameter_counts(model)
    assert count.lora_params == 2 * 3 * (4 + 4) == layer.lora_A.size + layer.lora_B.size


def test_gpt_lora_targets_are_the_papers_matrices():
    assert GPT.lora_targets("q,v") == {"target_modules": ("c_attn",),
                                       "target_slices": {"c_attn": ("q", "v")}}
    assert GPT.lora_targets("v, q, o") == {"target_modules": ("c_attn", "attn.c_proj"),
                                           "target_slices": {"c_attn": ("q", "v")}}
    assert GPT.lora_targets("all") == {
        "target_modules": ("c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"),
        "target_slices": {"c_attn": ("q", "k", "v")}}
    assert GPT.lora_targets("mlp")["target_slices"] is None
    with pytest.raises(ConfigError, match=r"lora_targets.*got 'q,w'"):
        GPT.lora_targets("q,w")


@pytest.mark.parametrize(("slices", "targets", "message"), [
    ({"c_attn": ["q", "x"]}, ["c_attn"], r"names \['q', 'x'\]; its output is \['q', 'k', 'v'\]"),
    ({"c_fc": ["q"]}, ["c_fc"], "declares no fused output"),
    ({"c_proj": ["q"]}, ["c_attn"], "target_slices key 'c_proj' matches none"),
    ({"wte": ["q"]}, ["wte"], "an Embedding"),
])
def test_slices_the_model_does_not_have_are_refused_and_change_nothing(slices, targets, message):
    model = ToyGPT()
    before = snapshot(model)
    with pytest.raises(TargetModuleError, match=message):
        apply_lora(model, LoRAConfig(target_modules=targets, target_slices=slices))
    assert_unchanged(model, before)


@pytest.mark.parametrize("value", [{}, {"c_attn": []}, {"c_attn": ["q", "q"]}, {"c_attn": "qv"},
                                   ["c_attn"], {"": ["q"]}])
def test_a_bad_target_slices_is_a_config_error_naming_it(value):
    with pytest.raises(ConfigError, match="target_slices"):
        LoRAConfig(target_slices=value)


def test_target_slices_round_trip_through_a_dict():
    config = LoRAConfig(target_modules=["c_attn"], target_slices={"c_attn": ["q", "v"]})
    assert LoRAConfig.from_dict(config.to_dict()) == config
    assert config.to_dict()["target_slices"] == {"c_attn": ["q", "v"]}


def test_a_trained_adapter_on_q_and_v_keeps_k_through_a_whole_model():
    model = train_every_adapter(apply_lora(ToyGPT(c=3), LoRAConfig(
        r=2, target_modules=["c_attn"], target_slices={"c_attn": ["q", "v"]})), 0)
    layer = model.transformer.h[1].attn.c_attn
    x = np.random.default_rng(1).standard_normal((2, 4, 3))
    np.testing.assert_array_equal(layer(Tensor(x)).data[..., 3:6], ops_linear(x, layer)[..., 3:6])
    assert np.abs(layer(Tensor(x)).data[..., :3] - ops_linear(x, layer)[..., :3]).max() > 1e-3
