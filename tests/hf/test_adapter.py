"""PEFT adapter directories without torch: minilora's own round trip, LoRAConfig read from and
written as PEFT's fields, the tie and modules_to_save rules, and the refusals. The same files
against PEFT itself are in test_parity.py."""

from __future__ import annotations

import json

import numpy as np
import pytest
import safetensors.numpy

from minilora import ConfigError, FileFormatError, MiniLoRAError, TargetModuleError, hf
from minilora.lora import LoRAConfig, apply_lora, lora_state_dict, named_lora_layers
from minilora.lora.peft_config import MAPPED, peft_dict
from tests.hf.helpers import adapted, random_gpt, tokens
from tests.lora.helpers import assert_unchanged, snapshot

CONFIGS = {
    "c_attn": LoRAConfig(r=2, lora_alpha=4),
    "patterns": LoRAConfig(r=2, lora_alpha=4, target_modules=["c_attn", "c_proj", "c_fc"],
                           rank_pattern={"h.1.attn.c_attn": 3}, alpha_pattern={"c_fc": 6},
                           bias="lora_only"),
    "all-linear": LoRAConfig(r=2, lora_alpha=3, target_modules="all-linear", use_rslora=True,
                             bias="all"),
    "regex": LoRAConfig(r=1, target_modules=r".*\.h\.1\.mlp\.c_(fc|proj)"),
    "saved": LoRAConfig(r=2, modules_to_save=["ln_f", "h.0.mlp"], target_modules=["c_attn"],
                        bias="all"),
    "tied": LoRAConfig(r=2, modules_to_save=["lm_head"], ensure_weight_tying=True),
}


def state_of(directory):
    return safetensors.numpy.load((directory / "adapter_model.safetensors").read_bytes())


def config_of(directory):
    return json.loads((directory / "adapter_config.json").read_text())


@pytest.fixture(params=sorted(CONFIGS))
def pair(request, tmp_path):
    """(the adapted model, the adapter it saved, a fresh base to load it into)."""
    model = adapted(random_gpt("float64"), CONFIGS[request.param])
    hf.save_adapter(model, tmp_path / "a")
    return model, tmp_path / "a", random_gpt("float64")


def tied_as_embedding(state):
    """lm_head.weight is transformer.wte.weight: PEFT names the tied pair by the embedding."""
    return {("transformer.wte.weight" if k == "lm_head.weight" else k): v for k, v in state.items()}


def test_an_adapter_round_trips_bit_for_bit_and_gives_the_same_logits(pair):
    model, directory, base = pair
    hf.load_adapter(base, directory)
    ours, theirs = tied_as_embedding(lora_state_dict(model)), lora_state_dict(base)
    assert ours.keys() == theirs.keys()
    assert all(np.array_equal(ours[k], theirs[k]) for k in ours)
    np.testing.assert_array_equal(base(tokens())[0].data, model(tokens())[0].data)


def test_load_adapter_freezes_unless_trainable(pair):
    model, directory, base = pair
    hf.load_adapter(base, directory)
    assert not any(p.requires_grad for p in base.parameters())
    again = random_gpt("float64")
    hf.load_adapter(again, directory, is_trainable=True)
    trainable = {n for n, p in again.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in model.named_parameters() if p.requires_grad}


def test_the_files_use_peft_keys_and_fields(pair):
    model, directory, _ = pair
    keys = set(state_of(directory))
    assert all(k.startswith("base_model.model.") for k in keys)
    layers = [n for n, _ in named_lora_layers(model)]
    for name in layers:
        assert {f"base_model.model.{name}.lora_A.weight",
                f"base_model.model.{name}.lora_B.weight"} <= keys
    d = config_of(directory)
    assert d["peft_type"] == "LORA" and d["task_type"] == "CAUSAL_LM"
    assert d["fan_in_fan_out"] is True and d["init_lora_weights"] is True
    assert d["inference_mode"] is True and list(d) == sorted(d)
    if model.lora_config.target_modules == "all-linear":  # PEFT writes the names it chose
        assert sorted(d["target_modules"]) == sorted(layers) and "lm_head" not in layers


def test_a_trained_bias_of_an_adapted_layer_is_its_base_layer_bias(tmp_path):
    model = adapted(random_gpt(), CONFIGS["patterns"])
    hf.save_adapter(model, tmp_path / "a")
    keys = set(state_of(tmp_path / "a"))
    assert "base_model.model.transformer.h.0.attn.c_attn.base_layer.bias" in keys
    assert "base_model.model.transformer.h.0.ln_1.bias" not in keys


