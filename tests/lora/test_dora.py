"""DoRA (``use_dora=True``), the properties that define it, over Hypothesis-drawn shapes, ranks,
alphas and seeds in float64 (merge and unmerge in float32 too): merged == unmerged, unmerge gives W
and m back bit for bit, B = 0 is the base model, m starts at ||W||_row, frozen weights never move,
the parameter count, several adapters on one layer, and ``minilora train --use-dora``.
docs/variants.md derives each."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minilora import ConfigError, TargetModuleError, Tensor, ops
from minilora.lora import (
    LoRAConfig,
    LoRALinear,
    add_adapter,
    add_weighted_adapter,
    apply_lora,
    get_nb_trainable_parameters,
    load_lora_state_dict,
    lora_parameter_counts,
    lora_state_dict,
    merge_adapter,
    merge_and_unload,
    named_lora_layers,
    set_adapter,
    unmerge_adapter,
)
from minilora.nn import Linear
from minilora.optim import AdamW
from tests.lora.helpers import MODEL_TOL, PROPERTY, ToyGPT, frozen_arrays, tokens

# A DoRA layer's output computed two ways (merged weight c (W + s B A), or c (x W^T + s x A^T B^T))
# in float64: the same few dozen products in another order, and one norm; 1e-11 relative is far
# above that round-off (~1e-15) and far below a dropped c or a norm taken of the wrong weight.
LAYER_TOL = dict(rtol=1e-11, atol=1e-12)


@st.composite
def dora_layers(draw, dtypes=(np.float64,), max_features: int = 10):
    """(a DoRA LoRALinear with B and m moved off their start, x: (2, 3, in), s)."""
    in_f, out_f, r = (draw(st.integers(1, n)) for n in (max_features, max_features, 6))
    dtype = draw(st.sampled_from(dtypes))
    alpha = draw(st.sampled_from([1, 4, 16.5]))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    base = Linear(in_f, out_f, draw(st.booleans()), dtype, rng)
    layer = LoRALinear(base, r, alpha, use_rslora=draw(st.booleans()), rng=rng, use_dora=True)
    trained(layer, rng)
    return layer, rng.standard_normal((2, 3, in_f)).astype(dtype), layer.scaling


def trained(layer, rng, names=None) -> None:
    """Stand in for training: each adapter's B random, its m (if DoRA) off ||W + s B A||."""
    for name in names or layer.adapters:
        params = layer.adapter_parameters(name)
        params[1].data = rng.normal(0, 0.5, params[1].shape).astype(params[1].dtype)
        if len(params) == 3:
            params[2].data = (params[2].data * rng.uniform(0.5, 1.5, params[2].shape)
                              ).astype(params[2].dtype)


def dora_oracle(W, b, A, B, m, s, x):
    """y = m / ||W + s B A||_row * (W + s B A) x + b, from the merged weight, in float64."""
    adapted = W + s * (B @ A)
    merged = (m / np.linalg.norm(adapted, axis=1))[:, None] * adapted
    return x @ merged.T + (0.0 if b is None else b)


# ---- the layer ----------------------------------------------------------------------------------

@PROPERTY
@given(case=dora_layers())
def test_the_layer_computes_m_over_the_row_norm_times_the_adapted_weight(case):
    layer, x, s = case
    b = None if layer.bias is None else layer.bias.data
    wanted = dora_oracle(layer.weight.data, b, layer.lora_A.data, layer.lora_B.data,
                         layer.lora_magnitude_vector.data, s, x)
    np.testing.assert_allclose(layer(Tensor(x)).data, wanted, **LAYER_TOL)


@PROPERTY
@given(case=dora_layers())
def test_dora_merged_output_equals_unmerged_output(case):
    layer, x, _ = case
    unmerged = layer(Tensor(x)).data
    layer.merge()
    np.testing.assert_allclose(layer(Tensor(x)).data, unmerged, **LAYER_TOL)


@PROPERTY
@given(case=dora_layers(dtypes=(np.float32, np.float64)))
def test_dora_unmerge_restores_w_and_m_bit_for_bit(case):
    layer, _, _ = case
    W, m = layer.weight.data.copy(), layer.lora_magnitude_vector.data.copy()
    layer.merge()
    assert not np.array_equal(layer.weight.data, W)
    layer.unmerge()
    np.testing.assert_array_equal(layer.weight.data, W)
    np.testing.assert_array_equal(layer.lora_magnitude_vector.data, m)
    assert layer.weight.dtype == W.dtype


