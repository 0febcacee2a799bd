"""Several adapters on one model, by name, as PEFT keeps them: what defines each operation.

Merged equals unmerged for any set of active adapters (and any part of it merged), the active
adapters' paths add, unmerging restores W bit for bit, deleting an adapter leaves the others bit
for bit, the frozen weights never change whatever is active, merged or switched off, and the
trainable parameters, the freeze helper and the adapter's state dict follow the active adapter.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minilora import ConfigError, Tensor
from minilora.lora import (
    LoRAConfig,
    LoRALinear,
    active_adapters,
    add_adapter,
    apply_lora,
    delete_adapter,
    disable_adapter,
    get_nb_trainable_parameters,
    load_lora_state_dict,
    lora_parameter_counts,
    lora_state_dict,
    mark_only_lora_as_trainable,
    merge_adapter,
    merge_and_unload,
    named_lora_layers,
    set_adapter,
    unmerge_adapter,
)
from minilora.nn import Linear
from minilora.optim import AdamW
from tests.lora.helpers import (
    MODEL_TOL,
    PROPERTY,
    ToyGPT,
    assert_unchanged,
    frozen_arrays,
    snapshot,
    tokens,
    train_every_adapter,
)

NAMES = ("default", "other", "third")
TARGET_SETS = [
    {"target_modules": ["c_attn"]},
    {"target_modules": ["c_attn", "c_proj"]},
    {"target_modules": ["c_fc"]},
    {"target_modules": ["c_attn"], "target_slices": {"c_attn": ["q", "v"]}},
    {"target_modules": ["c_attn", "mlp.c_proj"], "target_slices": {"c_attn": ["k"]}},
]


@st.composite
def named_models(draw, dtype=np.float64, wte: bool = False):
    """(a ToyGPT holding 2 or 3 trained adapters by name, their names, a seed); with ``wte`` the
    last adapter also adapts the token embedding."""
    seed = draw(st.integers(0, 2**31 - 1))
    model = ToyGPT(c=draw(st.integers(2, 5)), n_layer=draw(st.integers(1, 2)), dtype=dtype,
                   seed=seed)
    names = NAMES[:draw(st.integers(2, 3))]
    for i, name in enumerate(names):
        targets = dict(draw(st.sampled_from(TARGET_SETS)))
        if wte and i == len(names) - 1:
            targets["target_modules"] = [*targets["target_modules"], "wte"]
        config = LoRAConfig(r=draw(st.integers(1, 3)), lora_alpha=draw(st.integers(1, 8)),
                            use_rslora=draw(st.booleans()), **targets)
        add_adapter(model, name, config, rng=seed + i)
    return train_every_adapter(model, seed), names, seed


def some_of(data, names, min_size=1) -> list[str]:
    chosen = data.draw(st.sets(st.sampled_from(names), min_size=min_size))
    return [n for n in names if n in chosen]


def logits(model, idx) -> np.ndarray:
    return model(idx).data.copy()


# ---- merged and unmerged ----------------------------------------------------------------------

@PROPERTY
@given(case=named_models(), data=st.data())
def test_merged_output_equals_unmerged_output_for_any_active_set(case, data):
    """Any set of active adapters, any part of it merged (in any order), then all of it: the
    same logits. An adapter merged into GPT-2's tied wte is the one exception
    (tests/lora/test_embedding.py)."""
    model, names, seed = case
    active = some_of(data, names)
    set_adapter(model, active)
    idx, _ = tokens(seed)
    unmerged = logits(model, idx)
    part = data.draw(st.permutations(active)).copy()[:data.draw(st.integers(1, len(active)))]
    merge_adapter(model, part)
    np.testing.assert_allclose(logits(model, idx), unmerged, **MODEL_TOL)
    merge_adapter(model)  # the rest of the active set
    np.testing.assert_allclose(logits(model, idx), unmerged, **MODEL_TOL)


@PROPERTY
@given(case=named_models(), data=st.data())
def test_the_paths_of_the_active_adapters_add(case, data):
    """Each layer computes x (W + Σ_active ΔW_i)^T + b: its adapters' paths, added."""
    model, names, seed = case
    active = some_of(data, names)
    set_adapter(model, active)
    x = np.random.default_rng(seed).standard_normal((2, 3, model.transformer.wte.embedding_dim))
    for _, layer in named_lora_layers(model):
        W = layer.weight.data + sum(layer.delta_weight(n) for n in active if n in layer.adapters)
        inputs = x if layer.in_features == x.shape[-1] else \
            np.random.default_rng(seed).standard_normal((2, 3, layer.in_features))
        np.testing.assert_allclose(layer(Tensor(inputs)).data,
                                   inputs @ W.T + layer.bias.data, **MODEL_TOL)