def test_a_saved_conv1d_weight_is_written_in_gpt2s_layout(tmp_path):
    model = adapted(random_gpt(), CONFIGS["saved"])
    hf.save_adapter(model, tmp_path / "a")
    w = state_of(tmp_path / "a")["base_model.model.transformer.h.0.mlp.c_fc.weight"]
    np.testing.assert_array_equal(w, model.transformer.h[0].mlp.c_fc.weight.data.T)


def test_the_tied_embedding_is_written_as_peft_writes_it(tmp_path):
    """PEFT with modules_to_save=['lm_head'], ensure_weight_tying=True writes both tensors and
    modules_to_save=['transformer.wte']."""
    model = adapted(random_gpt(), CONFIGS["tied"])
    hf.save_adapter(model, tmp_path / "a")
    state, d = state_of(tmp_path / "a"), config_of(tmp_path / "a")
    np.testing.assert_array_equal(state["base_model.model.lm_head.weight"],
                                  state["base_model.model.transformer.wte.weight"])
    assert d["modules_to_save"] == ["transformer.wte"] and d["ensure_weight_tying"] is True


def test_a_tied_module_without_ensure_weight_tying_is_refused():
    with pytest.raises(TargetModuleError, match="ensure_weight_tying=True"):
        apply_lora(random_gpt(), LoRAConfig(modules_to_save=["lm_head"]))


def forge(directory, state=None, **fields):
    """Rewrite the adapter in ``directory``: its tensors and/or config fields."""
    if state is not None:
        safetensors.numpy.save_file(state, directory / "adapter_model.safetensors")
    if fields:
        d = config_of(directory)
        d.update(fields)
        (directory / "adapter_config.json").write_text(json.dumps(d))


def test_an_untied_peft_adapter_is_refused(tmp_path):
    """PEFT with modules_to_save=['wte'] trains wte alone: lm_head keeps the base's weights."""
    model = adapted(random_gpt(), CONFIGS["tied"])
    hf.save_adapter(model, tmp_path / "a")
    state = state_of(tmp_path / "a")
    del state["base_model.model.lm_head.weight"]
    forge(tmp_path / "a", state)
    with pytest.raises(FileFormatError, match="which GPT-2 ties to it"):
        hf.load_adapter(random_gpt(), tmp_path / "a")
    state["base_model.model.lm_head.weight"] = state["base_model.model.transformer.wte.weight"] + 1
    forge(tmp_path / "a", state)
    with pytest.raises(FileFormatError, match="differ"):
        hf.load_adapter(random_gpt(), tmp_path / "a")


def test_modules_to_save_is_read_with_peft_plain_suffix_rule(tmp_path):
    """PEFT's entry '1' matches h.1, h.11 and every ln_1 (a plain suffix), minilora's h.1 alone
    (a dotted one): written as full names wherever the rules differ, read as PEFT reads them."""
    config = LoRAConfig(r=1, target_modules=r".*\.h\.0\.attn\.c_attn", modules_to_save=["1"])
    model = adapted(random_gpt(n_layer=12), config)
    hf.save_adapter(model, tmp_path / "a")
    assert config_of(tmp_path / "a")["modules_to_save"] == ["transformer.h.1"]
    hf.load_adapter(random_gpt(n_layer=12), tmp_path / "a")
    forge(tmp_path / "a", modules_to_save=["1"])  # as PEFT reads it, whose tensors are not there
    with pytest.raises(FileFormatError, match=r"missing keys.*transformer\.h\.11\.ln_1\.weight"):
        hf.load_adapter(random_gpt(n_layer=12), tmp_path / "a")
    peft_names = hf.peft.peft_saved_modules(random_gpt(n_layer=12), ["1"])
    assert {"transformer.h.1", "transformer.h.11", "transformer.h.0.ln_1"} <= set(peft_names)
    assert "transformer.h.1.ln_1" not in peft_names  # inside h.1, wrapped with it


@pytest.fixture
def one(tmp_path):
    """(an adapted model, its adapter, a fresh base) for the 'patterns' config."""
    model = adapted(random_gpt("float64"), CONFIGS["patterns"])
    hf.save_adapter(model, tmp_path / "a")
    return model, tmp_path / "a", random_gpt("float64")


