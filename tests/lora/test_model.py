"""LoRA on a whole model: which layers a config adapts, what trains, merging, unloading, and the
base-plus-adapter round trip a LoRA run's checkpoint makes."""

from __future__ import annotations

import copy
import json
import warnings

import numpy as np
import pytest

from minilora import StateDictError, TargetModuleError, Tensor
from minilora.lora import (
    LoRAConfig,
    LoRALinear,
    apply_lora,
    disable_adapter,
    load_lora_state_dict,
    lora_state_dict,
    merge_adapter,
    merge_and_unload,
    named_lora_layers,
    unload,
    unmerge_adapter,
)
from minilora.models import GPT, GPTConfig
from minilora.nn import Linear
from tests.lora.helpers import ToyGPT, tokens


def adapted_names(model) -> list[str]:
    return [name for name, _ in named_lora_layers(model)]


def trained(model, seed=0):
    rng = np.random.default_rng(seed)
    for _, layer in named_lora_layers(model):
        layer.lora_B.data = rng.normal(0, 0.5, layer.lora_B.shape).astype(layer.lora_B.dtype)
    return model


# ---- which layers ------------------------------------------------------------------------------

@pytest.mark.parametrize(("targets", "expected"), [
    (["c_proj"], ["h.0.attn.c_proj", "h.0.mlp.c_proj", "h.1.attn.c_proj", "h.1.mlp.c_proj"]),
    (["attn.c_proj"], ["h.0.attn.c_proj", "h.1.attn.c_proj"]),
    (["mlp.c_proj", "c_attn"], ["h.0.attn.c_attn", "h.0.mlp.c_proj", "h.1.attn.c_attn",
                                "h.1.mlp.c_proj"]),
    (["transformer.h.1.mlp.c_fc"], ["h.1.mlp.c_fc"]),
    (r".*\.h\.0\.attn\.(c_attn|c_proj)", ["h.0.attn.c_attn", "h.0.attn.c_proj"]),  # str: regex
])
def test_targets_follow_peft_name_rule(targets, expected):
    model = apply_lora(ToyGPT(), LoRAConfig(target_modules=targets))
    assert adapted_names(model) == ["transformer." + n for n in expected]


def test_an_unmatched_target_is_an_error_where_peft_drops_it():
    """Against PEFT itself, on Hugging Face's GPT-2: ``c_proj`` names attn.c_proj and mlp.c_proj
    in both; an entry matching nothing is dropped by PEFT, without a warning, when another entry
    matches, and is an error in minilora; when no entry matches, both raise."""
    for name in ("torch", "transformers", "peft"):
        pytest.importorskip(name, reason=f'{name}: pip install -e ".[parity]"')
    import peft
    import transformers

    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=11, n_positions=8, n_embd=8, n_layer=2, n_head=2, bos_token_id=0,
        eos_token_id=0))

    def peft_adapted(targets: list[str]) -> list[str]:
        config = peft.LoraConfig(r=2, target_modules=targets, fan_in_fan_out=True)  # Conv1D
        model = peft.get_peft_model(copy.deepcopy(hf), config)
        return sorted(n.removeprefix("base_model.model.") for n, m in model.named_modules()
                      if isinstance(m, peft.tuners.lora.LoraLayer))

    def ours(targets: list[str]) -> list[str]:
        gpt = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=8), seed=0)
        return sorted(adapted_names(apply_lora(gpt, LoRAConfig(target_modules=targets))))

    assert ours(["c_attn", "c_proj"]) == peft_adapted(["c_attn", "c_proj"])
    assert len(peft_adapted(["c_proj"])) == 4  # attn.c_proj and mlp.c_proj in each block
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert peft_adapted(["c_attn", "c_prjo"]) == peft_adapted(["c_attn"])
    assert not [w for w in caught if "c_prjo" in str(w.message)]
    with pytest.raises(TargetModuleError, match="entry 'c_prjo' matches no module"):
        ours(["c_attn", "c_prjo"])
    with pytest.raises(ValueError, match=r"Target modules .*c_prjo.* not found in the base model"):
        peft_adapted(["c_prjo"])
    with pytest.raises(TargetModuleError, match="entry 'c_prjo' matches no module"):
        ours(["c_prjo"])


