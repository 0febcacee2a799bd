"""The LoRA properties of test_properties.py on minilora's Llama (and Qwen2): LoRA on any of the
seven projections, a fresh adapter changes nothing, merged equals unmerged, frozen weights never
change. Over random targets, r, alpha, GQA shapes, dtypes and seeds."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from minilora.lora import (
    LoRAConfig,
    apply_lora,
    get_nb_trainable_parameters,
    merge_adapter,
    merge_and_unload,
    named_lora_layers,
    unmerge_adapter,
)
from minilora.models import LlamaConfig, LlamaForCausalLM
from minilora.nn import Linear
from minilora.optim import AdamW
from tests.lora.helpers import DTYPES, PROPERTY
from tests.lora.test_properties import train_adapters

SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VOCAB = 11

# Merged and unmerged compute the same function in a different order: W + s B A rounded once,
# against x W^T and s (x A^T) B^T rounded apart. These models' logits are below ~1 and pass
# through ~20 products and norms, so the float32 bound is relative to the logits' largest entry:
# over 159 drawn float32 models the largest difference was 3.5e-6 of it (6.9e-7 absolute), and
# one drawn model reached 1.0e-5 absolute; float64's largest was 2.4e-15. A merge that is wrong
# (no s, B A transposed) is off by ~0.1 of the logits' scale.
MERGE_TOL = {np.dtype(np.float64): dict(rtol=1e-10, atol=1e-12),
             np.dtype(np.float32): dict(rtol=1e-5, atol=1e-4)}  # atol: times the logits' scale


def assert_same_logits(got, want, dtype) -> None:
    tol = MERGE_TOL[np.dtype(dtype)]
    scale = max(1e-3, float(np.abs(want).max())) if np.dtype(dtype) == np.float32 else 1.0
    np.testing.assert_allclose(got, want, rtol=tol["rtol"], atol=tol["atol"] * scale)


@st.composite
def llama_models(draw):
    """(seed, config): a small Llama or Qwen2 with G = H / Hkv in {1, 2, 4}, tied or not."""
    hkv, group = draw(st.sampled_from([1, 2])), draw(st.sampled_from([1, 2]))
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=4 * hkv * group, intermediate_size=draw(st.integers(3, 12)),
        num_hidden_layers=draw(st.integers(1, 2)), num_attention_heads=hkv * group,
        num_key_value_heads=hkv, head_dim=draw(st.sampled_from([2, 4])),
        tie_word_embeddings=draw(st.booleans()), model_type=draw(st.sampled_from(["llama",
                                                                                   "qwen2"])),
        dtype=np.dtype(draw(st.sampled_from(DTYPES))).name)
    return draw(st.integers(0, 2**31 - 1)), config


@st.composite
def adapted_llamas(draw):
    """(seed, config, the adapted model, the LoRA config); lora_B still 0."""
    seed, config = draw(llama_models())
    lora = LoRAConfig(r=draw(st.integers(1, 4)), lora_alpha=draw(st.integers(1, 16)),
                      target_modules=draw(st.lists(st.sampled_from(SEVEN), min_size=1,
                                                   max_size=7, unique=True)),
                      use_rslora=draw(st.booleans()))
    return seed, config, apply_lora(LlamaForCausalLM(config, seed), lora, rng=seed + 1), lora


def batch(seed: int, shape=(2, 6)):
    rng = np.random.default_rng(seed)
    return rng.integers(0, VOCAB, shape), rng.integers(0, VOCAB, shape)


@PROPERTY
@given(case=adapted_llamas())
def test_lora_adapts_exactly_the_named_projections_and_counts_r_in_plus_out(case):
    seed, config, model, lora = case
    base = LlamaForCausalLM(config, seed)
    linears = {n: m for n, m in base.named_modules() if isinstance(m, Linear)}
    expected = [n for n in linears if n.rpartition(".")[2] in lora.target_modules]
    assert [n for n, _ in named_lora_layers(model)] == expected
    count = sum(lora.r * (linears[n].in_features + linears[n].out_features) for n in expected)
    assert get_nb_trainable_parameters(model)[0] == count


@PROPERTY
@given(case=adapted_llamas())
def test_fresh_adapter_gives_exactly_the_base_output(case):
    seed, config, model, _ = case
    idx, _ = batch(seed)
    np.testing.assert_array_equal(model(idx)[0].data, LlamaForCausalLM(config, seed)(idx)[0].data)


@PROPERTY
@given(case=adapted_llamas())
def test_merged_output_equals_unmerged_output(case):
    seed, config, model, _ = case
    train_adapters(model, seed)
    idx, _ = batch(seed)
    unmerged = model(idx)[0].data
    merge_adapter(model)
    merged = model(idx)[0].data
    assert_same_logits(merged, unmerged, config.dtype)
    unmerge_adapter(model)
    assert_same_logits(model(idx)[0].data, unmerged, config.dtype)
    plain = merge_and_unload(model)
    assert not list(named_lora_layers(plain))
    assert_same_logits(plain(idx)[0].data, unmerged, config.dtype)


@PROPERTY
@given(case=adapted_llamas(), steps=st.integers(1, 3))
def test_frozen_parameters_are_bit_identical_after_training(case, steps):
    seed, _, model, _ = case
    trains = {f"{n}.{p}" for n, _ in named_lora_layers(model) for p in ("lora_A", "lora_B")}
    frozen = {n: p.data.copy() for n, p in model.named_parameters() if n not in trains}
    assert "model.embed_tokens.weight" in frozen and "model.norm.weight" in frozen
    lora_B = {n: p.data.copy() for n, p in model.named_parameters() if n.endswith("lora_B")}
    opt = AdamW(list(model.parameters()), lr=0.01, weight_decay=0.1)  # frozen ones included
    for step in range(steps):
        idx, targets = batch(seed + step)
        model.zero_grad()
        model(idx, targets)[1].backward()
        opt.step()
    params = dict(model.named_parameters())
    for name, before in frozen.items():
        assert params[name].grad is None, name
        np.testing.assert_array_equal(params[name].data, before, err_msg=name)
    assert any(not np.array_equal(params[n].data, b) for n, b in lora_B.items())
