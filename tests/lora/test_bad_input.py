"""Every bad input to the LoRA API is a MiniLoRAError subclass, raised before anything changes,
with a message that names the module or field and the values."""

from __future__ import annotations

import numpy as np
import pytest

from minilora import (
    ConfigError,
    MiniLoRAError,
    ShapeError,
    StateDictError,
    TargetModuleError,
)
from minilora.lora import (
    LoRAConfig,
    LoRALayerCount,
    LoRALinear,
    apply_lora,
    disable_adapter,
    load_lora_state_dict,
    lora_state_dict,
    mark_only_lora_as_trainable,
    merge_adapter,
    merge_and_unload,
    named_lora_layers,
    unload,
)
from minilora.nn import LayerNorm, Linear
from tests.lora.helpers import ToyGPT, assert_unchanged, snapshot

# ---- the config ------------------------------------------------------------------------------

BAD_FIELDS = [  # (field, value, what the message shows: the value's repr unless said)
    ("r", 0), ("r", -2), ("r", 2.5), ("r", 8.0), ("r", True), ("r", "8"), ("r", None),
    ("lora_alpha", 0), ("lora_alpha", -1.5), ("lora_alpha", float("nan")),
    ("lora_alpha", float("inf")), ("lora_alpha", True), ("lora_alpha", "16"),
    ("lora_dropout", -0.1), ("lora_dropout", 1.0), ("lora_dropout", 1.5),
    ("lora_dropout", float("nan")), ("lora_dropout", "0.1"),
    ("bias", "some"), ("bias", None),
    ("init_lora_weights", "xavier"), ("init_lora_weights", False), ("init_lora_weights", 1),
    ("init_lora_weights", "pissa_niter_4"), ("task_type", "SEQ_CLS"), ("task_type", True),
    ("fan_in_fan_out", "yes"), ("ensure_weight_tying", 1),
    ("use_rslora", "yes"), ("use_rslora", 1),
    ("target_modules", []), ("target_modules", ""), ("target_modules", [""]),
    ("target_modules", None),
    ("target_modules", 5), ("target_modules", ["c_attn", 3]), ("target_modules", "c_attn("),
    ("modules_to_save", "ln_f"), ("modules_to_save", []),
    ("rank_pattern", {"c_attn": 0}, "rank_pattern['c_attn'] must be a positive integer, got 0"),
    ("rank_pattern", {"c_attn": 2.0}, "got 2.0"), ("rank_pattern", ["c_attn"]),
    ("rank_pattern", {"(": 4}, "key '(' is not a valid regular expression"),
    ("rank_pattern", {3: 4}, "keys must be non-empty strings, got 3"),
    ("alpha_pattern", {"": 4}, "keys must be non-empty strings, got ''"),
    ("alpha_pattern", {"c_attn": -1}, "alpha_pattern['c_attn'] must be a finite number > 0"),
    ("init_lora_weights", False, "got False (PEFT's False, a random B, is not implemented)"),
    ("target_slices", {}, "must be a non-empty mapping of module name -> slice names"),
    ("target_slices", {"": ["q"]}, "keys must be non-empty module names, got ''"),
    ("target_slices", {"c_attn": 5}, "target_slices['c_attn'] must be a non-empty list of "
                                     "distinct slice names, got 5"),
    ("target_slices", {"c_attn": "qv"}, "got 'qv'"), ("target_slices", {"c_attn": [1]}, "got [1]"),
    ("target_slices", {"c_attn": ["q", ""]}, "got ['q', '']"),
    ("target_slices", {"c_attn": ["q", "q"]}, "got ['q', 'q']"),
]


@pytest.mark.parametrize("case", BAD_FIELDS, ids=lambda c: f"{c[0]}={c[1]!r}")
def test_a_bad_config_field_is_a_config_error_naming_field_and_value(case):
    field, value, shown = (*case, repr(case[1]))[:3]
    with pytest.raises(ConfigError) as e:
        LoRAConfig(**{field: value})
    assert f"LoRAConfig.{field}" in str(e.value) and shown in str(e.value)


def test_only_pefts_false_is_told_that_a_random_b_is_not_implemented():
    with pytest.raises(ConfigError) as e:
        LoRAConfig(init_lora_weights="xavier")
    assert "not implemented" not in str(e.value)


@pytest.mark.parametrize("hostile", [
    ["r", 8], "r=8", None, {"r": 4, "evil": "__import__('os')"}, {"r": {"nested": 1}},
    {"target_modules": {"c_attn": 1}}, {"lora_alpha": None}, {"bias": ["none"]},
])
def test_a_hostile_dict_is_a_config_error(hostile):
    with pytest.raises(ConfigError):
        LoRAConfig.from_dict(hostile)