def test_adapting_keeps_every_base_name_and_its_order():
    base_names = list(ToyGPT().state_dict())
    model = apply_lora(ToyGPT(), LoRAConfig(target_modules=["c_attn", "c_fc"]))
    names = list(model.state_dict())
    assert [n for n in names if "lora_" not in n] == base_names
    i = names.index("transformer.h.0.attn.c_attn.bias")
    assert names[i + 1: i + 3] == ["transformer.h.0.attn.c_attn.lora_A",
                                   "transformer.h.0.attn.c_attn.lora_B"]
    # so a base checkpoint loads into the adapted model as it is
    result = model.load_state_dict(ToyGPT(seed=5).state_dict(), strict=False)
    assert result.unexpected_keys == [] and all("lora_" in k for k in result.missing_keys)


def test_rank_and_alpha_patterns_override_per_layer():
    config = LoRAConfig(r=2, lora_alpha=4, target_modules=["c_attn", "c_fc"],
                        rank_pattern={"h.1.attn.c_attn": 8}, alpha_pattern={r"h\.\d\.mlp\.c_fc": 1})
    layers = dict(named_lora_layers(apply_lora(ToyGPT(), config)))
    got = {n.removeprefix("transformer."): (lay.r, lay.scaling) for n, lay in layers.items()}
    assert got == {"h.0.attn.c_attn": (2, 2.0), "h.0.mlp.c_fc": (2, 0.5),
                   "h.1.attn.c_attn": (8, 0.5), "h.1.mlp.c_fc": (2, 0.5)}


def test_every_config_field_reaches_the_layers():
    config = LoRAConfig(r=3, lora_alpha=12, lora_dropout=0.2, target_modules=["c_fc"],
                        use_rslora=True, init_lora_weights="gaussian")
    for _, layer in named_lora_layers(apply_lora(ToyGPT(), config)):
        assert (layer.r, layer.lora_alpha, layer.lora_dropout) == (3, 12, 0.2)
        assert layer.use_rslora and layer.scaling == 12 / 3**0.5
        assert layer.init_lora_weights == "gaussian"


def test_an_adapted_model_changes_dtype_as_a_whole():
    model = apply_lora(ToyGPT(dtype=np.float32), LoRAConfig(target_modules=["c_fc"]))
    model.astype(np.float64)
    assert all(p.dtype == np.float64 for p in model.parameters())
    assert model(tokens(0)[0]).dtype == np.float64


def test_same_seed_gives_same_adapters_whatever_the_target_order():
    a = apply_lora(ToyGPT(), LoRAConfig(target_modules=["c_attn", "c_fc"]), rng=3)
    b = apply_lora(ToyGPT(), LoRAConfig(target_modules=["c_fc", "c_attn"]), rng=3)
    for (name, value), other in zip(lora_state_dict(a).items(), lora_state_dict(b).values(),
                                    strict=True):
        np.testing.assert_array_equal(value, other, err_msg=name)


# ---- what trains -------------------------------------------------------------------------------

def trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_bias_none_trains_only_lora_a_and_b():
    model = apply_lora(ToyGPT(n_layer=1), LoRAConfig(target_modules=["c_fc"]))
    assert trainable(model) == {"transformer.h.0.mlp.c_fc.lora_A",
                                "transformer.h.0.mlp.c_fc.lora_B"}


def test_bias_lora_only_also_trains_the_adapted_layers_biases():
    model = apply_lora(ToyGPT(n_layer=1), LoRAConfig(target_modules=["c_fc"], bias="lora_only"))
    layer = "transformer.h.0.mlp.c_fc."
    assert trainable(model) == {layer + p for p in ("lora_A", "lora_B", "bias")}
    assert set(lora_state_dict(model)) == trainable(model)  # the other biases stay in the base


def test_freezing_drops_the_gradients_the_base_held():
    """A gradient left from a backward pass on the base must not survive on a frozen parameter:
    ``clip_grad_norm(model.parameters())`` or an optimizer over them would read it."""
    model = ToyGPT()
    idx, _ = tokens(0)
    model(idx).sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    apply_lora(model, LoRAConfig(target_modules=["c_fc"], bias="lora_only"))
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert len(frozen) > 10
    assert [n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None] \
        == []