@PROPERTY
@given(case=named_models(dtype=np.float32), data=st.data())
def test_unmerging_in_reverse_restores_w_bit_for_bit(case, data):
    """Merge a set, then more, then unmerge: every weight is the array it was (float32 too)."""
    model, names, _ = case
    before = {n: p.data.copy() for n, p in model.named_parameters()}
    merge_adapter(model, some_of(data, names))
    merge_adapter(model, some_of(data, names))
    assert any(layer.merged for _, layer in named_lora_layers(model))
    unmerge_adapter(model)
    assert not any(layer.merged for _, layer in named_lora_layers(model))
    for name, p in model.named_parameters():
        np.testing.assert_array_equal(p.data, before[name], err_msg=name)
        assert p.data.dtype == before[name].dtype


# ---- deleting --------------------------------------------------------------------------------

@PROPERTY
@given(case=named_models(), data=st.data())
def test_deleting_an_adapter_leaves_the_others_bit_identical(case, data):
    model, names, seed = case
    gone = data.draw(st.sampled_from(names))
    kept = [n for n in names if n != gone]
    set_adapter(model, kept)
    idx, _ = tokens(seed)
    before_logits = logits(model, idx)
    before = {n: p.data.copy() for n, p in model.named_parameters()
              if not n.endswith(f".{gone}") and not (gone == "default" and _default_part(n))}
    delete_adapter(model, gone)
    after = {n: p.data for n, p in model.named_parameters()}
    assert set(after) == set(before)
    for name, value in before.items():
        np.testing.assert_array_equal(after[name], value, err_msg=name)
    np.testing.assert_array_equal(logits(model, idx), before_logits)
    assert gone not in model.peft_config and active_adapters(model) == kept
    assert all(gone not in layer.adapters for _, layer in named_lora_layers(model))


def _default_part(name: str) -> bool:
    return name.endswith((".lora_A", ".lora_B", ".lora_embedding_A", ".lora_embedding_B"))


def test_a_layer_left_without_adapters_is_a_plain_linear_again():
    model = apply_lora(ToyGPT(), LoRAConfig(target_modules=["c_fc"]))
    add_adapter(model, "other", LoRAConfig(target_modules=["c_attn"]))
    with pytest.warns(UserWarning, match="'other' is active now"):
        delete_adapter(model, "default")
    assert type(model.transformer.h[0].mlp.c_fc) is Linear
    assert isinstance(model.transformer.h[0].attn.c_attn, LoRALinear)
    delete_adapter(model, "other")
    assert not list(named_lora_layers(model)) and "peft_config" not in model.__dict__


def test_deleting_the_only_active_adapter_activates_the_first_remaining_by_name():
    model = apply_lora(ToyGPT(), LoRAConfig(target_modules=["c_fc"]))
    for name in ("zeta", "beta"):
        add_adapter(model, name, LoRAConfig(target_modules=["c_attn"]))
    with pytest.warns(UserWarning, match="'beta' is active now"):
        delete_adapter(model, "default")
    assert active_adapters(model) == ["beta"] and model.lora_config is model.peft_config["beta"]


