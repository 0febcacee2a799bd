"""LoRAConfig: PEFT's defaults and meanings, the name rules, and the JSON round trip."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from minilora.lora import LoRAConfig, lora_scaling, matches_target
from minilora.lora.config import MAX_PATTERN_REPEATS, matches_pattern, slow_patterns


def test_defaults_are_pefts():
    c = LoRAConfig()
    assert (c.r, c.lora_alpha, c.lora_dropout, c.use_rslora) == (8, 8, 0.0, False)
    assert (c.init_lora_weights, c.bias, c.modules_to_save) == ("kaiming", "none", None)
    assert c.target_modules == ("c_attn",)  # PEFT's default target for GPT-2


@pytest.mark.parametrize(("name", "target", "hit"), [
    ("transformer.h.0.attn.c_proj", "c_proj", True),
    ("transformer.h.0.mlp.c_proj", "c_proj", True),
    ("transformer.h.0.mlp.c_proj", "attn.c_proj", False),
    ("transformer.h.0.attn.c_proj", "attn.c_proj", True),
    ("transformer.h.0.attn.c_proj", "proj", False),  # whole dotted parts, not substrings
    ("transformer.h.0.attn.xc_proj", "c_proj", False),
    ("lm_head", "lm_head", True),
])
def test_target_matches_the_whole_name_or_a_dotted_suffix(name, target, hit):
    assert matches_target(name, target) is hit


def test_lists_become_tuples_and_the_config_is_frozen():
    c = LoRAConfig(target_modules=["c_attn", "c_proj"], modules_to_save=["ln_f"])
    assert c.target_modules == ("c_attn", "c_proj") and c.modules_to_save == ("ln_f",)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.r = 4


def test_to_dict_is_json_and_from_dict_gives_the_same_config():
    c = LoRAConfig(r=4, lora_alpha=16.5, lora_dropout=0.1, target_modules=["c_attn", "c_proj"],
                   use_rslora=True, init_lora_weights="gaussian", bias="lora_only",
                   modules_to_save=["ln_f"], rank_pattern={"h.0.attn.c_attn": 2},
                   alpha_pattern={"c_proj": 3})
    text = json.dumps(c.to_dict())
    assert LoRAConfig.from_dict(json.loads(text)) == c
    regex = LoRAConfig(target_modules=r".*\.c_attn")
    assert LoRAConfig.from_dict(json.loads(json.dumps(regex.to_dict()))) == regex


def test_from_dict_fills_missing_fields_with_defaults():
    assert LoRAConfig.from_dict({"r": 2}) == LoRAConfig(r=2)


@pytest.mark.parametrize(("name", "pattern", "matches"), [
    ("transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_attn", True),
    ("transformer.h.0.attn.c_attn", "h.0.attn.c_attn", True),       # a dotted suffix
    ("transformer.h.0.attn.c_attn", r"h\.0\..*", True),             # a regex over the suffix
    ("transformer.h.0.attn.c_attn", "h.0", False),                  # a parent module's name
    ("transformer.h.10.attn.c_attn", r"h\.1", False),                # a prefix: h.1 is not h.10
    ("transformer.h.1.attn.c_attn", "c_att", False),                # part of the last name
    ("transformer.h.1.attn.c_attn", "n.h.1.attn.c_attn", False),    # a suffix, but not dotted
])
def test_a_pattern_names_the_whole_module_not_a_parent_or_a_prefix(name, pattern, matches):
    """PEFT matches ``(.*\\.)?(key)$``: the key must reach the end of the name."""
    assert matches_pattern(name, pattern) is matches


def test_an_integer_alpha_stays_an_integer_as_peft_writes_it():
    config = LoRAConfig(r=8, lora_alpha=16)
    assert type(config.lora_alpha) is int and config.to_dict()["lora_alpha"] == 16
    assert type(LoRAConfig(lora_alpha=np.int64(16)).lora_alpha) is int


def test_first_matching_pattern_wins_as_in_peft():
    c = LoRAConfig(r=8, lora_alpha=16, rank_pattern={"h.0.attn.c_attn": 2, "c_attn": 4},
                   alpha_pattern={"c_attn": 1})
    assert c.rank_and_alpha("transformer.h.0.attn.c_attn") == (2, 1)
    assert c.rank_and_alpha("transformer.h.1.attn.c_attn") == (4, 1)
    assert c.rank_and_alpha("transformer.h.1.mlp.c_fc") == (8, 16)
    assert c.rank_and_alpha("transformer.h.10.attn.c_attn") == (4, 1)  # "h.1" is not "h.10"


def test_true_is_pefts_spelling_of_kaiming():
    """PEFT writes ``init_lora_weights: true`` for Kaiming-uniform A; NumPy's bool too."""
    assert LoRAConfig(init_lora_weights=True).init_lora_weights == "kaiming"
    assert LoRAConfig(init_lora_weights=np.bool_(True)).init_lora_weights == "kaiming"
    assert LoRAConfig(init_lora_weights="gaussian").init_lora_weights == "gaussian"


def test_the_scaling_is_alpha_over_r_unless_rslora_is_asked_for():
    assert lora_scaling(4, 8) == 2.0 and lora_scaling(4, 8, use_rslora=True) == 4.0


def test_slow_patterns_names_each_regex_a_file_may_not_hold():
    """A pattern read from a file may not repeat a group, nor hold more than MAX_PATTERN_REPEATS
    repetitions or 200 characters; each field is checked, and every offender named."""
    repeats = ".*" * MAX_PATTERN_REPEATS
    fine = LoRAConfig(target_modules=repeats, rank_pattern={"a" * 200: 2, r"h\.\d+\.c_fc": 4},
                      alpha_pattern={"c_attn": 2})
    assert slow_patterns(fine) == []
    assert slow_patterns(LoRAConfig(target_modules="all-linear")) == []
    assert slow_patterns(LoRAConfig(target_modules=["(.*)*z"])) == []  # names, not regexes
    slow = LoRAConfig(target_modules="(.*)*z", rank_pattern={"a" * 201: 2, "c_fc": 4},
                      alpha_pattern={repeats + ".*": 2, "(h.0)+": 1})
    assert slow_patterns(slow) == [("target_modules", "(.*)*z"), ("rank_pattern key", "a" * 201),
                                   ("alpha_pattern key", repeats + ".*"),
                                   ("alpha_pattern key", "(h.0)+")]


def test_numpy_scalars_become_python_values_so_the_config_writes_as_json():
    c = LoRAConfig(r=np.int64(4), lora_alpha=np.float64(8.5), lora_dropout=np.float64(0.1),
                   use_rslora=np.bool_(True), fan_in_fan_out=np.bool_(False),
                   ensure_weight_tying=np.bool_(False))
    assert type(c.r) is int and type(c.lora_alpha) is float and type(c.lora_dropout) is float
    assert c.use_rslora is True and c.fan_in_fan_out is False and c.ensure_weight_tying is False
    assert json.loads(json.dumps(c.to_dict()))["r"] == 4
    c = LoRAConfig(rank_pattern={"c_attn": np.int64(2)}, alpha_pattern={"c_fc": np.float64(0.5)},
                   target_slices={"c_attn": ["q", "v"]})
    assert type(c.rank_pattern["c_attn"]) is int and type(c.alpha_pattern["c_fc"]) is float
    assert c.target_slices == {"c_attn": ("q", "v")}  # lists become tuples, as target_modules


def test_all_linear_is_read_in_any_case_as_peft_does():
    assert LoRAConfig(target_modules="All-Linear").target_modules == "all-linear"