@PROPERTY
@given(seed=st.integers(0, 2**31 - 1), r=st.integers(1, 5), dtype=st.sampled_from(
    [np.float32, np.float64]))
def test_at_init_m_is_the_row_norm_of_w_and_the_layer_is_the_base_layer(seed, r, dtype):
    """B = 0, so ||W + s B A|| = ||W||: m starts there, c = 1 exactly, the base output exactly."""
    rng = np.random.default_rng(seed)
    base = Linear(7, 5, True, dtype, rng)
    W, x = base.weight.data.copy(), rng.standard_normal((2, 3, 7)).astype(dtype)
    expected = base(Tensor(x)).data
    layer = LoRALinear(base, r, 8, rng=rng, use_dora=True)
    assert not layer.lora_B.data.any() and layer.lora_magnitude_vector.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(layer.lora_magnitude_vector.data, np.linalg.norm(W, axis=1))
    np.testing.assert_array_equal(layer(Tensor(x)).data, expected)


def test_with_b_zero_a_dora_model_is_the_base_model():
    model = ToyGPT(c=4, n_layer=2, dtype=np.float64, seed=3)
    idx, _ = tokens(3)
    expected = model(idx).data
    apply_lora(model, LoRAConfig(r=2, target_modules=["c_attn", "c_proj", "c_fc"],
                                 use_dora=True), rng=4)
    np.testing.assert_array_equal(model(idx).data, expected)


# ---- training: gradients, the frozen invariant, the count --------------------------------------

def dora_model(seed: int, targets=("c_attn", "c_proj", "c_fc"), r=2, dropout=0.0):
    model = ToyGPT(c=4, n_layer=2, dtype=np.float64, seed=seed)
    apply_lora(model, LoRAConfig(r=r, lora_alpha=4, target_modules=list(targets),
                                 use_dora=True, lora_dropout=dropout), rng=seed + 1)
    rng = np.random.default_rng(seed + 2)
    for _, layer in named_lora_layers(model):
        trained(layer, rng)
    return model


def loss_of(model, seed: int):
    idx, targets = tokens(seed)
    return ((model(idx) - Tensor(targets[..., None] * 0.1)) ** 2).mean()


@PROPERTY
@given(seed=st.integers(0, 2**20), steps=st.integers(1, 3), dropout=st.sampled_from([0.0, 0.2]))
def test_frozen_weights_never_change_while_dora_trains(seed, steps, dropout):
    """AdamW with weight decay: W and b bit for bit, grad None; A, B and m all move."""
    model = dora_model(seed, dropout=dropout)
    frozen = frozen_arrays(model)
    trainable = {n: p.data.copy() for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.endswith("lora_magnitude_vector") for n in trainable)
    optimizer = AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05,
                      weight_decay=0.1)
    for _ in range(steps):
        optimizer.zero_grad()
        loss_of(model, seed).backward()
        optimizer.step()
    merge_adapter(model)
    unmerge_adapter(model)
    for name, p in model.named_parameters():
        if name in frozen:
            np.testing.assert_array_equal(p.data, frozen[name], err_msg=name)
            assert p.grad is None, name
        else:
            assert not np.array_equal(p.data, trainable[name]), name


def test_the_magnitude_gets_the_closed_form_gradient():
    """dL/dm = sum_rows(G * (x W^T + s x A^T B^T)) / ||W + s B A||, the norm a constant."""
    rng = np.random.default_rng(0)
    layer = LoRALinear(Linear(6, 5, True, np.float64, rng), 2, 4, rng=rng, use_dora=True)
    trained(layer, rng)
    x, g = rng.standard_normal((3, 6)), rng.standard_normal((3, 5))
    layer(Tensor(x)).backward(g)
    W, A, B = layer.weight.data, layer.lora_A.data, layer.lora_B.data
    s = layer.scaling
    expected = (g * (x @ W.T + s * x @ A.T @ B.T)).sum(axis=0) / np.linalg.norm(
        W + s * B @ A, axis=1)
    np.testing.assert_allclose(layer.lora_magnitude_vector.grad, expected, rtol=1e-12)