def test_a_merged_adapter_cannot_be_deleted():
    model = apply_lora(ToyGPT(), LoRAConfig(target_modules=["c_fc"]))
    merge_adapter(model)
    before = snapshot(model)
    with pytest.raises(ConfigError, match="is merged"):
        delete_adapter(model, "default")
    assert_unchanged(model, before)


# ---- what trains -------------------------------------------------------------------------------

@PROPERTY
@given(case=named_models(), data=st.data(), steps=st.integers(1, 3))
def test_frozen_weights_never_change_in_every_mode(case, data, steps):
    """Train the active adapters with AdamW (weight decay on) while other adapters sit inactive,
    merge and unmerge, switch everything off: the frozen arrays stay bit for bit, grad None."""
    model, names, seed = case
    set_adapter(model, some_of(data, names))
    frozen = frozen_arrays(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = AdamW(params, lr=0.1, weight_decay=0.1)
    idx, targets = tokens(seed)
    for _ in range(steps):
        loss = ((model(idx) - Tensor(targets[..., None] * 0.1)) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    merge_adapter(model, some_of(data, names))
    unmerge_adapter(model)
    with disable_adapter(model):
        model(idx)
    for name, p in model.named_parameters():
        if name in frozen:
            np.testing.assert_array_equal(p.data, frozen[name], err_msg=name)
            assert p.grad is None, name


@PROPERTY
@given(case=named_models(), data=st.data())
def test_trainable_parameters_follow_the_active_adapters(case, data):
    """set_adapter makes exactly the active adapters trainable; the count and the per-layer
    accounting are theirs, and lora_state_dict holds their arrays, named by adapter."""
    model, names, _ = case
    active = some_of(data, names)
    set_adapter(model, active)
    expected = {id(p) for _, layer in named_lora_layers(model) for n in active
                if n in layer.adapters for p in layer.adapter_parameters(n)}
    assert {id(p) for p in model.parameters() if p.requires_grad} == expected
    counts = lora_parameter_counts(model)
    assert get_nb_trainable_parameters(model)[0] == sum(c.lora_params for c in counts)
    assert {c.adapter_name for c in counts} == set(active)
    state = lora_state_dict(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(state) == trainable
    for name in state:  # the default adapter unsuffixed, another one as lora_A.<adapter>
        suffix = name.rpartition(".lora_")[2]
        assert suffix in ("A", "B", "embedding_A", "embedding_B") or \
            suffix.partition(".")[2] in active


def test_the_freeze_helper_follows_the_active_adapter():
    model = apply_lora(ToyGPT(), LoRAConfig(target_modules=["c_fc"]))
    add_adapter(model, "other", LoRAConfig(target_modules=["c_attn"]))
    set_adapter(model, "other")
    model.requires_grad_(True)
    mark_only_lora_as_trainable(model)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == sorted(f"transformer.h.{i}.attn.c_attn.lora_{k}.other"
                               for i in range(2) for k in "AB")


def test_a_state_dict_round_trips_bit_for_bit_for_another_adapter():
    def build():
        model = apply_lora(ToyGPT(seed=3), LoRAConfig(target_modules=["c_fc"]), rng=0)
        add_adapter(model, "other", LoRAConfig(r=2, target_modules=["c_attn"],
                                               target_slices={"c_attn": ["q", "v"]}), rng=1)
        return model

    source = train_every_adapter(build(), 5)
    state = lora_state_dict(source, "other")
    assert sorted(state) == sorted(f"transformer.h.{i}.attn.c_attn.lora_{k}.other"
                                   for i in range(2) for k in "AB")
    target = build()
    load_lora_state_dict(target, state, "other")
    for name, value in lora_state_dict(target, ["default", "other"]).items():
        expected = lora_state_dict(source, ["default", "other"])[name]
        if name.endswith(".other"):
            np.testing.assert_array_equal(value, expected, err_msg=name)


# ---- adding --------------------------------------------------------------------------------------

def test_an_added_adapter_is_inactive_frozen_and_changes_nothing_until_set():
    model = train_every_adapter(apply_lora(ToyGPT(), LoRAConfig(target_modules=["c_attn"])), 1)
    idx, _ = tokens(0)
    before, trainable = logits(model, idx), get_nb_trainable_parameters(model)
    add_adapter(model, "other", LoRAConfig(r=2, target_modules=["c_attn", "c_fc"]), rng=1)
    train_every_adapter(model, 2)  # B of "other" non-zero too (and default's changed)
    set_adapter(model, "default")
    default_only = logits(model, idx)
    add_adapter(model, "third", LoRAConfig(target_modules=["c_proj"]))
    np.testing.assert_array_equal(logits(model, idx), default_only)  # bit for bit
    assert get_nb_trainable_parameters(model)[0] == trainable[0]
    assert active_adapters(model) == ["default"] and not np.array_equal(before, default_only)


def test_the_default_adapter_keeps_the_single_adapter_names():
    model = apply_lora(ToyGPT(), LoRAConfig(r=2, lora_alpha=6, target_modules=["c_attn"]))
    add_adapter(model, "other", LoRAConfig(r=3, target_modules=["c_attn"]))
    layer = model.transformer.h[0].attn.c_attn
    assert layer.lora_A is layer.adapter_parameters("default")[0] and layer.lora_A.shape == (2, 4)
    assert (layer.r, layer.scaling) == (2, 3.0)
    assert layer.adapters["other"].r == 3
    names = [n for n, _ in layer.named_parameters()]
    assert names == ["weight", "bias", "lora_A", "lora_B", "lora_A.other", "lora_B.other"]


def test_one_running_adapter_is_one_fused_op_and_several_add_their_paths():
    model = apply_lora(ToyGPT(), LoRAConfig(target_modules=["c_attn"]))
    add_adapter(model, "other", LoRAConfig(target_modules=["c_attn"]))
    layer = model.transformer.h[0].attn.c_attn
    x = Tensor(np.ones((1, 2, 4)), requires_grad=True)
    assert layer(x).grad_fn.backward.__module__ == "minilora.ops.backend.lora_linear"
    set_adapter(model, ["default", "other"])
    assert layer(x).grad_fn.backward.__module__ == "minilora.ops.elementwise"  # base + paths


@pytest.mark.parametrize(("call", "message"), [
    (lambda m: add_adapter(m, "default", LoRAConfig(target_modules=["c_fc"])),
     "already has an adapter named 'default'"),
    (lambda m: add_adapter(m, "x.y", LoRAConfig(target_modules=["c_fc"])), "letters, digits"),
    (lambda m: add_adapter(m, "b", LoRAConfig(target_modules=["c_fc"], bias="all")),
     "only the first adapter"),
    (lambda m: add_adapter(m, "b", LoRAConfig(target_modules=["nothing"])), "matches no module"),
    (lambda m: set_adapter(m, ["default", "nope"]), r"no adapter named \['nope'\]"),
    (lambda m: delete_adapter(m, "nope"), r"no adapter named \['nope'\]"),
    (lambda m: merge_adapter(m, ["nope"]), r"no adapter named \['nope'\]"),
])
def test_a_mistake_with_named_adapters_is_an_error_that_changes_nothing(call, message):
    model = apply_lora(ToyGPT(), LoRAConfig(target_modules=["c_attn"]))
    before = snapshot(model)
    with pytest.raises(Exception, match=message):
        call(model)
    assert_unchanged(model, before)


def test_merge_and_unload_merges_the_active_adapters_and_drops_the_others():
    model = apply_lora(ToyGPT(), LoRAConfig(target_modules=["c_attn"]), rng=0)
    add_adapter(model, "other", LoRAConfig(r=2, target_modules=["c_attn", "c_fc"]), rng=1)
    train_every_adapter(model, 3)
    set_adapter(model, "other")
    idx, _ = tokens(1)
    expected = logits(model, idx)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no tied weight here: no warning
        plain = merge_and_unload(model)
    assert not list(named_lora_layers(plain)) and "peft_config" not in plain.__dict__
    np.testing.assert_allclose(logits(plain, idx), expected, **MODEL_TOL)