def test_bias_all_trains_every_bias_layer_norms_included():
    model = apply_lora(ToyGPT(n_layer=1), LoRAConfig(target_modules=["c_fc"], bias="all"))
    biases = {n for n, _ in model.named_parameters() if n.endswith(".bias")}
    assert "transformer.ln_f.bias" in biases
    assert trainable(model) == biases | {"transformer.h.0.mlp.c_fc.lora_A",
                                         "transformer.h.0.mlp.c_fc.lora_B"}
    assert set(lora_state_dict(model)) == trainable(model)  # and they are saved with the adapter


def test_modules_to_save_train_in_full_and_are_saved_with_the_adapter():
    config = LoRAConfig(target_modules=["c_fc"], modules_to_save=["ln_f", "ln_1"])
    model = apply_lora(ToyGPT(n_layer=1), config)
    expected = {"transformer.ln_f.weight", "transformer.ln_f.bias", "transformer.h.0.ln_1.weight",
                "transformer.h.0.ln_1.bias", "transformer.h.0.mlp.c_fc.lora_A",
                "transformer.h.0.mlp.c_fc.lora_B"}
    assert trainable(model) == expected and set(lora_state_dict(model)) == expected


def test_a_tied_module_trains_in_place_keeping_the_tie_only_with_ensure_weight_tying():
    """PEFT trains an untied copy of a tied module unless ensure_weight_tying=True; minilora
    keeps GPT-2's tie, so it asks for that flag."""
    model = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=8))
    with pytest.raises(TargetModuleError, match="ensure_weight_tying=True"):
        apply_lora(model, LoRAConfig(modules_to_save=["lm_head"]))
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    apply_lora(model, LoRAConfig(modules_to_save=["lm_head"], ensure_weight_tying=True))
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model.lm_head.weight.requires_grad
    saved = [k for k in lora_state_dict(model) if "lora_" not in k]
    assert saved == ["transformer.wte.weight"]  # the tied weight once, under its first name


def test_modules_to_save_saves_every_parameter_under_the_module_named():
    model = apply_lora(ToyGPT(), LoRAConfig(target_modules=["c_attn"], modules_to_save=["h.0.mlp"]))
    saved = sorted(k for k in lora_state_dict(model) if "lora_" not in k)
    assert saved == [f"transformer.h.0.mlp.{m}.{p}" for m in ("c_fc", "c_proj")
                     for p in ("bias", "weight")]


def test_an_integer_adapter_loads_as_the_models_floats_and_a_boolean_one_is_refused():
    model = apply_lora(ToyGPT(), LoRAConfig(target_modules=["c_attn"]))
    shapes = {k: v.shape for k, v in lora_state_dict(model).items()}
    load_lora_state_dict(model, {k: np.ones(s, dtype=np.int64) for k, s in shapes.items()})
    assert all(v.dtype == np.float64 and (v == 1).all() for v in lora_state_dict(model).values())
    with pytest.raises(StateDictError, match=r"'transformer\.h\.0\.attn\.c_attn\.lora_A' has "
                                             r"non-numeric dtype bool"):
        load_lora_state_dict(model, {k: np.ones(s, dtype=bool) for k, s in shapes.items()})


def test_an_adapted_eval_model_stays_in_eval_mode():
    model = apply_lora(ToyGPT(n_layer=1).eval(), LoRAConfig(target_modules=["c_fc"],
                                                            lora_dropout=0.5))
    assert not any(m.training for m in model.modules())


def test_a_float64_adapter_loads_into_a_float32_model_as_float32():
    model = apply_lora(ToyGPT(dtype=np.float32), LoRAConfig(target_modules=["c_fc"]), rng=0)
    adapter = {k: v.astype(np.float64) + 1 for k, v in lora_state_dict(model).items()}
    load_lora_state_dict(model, adapter)
    for name, value in lora_state_dict(model).items():
        assert value.dtype == np.float32, name
        np.testing.assert_array_equal(value, adapter[name].astype(np.float32))


def test_a_bare_lora_linear_saves_its_arrays_under_their_own_names():
    layer = LoRALinear(Linear(4, 3, rng=0), r=2, lora_alpha=2, rng=0)
    assert list(lora_state_dict(layer)) == ["lora_A", "lora_B"]