@pytest.mark.parametrize("field, value, shown", [
    ("peft_type", "IA3", "peft_type must be 'LORA'"),
    ("use_dora", True, "c_attn.lora_magnitude_vector (the config adapts"),
    ("use_qalora", True, "use_qalora=True is a PEFT feature minilora does not implement"),
    ("layers_to_transform", [0], "layers_to_transform"),
    ("lora_bias", True, "lora_bias"),
    ("init_lora_weights", "pissa_niter_4", "init_lora_weights='pissa_niter_4'"),
    ("task_type", "SEQ_CLS", "task_type"),
    ("inference_mode", "yes", "inference_mode must be of type bool"),
    ("brand_new_field", 3, "unknown field 'brand_new_field'"),
    ("r", 3, "has shape"),
    ("target_modules", ["c_fc", "c_attn"], "unexpected keys"),
    ("target_modules", ["c_fc", "c_attn", "c_proj", "lm_head"], "tied weights"),
    ("target_modules", ["nothing"], "matches no module"),
    ("rank_pattern", {"(a*)*b": 2}, "exponential time"),
    ("modules_to_save", ["ln_f"], "missing keys"),
])
def test_a_config_minilora_cannot_follow_is_refused_naming_the_field(one, field, value, shown):
    _, directory, base = one
    forge(directory, **{field: value})
    before = {k: v.copy() for k, v in base.state_dict().items()}
    with pytest.raises(FileFormatError) as e:
        hf.load_adapter(base, directory)
    assert shown in str(e.value) and "\n" not in str(e.value)
    assert not list(named_lora_layers(base)) and "lora_config" not in base.__dict__
    assert all(np.array_equal(before[k], v) for k, v in base.state_dict().items())


@pytest.mark.parametrize("damage, shown", [
    (lambda s, k: s.pop(k), "missing"),
    (lambda s, k: s.update(extra=np.zeros(2)), "unexpected tensor 'extra'"),
    (lambda s, k: s.update({"base_model.model.transformer.h.0.ln_1.weight": np.ones(16)}),
     "unexpected keys"),
    (lambda s, k: s.__setitem__(k, s[k][:1]), "has shape"),
    (lambda s, k: s.__setitem__(k, s[k].astype(np.int32)), "dtype I32"),
    (lambda s, k: s[k].__setitem__((0, 0), np.inf), "NaN or infinity"),
])
def test_bad_tensors_are_refused_and_leave_the_model_as_it_was(one, damage, shown):
    _, directory, base = one
    state = state_of(directory)
    damage(state, "base_model.model.transformer.h.1.attn.c_attn.lora_B.weight")
    forge(directory, state)
    flags = {n: p.requires_grad for n, p in base.named_parameters()}
    before = {k: v.copy() for k, v in base.state_dict().items()}
    with pytest.raises(FileFormatError) as e:
        hf.load_adapter(base, directory)
    assert shown in str(e.value)
    assert not list(named_lora_layers(base)) and "lora_config" not in base.__dict__
    assert flags == {n: p.requires_grad for n, p in base.named_parameters()}
    assert all(np.array_equal(before[k], v) for k, v in base.state_dict().items())