@pytest.mark.parametrize("r", [1, 4])
def test_doras_trainable_count_is_r_in_plus_out_plus_out(r):
    model = dora_model(0, r=r)
    layers = dict(named_lora_layers(model))
    expected = sum(r * (lay.in_features + lay.out_features) + lay.out_features
                   for lay in layers.values())
    assert get_nb_trainable_parameters(model)[0] == expected
    assert sum(c.lora_params for c in lora_parameter_counts(model)) == expected
    assert all(c.magnitude for c in lora_parameter_counts(model))


def test_the_adapter_state_holds_the_magnitude_and_loads_back():
    model = dora_model(5)
    state = lora_state_dict(model)
    assert "transformer.h.0.attn.c_attn.lora_magnitude_vector" in state
    fresh = ToyGPT(c=4, n_layer=2, dtype=np.float64, seed=5)
    apply_lora(fresh, LoRAConfig(r=2, lora_alpha=4, target_modules=["c_attn", "c_proj", "c_fc"],
                                 use_dora=True), rng=0)
    load_lora_state_dict(fresh, state)
    idx, _ = tokens(5)
    np.testing.assert_array_equal(fresh(idx).data, model(idx).data)


# ---- several adapters on one layer ----------------------------------------------------------

def three_adapters(seed: int):
    """A ToyGPT with a DoRA default, a plain LoRA "plain" and a DoRA "other" on c_attn (and
    c_fc), all active and trained."""
    model = dora_model(seed, targets=("c_attn", "c_fc"))
    add_adapter(model, "plain", LoRAConfig(r=3, target_modules=["c_attn"]), rng=seed + 3)
    add_adapter(model, "other", LoRAConfig(r=2, lora_alpha=2, target_modules=["c_attn", "c_fc"],
                                           use_dora=True), rng=seed + 4)
    rng = np.random.default_rng(seed + 5)
    for _, layer in named_lora_layers(model):
        trained(layer, rng, [n for n in layer.adapters if n != "default"])
    set_adapter(model, ["default", "plain", "other"])
    return model


NAMES = ("default", "plain", "other")


@PROPERTY
@given(seed=st.integers(0, 2**20), data=st.data())
def test_several_adapters_merged_in_any_order_equal_their_paths_added(seed, data):
    """Each DoRA path is (c - 1) x W^T + c s x A^T B^T on W before any merge, so merging adds
    ΔW = c (W + s B A) - W whatever else is merged: merged == unmerged for any subset, in any
    order (PEFT 0.21 composes them in turn instead: docs/variants.md)."""
    model = three_adapters(seed)
    idx, _ = tokens(seed)
    unmerged = model(idx).data
    weights = {n: p.data.copy() for n, p in model.named_parameters()}
    order = data.draw(st.permutations(NAMES))
    for k in range(1, 4):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "already merged" from the second round on
            merge_adapter(model, list(order[:k]))
        np.testing.assert_allclose(model(idx).data, unmerged, **MODEL_TOL)
    unmerge_adapter(model)
    for name, p in model.named_parameters():
        np.testing.assert_array_equal(p.data, weights[name], err_msg=name)


def test_merging_two_dora_adapters_adds_their_deltas_against_the_unmerged_weight():
    model = three_adapters(1)
    layer = model.transformer.h[0].attn.c_attn
    W = layer.weight.data.copy()
    deltas = {n: layer.delta_weight(n) for n in NAMES}
    for n in ("default", "other"):
        A, B, m = (p.data for p in layer.adapter_parameters(n))
        s = layer.adapters[n].scaling
        adapted = W + s * B @ A
        np.testing.assert_allclose(
            deltas[n], (m / np.linalg.norm(adapted, axis=1))[:, None] * adapted - W, rtol=1e-13,
            atol=1e-14)
    merge_adapter(model, ["other", "plain"])
    assert all(np.array_equal(layer.delta_weight(n), deltas[n]) for n in NAMES)
    merge_adapter(model, ["default"])
    np.testing.assert_allclose(layer.weight.data, W + sum(deltas.values()), rtol=1e-13,
                               atol=1e-14)


def test_merge_and_unload_of_several_adapters_is_the_unmerged_model():
    model = three_adapters(2)
    idx, _ = tokens(2)
    unmerged = model(idx).data
    merge_and_unload(model)
    assert not list(named_lora_layers(model))
    np.testing.assert_allclose(model(idx).data, unmerged, **MODEL_TOL)


# ---- what DoRA does not do ------------------------------------------------------------------