def test_unknown_fields_are_named():
    with pytest.raises(ConfigError, match=r"unknown fields \['lora_rank'\]"):
        LoRAConfig.from_dict({"lora_rank": 8})


# ---- the layer -------------------------------------------------------------------------------

def test_lora_linear_needs_a_linear():
    with pytest.raises(TargetModuleError, match="base must be a Linear, got LayerNorm"):
        LoRALinear(LayerNorm(4), r=2, lora_alpha=2)


def test_lora_linear_refuses_an_adapted_layer():
    layer = LoRALinear(Linear(3, 2, rng=0), r=1, lora_alpha=1)
    with pytest.raises(TargetModuleError, match=r"already adapted \(default: r=1\)"):
        LoRALinear(layer, r=2, lora_alpha=2)


@pytest.mark.parametrize(("kwargs", "named"), [
    ({"r": 0}, "r must be a positive integer, got 0"),
    ({"lora_alpha": -1}, "lora_alpha must be a finite number > 0, got -1"),
    ({"lora_dropout": 1.0}, "lora_dropout must be a number in [0, 1), got 1.0"),
    ({"init_lora_weights": "zeros"}, "got 'zeros'"),
])
def test_lora_linear_names_a_bad_argument_and_leaves_the_base_untouched(kwargs, named):
    base = Linear(3, 2, rng=0)
    args = {"r": 2, "lora_alpha": 2, **kwargs}
    with pytest.raises(ConfigError) as e:
        LoRALinear(base, **args)
    assert named in str(e.value) and "LoRALinear" in str(e.value)
    assert base.weight.requires_grad and base.bias.requires_grad


def test_merging_a_disabled_layer_or_disabling_a_merged_one_is_an_error():
    layer = LoRALinear(Linear(3, 2, rng=0), r=1, lora_alpha=1)
    layer.enable_adapters(False)
    with pytest.raises(ConfigError, match="disabled"):
        layer.merge()
    assert not layer.merged
    layer.enable_adapters(True)
    layer.merge()
    with pytest.raises(ConfigError, match="merged"):
        layer.enable_adapters(False)
    assert not layer.disable_adapters


# ---- apply_lora: checked before the model changes ------------------------------------------------

def apply_fails(model, config, error=TargetModuleError) -> str:
    before = snapshot(model)
    with pytest.raises(error) as e:
        apply_lora(model, config)
    assert_unchanged(model, before)
    return str(e.value)


def test_a_target_matching_nothing_lists_the_linear_modules():
    msg = apply_fails(ToyGPT(), LoRAConfig(target_modules=["c_attn", "q_proj"]))
    assert "'q_proj' matches no module" in msg
    for name in ("c_attn", "c_fc", "c_proj", "lm_head", "transformer.h.1.mlp.c_proj"):
        assert name in msg


def test_a_regex_matching_nothing_is_an_error():
    msg = apply_fails(ToyGPT(), LoRAConfig(target_modules=r".*\.q_proj"))
    assert r"'.*\\.q_proj' matches no module" in msg


@pytest.mark.parametrize(("target", "kind", "name"), [
    ("ln_1", "LayerNorm", "transformer.h.0.ln_1"),
    ("attn", "Attn", "transformer.h.0.attn"),
])
def test_a_target_that_is_not_a_linear_is_named_with_its_type(target, kind, name):
    msg = apply_fails(ToyGPT(), LoRAConfig(target_modules=["c_fc", target]))
    assert f"{name!r} (matched by {target!r}) is a {kind}, not a Linear or an Embedding" in msg


def test_adapting_an_adapted_layer_is_an_error():
    model = apply_lora(ToyGPT(), LoRAConfig(target_modules=["c_fc"]))
    msg = apply_fails(model, LoRAConfig(r=2, target_modules=["c_fc"]))
    assert ("'transformer.h.0.mlp.c_fc' (matched by 'c_fc') is already a LoRALinear "
            "(default: r=8)") in msg


def test_a_second_adapter_on_other_layers_is_an_error():
    model = apply_lora(ToyGPT(), LoRAConfig(target_modules=["c_fc"]))
    msg = apply_fails(model, LoRAConfig(target_modules=["c_attn"]))
    assert "already has LoRA layers" in msg and "transformer.h.0.mlp.c_fc" in msg


def test_a_tied_weight_is_not_adapted():
    msg = apply_fails(ToyGPT(), LoRAConfig(target_modules=["lm_head"]))
    assert "'lm_head' is shared with ['transformer.wte']" in msg