def test_a_pickled_adapter_is_refused(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(peft_dict(LoRAConfig())))
    (tmp_path / "a" / "adapter_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(FileFormatError, match=r"pickle.*safetensors"):
        hf.load_adapter(random_gpt(), tmp_path / "a")


def test_a_second_adapter_under_a_taken_name_is_an_error(one):
    model, directory, _ = one
    before = snapshot(model)
    with pytest.raises(ConfigError, match="already has an adapter named 'default'"):
        hf.load_adapter(model, directory)
    assert_unchanged(model, before)


def test_save_adapter_needs_an_adapter(tmp_path):
    with pytest.raises(MiniLoRAError, match="no adapter"):
        hf.save_adapter(random_gpt(), tmp_path / "a")
    assert not (tmp_path / "a").exists()


# ---- LoRAConfig <-> PEFT's fields -----------------------------------------------------------

def test_peft_spellings_are_accepted_by_loraconfig():
    c = LoRAConfig(init_lora_weights=True, task_type="CAUSAL_LM", fan_in_fan_out=True,
                   target_modules="ALL-LINEAR", ensure_weight_tying=True)
    assert c.init_lora_weights == "kaiming" and c.target_modules == "all-linear"
    assert LoRAConfig.from_dict(c.to_dict()) == c


def test_from_peft_then_to_peft_keeps_every_mapped_field():
    c = LoRAConfig(r=4, lora_alpha=12, lora_dropout=0.1, target_modules=["c_attn", "c_fc"],
                   use_rslora=True, init_lora_weights="gaussian", bias="all",
                   modules_to_save=["ln_f"], rank_pattern={"c_fc": 2}, alpha_pattern={"c_fc": 3},
                   task_type="CAUSAL_LM", fan_in_fan_out=True)
    d = c.to_peft()
    assert LoRAConfig.from_peft(d) == c and set(MAPPED) <= set(d)
    assert LoRAConfig.from_peft(LoRAConfig().to_peft()) == LoRAConfig()
    assert d["rank_pattern"] == {"c_fc": 2} and LoRAConfig().to_peft()["rank_pattern"] == {}


def test_init_lora_weights_false_is_read_only_where_the_file_gives_the_weights():
    d = {**LoRAConfig().to_peft(), "init_lora_weights": False}
    with pytest.raises(ConfigError, match="not implemented"):
        LoRAConfig.from_peft(d)
    from minilora.lora.peft_config import lora_config_from_peft
    assert lora_config_from_peft(d, weights_follow=True).init_lora_weights == "kaiming"


def test_all_linear_adapts_every_linear_but_the_output_layer():
    model = apply_lora(random_gpt(), LoRAConfig(target_modules="all-linear"))
    names = {n.rpartition(".")[2] for n, _ in named_lora_layers(model)}
    assert names == {"c_attn", "c_proj", "c_fc"} and model.lm_head.__class__.__name__ == "Linear"


def test_the_docs_table_lists_every_peft_field():
    """docs/interop.md's table of PEFT LoraConfig fields says for each what the code does."""
    from pathlib import Path

    from minilora.lora.peft_config import DESCRIPTIVE, REFUSED

    text = (Path(__file__).resolve().parents[2] / "docs" / "interop.md").read_text()
    table = text[text.index("| PEFT field |"):].split("\n\n")[0]
    rows = {}
    for line in table.splitlines()[2:]:
        name, _, status = (cell.strip() for cell in line.strip("|").split("|"))
        rows[name.strip("`")] = status
    assert set(rows) == set(MAPPED) | set(DESCRIPTIVE) | set(REFUSED) | {"runtime_config"}
    for name, status in rows.items():
        expected = "supported" if name in MAPPED else "read, not kept" if name in DESCRIPTIVE \
            else "refused unless default" if name in REFUSED else "not in the file"
        assert status.startswith(expected), (name, status)


# ---- several adapters ------------------------------------------------------------------------

def second_adapter(tmp_path):
    """A model with a default adapter, and another adapter's files (c_attn and wte) to load."""
    other = adapted(random_gpt("float64"), LoRAConfig(r=3, target_modules=["c_attn", "wte"]))
    hf.save_adapter(other, tmp_path / "b")
    first = adapted(random_gpt("float64"), LoRAConfig(r=2, target_modules=["c_fc"]))
    return first, tmp_path / "b"


def test_a_second_adapter_loads_beside_the_first_inactive_and_round_trips(tmp_path):
    model, directory = second_adapter(tmp_path)
    idx = tokens()
    before = model(idx)[0].data.copy()
    hf.load_adapter(model, directory, adapter_name="b")
    assert model.active_adapters == ["default"] and list(model.peft_config) == ["default", "b"]
    np.testing.assert_array_equal(model(idx)[0].data, before)  # inactive: changes nothing
    hf.save_adapter(model, tmp_path / "both")
    assert sorted(p.name for p in (tmp_path / "both").iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "b"]
    def read(folder):
        return safetensors.numpy.load((folder / "adapter_model.safetensors").read_bytes())

    saved, loaded = read(tmp_path / "both" / "b"), read(directory)  # bit for bit, same keys
    assert saved.keys() == loaded.keys()
    assert all(np.array_equal(saved[k], loaded[k]) for k in saved)


@pytest.mark.parametrize("damage", ["nan", "targets"])
def test_a_bad_second_adapter_leaves_the_model_as_it_was(tmp_path, damage):
    model, directory = second_adapter(tmp_path)
    weights = directory / "adapter_model.safetensors"
    if damage == "nan":  # found only when the weights load: after the adapter was added
        tensors = safetensors.numpy.load(weights.read_bytes())
        key = next(k for k in tensors if k.endswith("lora_embedding_B"))
        tensors[key] = np.full_like(tensors[key], np.nan)
        weights.write_bytes(safetensors.numpy.save(tensors))
    else:
        config = json.loads((directory / "adapter_config.json").read_text())
        (directory / "adapter_config.json").write_text(json.dumps(
            {**config, "target_modules": ["c_attn", "nothing"]}))
    before = snapshot(model)
    with pytest.raises(FileFormatError):
        hf.load_adapter(model, directory, adapter_name="b")
    assert_unchanged(model, before)
    assert list(model.peft_config) == ["default"]