def test_dora_refuses_embeddings_slices_and_weighted_combinations():
    model = ToyGPT(c=4, n_layer=1, dtype=np.float64, seed=0)
    with pytest.raises(TargetModuleError, match="DoRA on an Embedding"):
        apply_lora(model, LoRAConfig(target_modules=["wte"], use_dora=True))
    with pytest.raises(ConfigError, match="use_dora"):
        LoRAConfig(use_dora=True, target_slices={"c_attn": ["q", "v"]})
    dora_model_ = dora_model(0)
    add_adapter(dora_model_, "b", LoRAConfig(r=2, target_modules=["c_attn"], use_dora=True))
    with pytest.raises(ConfigError, match="DoRA adapters"):
        add_weighted_adapter(dora_model_, ["default", "b"], [1.0, 1.0], "mix", "cat")


def test_the_layer_names_its_dora_adapter():
    layer = LoRALinear(Linear(3, 2), 1, 2, use_dora=True)
    assert "use_dora=True" in repr(layer)
    assert [n for n, _ in layer.named_parameters()] == \
        ["weight", "bias", "lora_A", "lora_B", "lora_magnitude_vector"]


# ---- the op on its own, checked once more at the layer: dropout as PEFT applies it ----------

def test_with_dropout_the_base_sees_x_and_the_correction_sees_the_dropped_x():
    """PEFT's form: y = x W^T + b + (c - 1) d(x) W^T + c s d(x) A^T B^T."""
    rng = np.random.default_rng(0)
    layer = LoRALinear(Linear(6, 4, True, np.float64, rng), 2, 4, lora_dropout=0.5, rng=rng,
                       use_dora=True)
    trained(layer, rng)
    x = rng.standard_normal((3, 6))
    state = layer.rng.bit_generator.state
    y = layer(Tensor(x)).data
    layer.rng.bit_generator.state = state
    mask = ops.dropout_mask(x.shape, 0.5, layer.rng, x.dtype)
    W, b, A, B, m = (layer.weight.data, layer.bias.data, layer.lora_A.data, layer.lora_B.data,
                     layer.lora_magnitude_vector.data)
    c = m / np.linalg.norm(W + layer.scaling * B @ A, axis=1)
    xd = x * mask
    wanted = x @ W.T + b + (c - 1) * (xd @ W.T) + c * layer.scaling * (xd @ A.T @ B.T)
    np.testing.assert_allclose(y, wanted, **LAYER_TOL)


def test_the_conformance_check_refuses_a_dora_adapter(tmp_path):
    """Its merge is c (W + s B A), not the W + s B A the check holds a merge to: refused, named."""
    from minilora import hf
    from minilora.check import check_merge
    from tests.hf.helpers import adapted, random_gpt

    hf.save_pretrained(random_gpt(), tmp_path / "base")
    model = adapted(random_gpt(), LoRAConfig(r=2, target_modules=["c_attn"], use_dora=True))
    hf.save_adapter(model, tmp_path / "adapter")
    merge_and_unload(model)
    hf.save_pretrained(model, tmp_path / "merged")
    with pytest.raises(ConfigError, match="a DoRA adapter"):
        check_merge(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged")


@pytest.mark.parametrize("damage, shown", [
    (lambda m: m[:-1], "has shape (47,), expected (48,)"),
    (lambda m: np.where(np.arange(m.size) == 3, np.nan, m), "contains NaN or infinity"),
    (None, "missing tensor"),
])
def test_a_damaged_magnitude_in_a_peft_file_is_refused_naming_it(tmp_path, damage, shown):
    """The magnitude is checked as A and B are: its shape (out,) before anything is allocated,
    NaN and infinity, presence; the model is left as it was."""
    import safetensors.numpy

    from minilora import FileFormatError, hf
    from tests.hf.helpers import adapted, random_gpt

    hf.save_adapter(adapted(random_gpt("float64"), LoRAConfig(r=2, target_modules=["c_attn"],
                                                              use_dora=True)), tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = safetensors.numpy.load(path.read_bytes())
    key = "base_model.model.transformer.h.0.attn.c_attn.lora_magnitude_vector"
    if damage is None:
        del tensors[key]
    else:
        tensors[key] = damage(tensors[key])
    path.write_bytes(safetensors.numpy.save(tensors))
    model = random_gpt("float64")
    with pytest.raises(FileFormatError, match=shown.replace("(", r"\(").replace(")", r"\)")):
        hf.load_adapter(model, tmp_path)
    assert not list(named_lora_layers(model))