def test_a_pattern_matching_no_adapted_module_is_an_error():
    msg = apply_fails(ToyGPT(), LoRAConfig(target_modules=["c_fc"], rank_pattern={"c_attn": 2}))
    assert "rank_pattern key 'c_attn' matches none of the adapted modules" in msg
    msg = apply_fails(ToyGPT(), LoRAConfig(target_modules=["c_fc"], alpha_pattern={"h.7.*": 2}))
    assert "alpha_pattern key 'h.7.*'" in msg
    # a key naming a parent module, or a prefix of a name, names no adapted module either
    msg = apply_fails(ToyGPT(), LoRAConfig(target_modules=["c_fc"], rank_pattern={"h.0": 2}))
    assert "rank_pattern key 'h.0' matches none of the adapted modules" in msg
    msg = apply_fails(ToyGPT(), LoRAConfig(target_modules=["c_fc"], rank_pattern={r"h\.0\.ml": 2}))
    assert "rank_pattern key 'h\\\\.0\\\\.ml' matches none" in msg


def test_modules_to_save_must_exist_and_not_be_adapted():
    msg = apply_fails(ToyGPT(), LoRAConfig(target_modules=["c_fc"], modules_to_save=["ln_3"]))
    assert "modules_to_save entry 'ln_3' matches no module" in msg and "ln_f" in msg
    msg = apply_fails(ToyGPT(), LoRAConfig(target_modules=["c_fc"], modules_to_save=["mlp"]))
    assert "'transformer.h.0.mlp' is both in modules_to_save and adapted" in msg


def test_apply_lora_needs_a_lora_config():
    apply_fails(ToyGPT(), {"r": 8}, error=ConfigError)


# ---- loading an adapter: strict, and all-or-nothing ---------------------------------------------

def adapter(r=2, c=4, seed=0):
    model = apply_lora(ToyGPT(c=c), LoRAConfig(r=r, target_modules=["c_attn"]), rng=seed)
    return lora_state_dict(model)


def load_fails(state, error, r=2, c=4) -> str:
    model = apply_lora(ToyGPT(c=c), LoRAConfig(r=r, target_modules=["c_attn"]), rng=7)
    before = snapshot(model)
    with pytest.raises(error) as e:
        load_lora_state_dict(model, state)
    assert_unchanged(model, before)
    return str(e.value)


def test_an_adapter_of_another_rank_is_refused_naming_module_and_ranks():
    msg = load_fails(adapter(r=8), ShapeError, r=4)
    assert "'transformer.h.0.attn.c_attn.lora_A' has shape (8, 4)" in msg
    assert "expects (4, 4)" in msg and "an adapter of rank 8, not 4" in msg


def test_a_b_of_another_rank_is_named_as_such():
    state = adapter(r=4)
    state["transformer.h.0.attn.c_attn.lora_B"] = np.zeros((12, 2))  # B: (out, r) of rank 2
    msg = load_fails(state, ShapeError, r=4)
    assert "'transformer.h.0.attn.c_attn.lora_B' has shape (12, 2)" in msg
    assert "expects (12, 4) (layer r=4, in=4, out=12): an adapter of rank 2, not 4" in msg


def test_a_missing_name_alone_is_refused():
    state = adapter()
    del state["transformer.h.1.attn.c_attn.lora_B"]
    msg = load_fails(state, StateDictError)
    assert "missing keys ['transformer.h.1.attn.c_attn.lora_B']; unexpected keys []" in msg


def test_an_adapter_for_other_shapes_is_refused():
    msg = load_fails(adapter(c=5), ShapeError, c=4)
    assert "'transformer.h.0.attn.c_attn.lora_A' has shape (2, 5)" in msg and "in=4, out=12" in msg


def test_missing_and_unexpected_names_are_listed():
    state = adapter()
    del state["transformer.h.1.attn.c_attn.lora_B"]
    state["transformer.h.1.attn.c_proj.lora_A"] = np.zeros((2, 4))
    msg = load_fails(state, StateDictError)
    assert "missing keys ['transformer.h.1.attn.c_attn.lora_B']" in msg
    assert "unexpected keys ['transformer.h.1.attn.c_proj.lora_A']" in msg


def test_a_bad_last_entry_leaves_the_earlier_ones_unloaded():
    state = {k: v + 1 for k, v in adapter(seed=1).items()}  # all valid and different ...
    last = list(state)[-1]
    state[last] = np.full_like(state[last], np.nan)  # ... but the last one
    assert last in load_fails(state, StateDictError)