# ---- merging and unloading ---------------------------------------------------------------------

def test_merge_and_unload_gives_plain_linears_with_merged_weights():
    config = LoRAConfig(r=2, lora_alpha=4, target_modules=["c_attn", "c_proj"])
    model = trained(apply_lora(ToyGPT(), config, rng=0))
    idx, _ = tokens(0)
    adapted = model(idx).data
    expected = {f"{n}.weight": lay.weight.data + lay.delta_weight()
                for n, lay in named_lora_layers(model)}
    plain = merge_and_unload(model)
    assert plain is model and not adapted_names(plain) and "lora_config" not in plain.__dict__
    assert list(plain.state_dict()) == list(ToyGPT().state_dict())  # the base's names, no lora_*
    for name, weight in expected.items():
        assert type(plain.get_submodule(name.removesuffix(".weight"))) is Linear
        np.testing.assert_array_equal(plain.state_dict()[name], weight)
    # float64 through a few layers: the merged and unmerged paths agree to round-off
    np.testing.assert_allclose(plain(idx).data, adapted, rtol=1e-12, atol=1e-12)


def test_unload_gives_back_the_base_model_exactly():
    idx, _ = tokens(1)
    base = ToyGPT()(idx).data
    model = trained(apply_lora(ToyGPT(), LoRAConfig(target_modules=["c_fc"])))
    assert not np.array_equal(model(idx).data, base)
    plain = unload(model)
    assert not adapted_names(plain)
    np.testing.assert_array_equal(plain(idx).data, base)


def test_unload_of_a_merged_model_unmerges_first():
    idx, _ = tokens(1)
    base = ToyGPT()
    weights = {n: p.data.copy() for n, p in base.named_parameters()}
    model = merge_adapter(trained(apply_lora(ToyGPT(), LoRAConfig(target_modules=["c_fc"]))))
    model.eval()
    plain = unload(model)
    assert not adapted_names(plain)
    assert plain.get_submodule("transformer.h.0.mlp.c_fc").training is False  # the mode is kept
    for name, p in plain.named_parameters():  # W + s B A - s B A: W up to float64 round-off
        np.testing.assert_allclose(p.data, weights[name], rtol=0, atol=1e-12, err_msg=name)
    np.testing.assert_allclose(plain(idx).data, base(idx).data, rtol=1e-12, atol=1e-12)


def test_merge_adapter_and_unmerge_adapter_switch_every_layer():
    model = trained(apply_lora(ToyGPT(), LoRAConfig(target_modules=["c_fc", "c_attn"]), rng=0))
    idx, _ = tokens(2)
    before = model(idx).data
    merge_adapter(model)
    assert all(layer.merged for _, layer in named_lora_layers(model))
    np.testing.assert_allclose(model(idx).data, before, rtol=1e-12, atol=1e-12)
    unmerge_adapter(model)
    assert not any(layer.merged for _, layer in named_lora_layers(model))
    np.testing.assert_allclose(model(idx).data, before, rtol=1e-12, atol=1e-12)


def test_merging_a_merged_adapter_changes_nothing_and_warns_naming_the_layers():
    """As PEFT ("All adapters are already merged, nothing to do"): a warning, the weights kept."""
    model = trained(apply_lora(ToyGPT(), LoRAConfig(target_modules=["c_fc", "c_attn"]), rng=0))
    layers = dict(named_lora_layers(model))
    fc, attn = "transformer.h.0.mlp.c_fc", "transformer.h.0.attn.c_attn"
    layers[fc].merge()
    weights = {n: lay.weight.data.copy() for n, lay in layers.items()}
    with pytest.warns(UserWarning, match=r"merge_adapter: the adapters of c_fc \(full names: "
                                         r"transformer\.h\.0\.mlp\.c_fc\) are already merged; "
                                         "merging the rest"):
        merge_adapter(model)
    np.testing.assert_array_equal(layers[fc].weight.data, weights[fc])
    assert not np.array_equal(layers[attn].weight.data, weights[attn])
    merged = {n: lay.weight.data.copy() for n, lay in layers.items()}
    with pytest.warns(UserWarning, match="merge_and_unload: .* are already merged; nothing to do"):
        plain = merge_and_unload(model)
    for name, weight in merged.items():
        np.testing.assert_array_equal(plain.get_submodule(name).weight.data, weight)
    with pytest.warns(UserWarning, match="LoRALinear.merge: the adapter is already merged"):
        layer = LoRALinear(Linear(3, 2, rng=0), r=1, lora_alpha=1)
        layer.merge()
        layer.merge()


