"""Parameter counting: the two worked examples (3x3 at r=1, 4096x4096 at r=4) and PEFT's report
line."""

from __future__ import annotations

from fractions import Fraction

from minilora.lora import (
    LoRAConfig,
    LoRALayerCount,
    LoRALinear,
    add_adapter,
    apply_lora,
    get_nb_trainable_parameters,
    lora_parameter_counts,
    print_trainable_parameters,
    trainable_parameters_report,
)
from minilora.models import GPT, GPTConfig
from minilora.nn import Linear, Module


def test_seed_example_3x3_with_r1_trains_6_parameters_against_9():
    layer = LoRALinear(Linear(3, 3, bias=False, rng=0), r=1, lora_alpha=1)
    assert layer.lora_A.size + layer.lora_B.size == 6  # A: (1, 3), B: (3, 1)
    assert layer.weight.size == 9
    assert get_nb_trainable_parameters(layer) == (6, 15)
    count = LoRALayerCount("W", 3, 3, 1)
    assert (count.lora_params, count.weight_params, count.fraction) == (6, 9, Fraction(2, 3))


def test_seed_example_4096x4096_with_r4_trains_one_512th():
    count = LoRALayerCount("W", in_features=4096, out_features=4096, r=4)  # shapes only: no array
    assert count.weight_params == 16_777_216
    assert count.lora_params == 32_768
    assert count.fraction == Fraction(1, 512)
    assert str(count) == ("W: (4096, 4096) weight, r=4: 32,768 LoRA parameters against "
                          "16,777,216 weights (1/512)")


def test_per_layer_counts_of_an_adapted_layer_match_its_arrays():
    layer = LoRALinear(Linear(7, 5, rng=0), r=3, lora_alpha=3)
    (count,) = lora_parameter_counts(layer)
    assert (count.name, count.in_features, count.out_features, count.r) == ("", 7, 5, 3)
    assert count.lora_params == layer.lora_A.size + layer.lora_B.size == 3 * (7 + 5)
    assert count.weight_params == layer.weight.size


def test_report_reads_as_pefts_print_trainable_parameters(capsys):
    """The README's line, from a character-level GPT (65 symbols, block 64, 2 layers of width 32)
    with r=4 on c_attn and c_proj (attn.c_proj and mlp.c_proj both match)."""
    config = GPTConfig(vocab_size=65, block_size=64, n_layer=2, n_head=2, n_embd=32)
    model = apply_lora(GPT(config, seed=0), LoRAConfig(r=4, lora_alpha=8,
                                                       target_modules=["c_attn", "c_proj"]))
    line = "trainable params: 2,816 || all params: 32,416 || trainable%: 8.6871"
    assert trainable_parameters_report(model) == line
    print_trainable_parameters(model)
    assert capsys.readouterr().out == line + "\n"
    per_block = 4 * (32 + 96) + 4 * (32 + 32) + 4 * (128 + 32)  # c_attn, attn.c_proj, mlp.c_proj
    assert sum(c.lora_params for c in lora_parameter_counts(model)) == 2 * per_block == 2816


def test_tied_weights_are_counted_once():
    config = GPTConfig(vocab_size=65, block_size=64, n_layer=2, n_head=2, n_embd=32)
    model = GPT(config, seed=0)
    trainable, total = get_nb_trainable_parameters(model)
    assert trainable == total == 32_416 - 2_816  # lm_head.weight is transformer.wte.weight


def test_the_counts_of_a_named_adapter_are_its_own():
    config = GPTConfig(vocab_size=65, block_size=64, n_layer=2, n_head=2, n_embd=32)
    model = apply_lora(GPT(config, seed=0), LoRAConfig(r=2, target_modules=["c_attn"]))
    add_adapter(model, "big", LoRAConfig(r=6, target_modules=["c_attn"]))
    assert {(c.adapter_name, c.r) for c in lora_parameter_counts(model)} == {("default", 2)}
    big = lora_parameter_counts(model, "big")
    assert {(c.adapter_name, c.r) for c in big} == {("big", 6)} and len(big) == 2
    assert sum(c.lora_params for c in big) == 2 * 6 * (32 + 96)


def test_the_report_of_a_model_without_parameters_says_zero_percent():
    assert trainable_parameters_report(Module()) == \
        "trainable params: 0 || all params: 0 || trainable%: 0.0000"