def test_a_non_numeric_array_is_refused():
    state = adapter()
    name = "transformer.h.0.attn.c_attn.lora_B"
    state[name] = np.full(state[name].shape, "x")
    assert "non-numeric dtype" in load_fails(state, StateDictError)


def test_loading_into_a_merged_model_is_an_error():
    model = apply_lora(ToyGPT(), LoRAConfig(r=2, target_modules=["c_attn"]))
    merge_adapter(model)
    before = snapshot(model)
    with pytest.raises(ConfigError, match="merged"):
        load_lora_state_dict(model, lora_state_dict(model))
    assert_unchanged(model, before)


# ---- model-level state errors ------------------------------------------------------------------

@pytest.mark.parametrize("merge", [merge_and_unload, merge_adapter])
def test_merging_with_a_disabled_adapter_changes_nothing(merge):
    model = apply_lora(ToyGPT(), LoRAConfig(target_modules=["c_attn", "c_fc"]))
    dict(named_lora_layers(model))["transformer.h.1.mlp.c_fc"].enable_adapters(False)
    before = snapshot(model)
    with pytest.raises(ConfigError, match=r"\['transformer.h.1.mlp.c_fc'\] are disabled"):
        merge(model)
    assert_unchanged(model, before)


def test_disable_adapter_on_a_merged_model_is_an_error():
    model = apply_lora(ToyGPT(), LoRAConfig(target_modules=["c_attn"]))
    merge_adapter(model)
    before = snapshot(model)
    with pytest.raises(ConfigError, match="merged"), disable_adapter(model):
        pass
    assert_unchanged(model, before)
    assert not any(layer.disable_adapters for _, layer in named_lora_layers(model))


@pytest.mark.parametrize("operation", [
    merge_and_unload, unload, lora_state_dict, mark_only_lora_as_trainable, merge_adapter,
    lambda m: disable_adapter(m).__enter__(), lambda m: load_lora_state_dict(m, {}),
])
def test_lora_operations_on_a_model_without_lora_layers_say_so(operation):
    model = ToyGPT()
    before = snapshot(model)
    with pytest.raises(TargetModuleError, match="the model has no LoRA layers"):
        operation(model)
    assert_unchanged(model, before)


@pytest.mark.parametrize("name, operation", [
    ("lora_state_dict", lora_state_dict),
    ("load_lora_state_dict", lambda m: load_lora_state_dict(m, {})),
])
def test_a_model_without_lora_layers_is_named_by_the_function_refusing_it(name, operation):
    with pytest.raises(TargetModuleError, match=f"^{name}: the model has no LoRA layers"):
        operation(ToyGPT())


def test_saving_an_adapter_the_model_does_not_hold_names_it_and_the_held_ones():
    model = apply_lora(ToyGPT(), LoRAConfig(target_modules=["c_attn"]))
    with pytest.raises(ConfigError, match=r"^lora_state_dict: no adapter named \['nope'\] "
                                          r"\(the model's adapters: \['default'\]\)$"):
        lora_state_dict(model, "nope")


def test_loading_refuses_a_merged_model_and_a_state_that_is_not_a_mapping_saying_why():
    model = apply_lora(ToyGPT(), LoRAConfig(target_modules=["c_attn"]))
    state = lora_state_dict(model)
    with pytest.raises(StateDictError, match=r"^load_lora_state_dict: expected a mapping name -> "
                                             r"array, got list$"):
        load_lora_state_dict(model, list(state))
    merge_adapter(model)
    with pytest.raises(ConfigError, match=r"are merged; unmerge_adapter\(model\) first$"):
        load_lora_state_dict(model, state)


def test_an_unknown_bias_mode_is_named():
    model = apply_lora(ToyGPT(), LoRAConfig(target_modules=["c_attn"]))
    with pytest.raises(ConfigError, match=r"bias must be one of .*got 'some'"):
        mark_only_lora_as_trainable(model, bias="some")


def test_parameter_accounting_needs_positive_integers():
    with pytest.raises(ConfigError, match="r must be a positive integer, got 0"):
        LoRALayerCount("W", 4096, 4096, 0)
    with pytest.raises(ConfigError, match=r"^LoRALayerCount\.in_features must be a positive "):
        LoRALayerCount("W", 0, 4096, 4)
    with pytest.raises(ConfigError, match=r"^LoRALayerCount\.slice_rows must be a positive "
                                          r"integer, got 0$"):
        LoRALayerCount("W", 8, 8, 2, slice_rows=(4, 0))


def test_every_error_here_is_a_minilora_error():
    for error in (ConfigError, ShapeError, StateDictError, TargetModuleError):
        assert issubclass(error, MiniLoRAError)