def test_merging_an_unmerged_adapter_does_not_warn():
    model = trained(apply_lora(ToyGPT(), LoRAConfig(target_modules=["c_fc"]), rng=0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        merge_and_unload(model)


def test_disable_adapter_restores_the_adapters_even_after_an_exception():
    model = trained(apply_lora(ToyGPT(), LoRAConfig(target_modules=["c_fc"])))
    idx, _ = tokens(3)
    before = model(idx).data
    with pytest.raises(RuntimeError), disable_adapter(model):
        raise RuntimeError("boom")
    np.testing.assert_array_equal(model(idx).data, before)


def test_disable_adapters_is_the_old_name_of_disable_adapter():
    from minilora.lora import disable_adapters

    model = trained(apply_lora(ToyGPT(), LoRAConfig(target_modules=["c_fc"])))
    idx, _ = tokens(3)
    with disable_adapter(model):
        base = model(idx).data
    with pytest.warns(DeprecationWarning, match="disable_adapter"), disable_adapters(model):
        np.testing.assert_array_equal(model(idx).data, base)


def test_a_model_that_is_one_linear_can_be_merged_and_unloaded():
    layer = LoRALinear(Linear(3, 2, dtype=np.float64, rng=0), r=1, lora_alpha=1, rng=0)
    layer.lora_B.data[:] = 1.0
    x = Tensor(np.ones((1, 3)))
    adapted = layer(x).data
    plain = merge_and_unload(layer)
    assert type(plain) is Linear and plain.weight is layer.weight
    np.testing.assert_allclose(plain(x).data, adapted, rtol=1e-14, atol=1e-15)  # round-off


# ---- on the GPT, as a LoRA run uses it ----------------------------------------------------------

def tiny_gpt(seed=0):
    config = GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=8, dtype="float64")
    return GPT(config, seed=seed)


def test_fresh_adapter_on_the_gpt_gives_exactly_its_logits():
    idx = np.random.default_rng(0).integers(0, 11, (2, 8))
    base = tiny_gpt()(idx)[0].data
    config = LoRAConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], lora_dropout=0.1)
    model = apply_lora(tiny_gpt(), config, rng=0)
    np.testing.assert_array_equal(model(idx)[0].data, base)
    assert len(adapted_names(model)) == 6  # attn.c_attn, attn.c_proj and mlp.c_proj in 2 blocks


def test_base_checkpoint_plus_adapter_reloads_and_merges(tmp_path):
    """What `minilora train` with LoRA saves (the adapter and its config, beside a reference to
    the base) and what `minilora merge` does with it."""
    idx = np.random.default_rng(1).integers(0, 11, (2, 8))
    base_state = tiny_gpt(seed=4).state_dict()  # the base checkpoint
    config = LoRAConfig(r=2, lora_alpha=4, target_modules=["c_attn", "c_proj"], bias="lora_only")
    run = trained(apply_lora(tiny_gpt(seed=4), config, rng=1))
    for _, layer in named_lora_layers(run):
        layer.bias.data = layer.bias.data + 0.1  # a trained bias travels with the adapter
    logits = run(idx)[0].data
    np.savez(tmp_path / "adapter.npz", **lora_state_dict(run))
    (tmp_path / "adapter.json").write_text(json.dumps(run.lora_config.to_dict()))

    model = tiny_gpt(seed=99)  # any init: the base checkpoint overwrites it
    model.load_state_dict(base_state)
    apply_lora(model, LoRAConfig.from_dict(json.loads((tmp_path / "adapter.json").read_text())))
    with np.load(tmp_path / "adapter.npz", allow_pickle=False) as f:
        load_lora_state_dict(model, {k: f[k] for k in f.files})
    np.testing.assert_array_equal(model(idx)[0].data, logits)
    merged = merge_and_unload(model)
    assert list(merged.state_dict()) == list(base_state)
    np.testing.assert_allclose(merged(idx)[0].data, logits, rtol=1e-12, atol=1e-12)
