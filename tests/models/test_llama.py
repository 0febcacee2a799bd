"""minilora's Llama and Qwen2 without torch: transformers' names and shapes, tied or untied
embeddings, the config's refusals by name, the call convention, the key/value cache."""

from __future__ import annotations

import numpy as np
import pytest

from minilora import ConfigError, nn, ops
from minilora.models import KVCache, LlamaConfig, LlamaForCausalLM

SIZES = dict(vocab_size=13, hidden_size=8, intermediate_size=12, num_hidden_layers=2,
             num_attention_heads=4)


def tiny(**fields) -> LlamaForCausalLM:
    return LlamaForCausalLM(LlamaConfig(**{**SIZES, "num_key_value_heads": 2, "dtype": "float64",
                                           **fields}), seed=0)


def tokens(seed: int = 0, shape=(2, 7)):
    return np.random.default_rng(seed).integers(0, SIZES["vocab_size"], shape)


# ---- the equations and the kernels ---------------------------------------------------------------

@pytest.mark.parametrize("lora", [False, True])
def test_the_model_on_the_reference_ops_equals_the_model_on_the_kernels(lora, monkeypatch):
    """Every fused op swapped for its equation (ops.reference): the same logits and gradients,
    full and with LoRA on all seven projections (B non-zero, or A's gradient would be zero)."""
    from minilora.lora import LoRAConfig, apply_lora, named_lora_layers

    idx, targets = tokens(1), tokens(2)
    runs = []
    for impl in ("kernel", "reference"):
        if impl == "reference":
            for name in ops.reference.__all__:
                monkeypatch.setattr(ops, name, getattr(ops.reference, name))
        model = tiny(model_type="qwen2", tie_word_embeddings=True)
        if lora:
            apply_lora(model, LoRAConfig(r=2, target_modules="all-linear"), rng=3)
            for _, layer in named_lora_layers(model):
                layer.lora_B.data = np.random.default_rng(5).standard_normal(layer.lora_B.shape)
        logits, loss = model(idx, targets)
        loss.backward()
        runs.append((logits.data, {n: p.grad for n, p in model.named_parameters()}))
    (logits, grads), (ref_logits, ref_grads) = runs
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-12, atol=1e-13)
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        if g is None:  # frozen: no gradient on either side
            assert ref_grads[name] is None, name
        else:
            np.testing.assert_allclose(g, ref_grads[name], rtol=1e-10, atol=1e-13, err_msg=name)


# ---- names, shapes, tying -----------------------------------------------------------------------

LAYER_NAMES = ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
               "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
               "mlp.down_proj.weight", "input_layernorm.weight", "post_attention_layernorm.weight"]


def test_parameter_names_and_shapes_are_transformers_llama():
    """transformers' names in its order, Linear weights (out, in): q (H hd, C), k and v
    (Hkv hd, C), o (C, H hd), gate and up (I, C), down (C, I)."""
    model = tiny(num_hidden_layers=1)
    shapes = {n: p.shape for n, p in model.named_parameters()}
    assert list(shapes) == (["model.embed_tokens.weight"]
                            + [f"model.layers.0.{n}" for n in LAYER_NAMES]
                            + ["model.norm.weight", "lm_head.weight"])
    layer = "model.layers.0."
    assert [shapes[layer + n] for n in LAYER_NAMES] == [(8, 8), (4, 8), (4, 8), (8, 8), (12, 8),
                                                       (12, 8), (8, 12), (8,), (8,)]


def test_qwen2_has_biases_on_q_k_v_only():
    model = tiny(model_type="qwen2", num_hidden_layers=1)
    biases = [n for n, _ in model.named_parameters() if n.endswith(".bias")]
    assert biases == [f"model.layers.0.self_attn.{p}_proj.bias" for p in "qkv"]


def test_llama_biases_follow_attention_bias_and_mlp_bias():
    model = tiny(num_hidden_layers=1, attention_bias=True, mlp_bias=True)
    biases = [n.split(".")[-2] for n, _ in model.named_parameters() if n.endswith(".bias")]
    assert biases == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.mark.parametrize("tie", [True, False])
def test_lm_head_shares_the_embedding_only_when_tied(tie):
    model = tiny(tie_word_embeddings=tie)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tie
    assert ("lm_head.weight" in dict(model.named_parameters())) == (not tie)


def test_explicit_head_dim_sets_the_projection_sizes():
    model = tiny(head_dim=6, num_hidden_layers=1)
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.weight.shape == (24, 8) and attn.k_proj.weight.shape == (12, 8)
    assert attn.o_proj.weight.shape == (8, 24)


def test_weights_start_as_transformers_draws_them():
    model = tiny(pad_token_id=5, initializer_range=0.5, vocab_size=400, intermediate_size=200)
    emb = model.model.embed_tokens.weight.data
    assert np.all(emb[5] == 0) and emb[6:].std() == pytest.approx(0.5, rel=0.05)
    assert np.all(model.model.norm.weight.data == 1)
    assert model.model.layers[0].mlp.up_proj.weight.data.std() == pytest.approx(0.5, rel=0.05)


# ---- the config: every field minilora does not implement is refused by name ------------------

REFUSED = [
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), r"rope_scaling.*'llama3'"),
    (dict(rope_scaling={"type": "linear", "factor": 2.0}), r"rope_scaling.*'linear'"),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0}), r"rope_parameters.*'yarn'"),
    (dict(rope_parameters={"rope_type": "default", "partial_rotary_factor": 0.5}),
     r"rope_parameters.*partial_rotary_factor"),
    (dict(use_sliding_window=True), r"use_sliding_window"),
    (dict(layer_types=["full_attention", "sliding_attention"]), r"layer_types"),
    (dict(attention_dropout=0.1), r"attention_dropout"),
    (dict(hidden_act="gelu"), r"hidden_act 'gelu'"),
    (dict(model_type="mistral"), r"model_type"),
    (dict(model_type="qwen2", attention_bias=True), r"attention_bias: Qwen2"),
    (dict(model_type="qwen2", mlp_bias=True), r"mlp_bias: Qwen2"),
    (dict(num_key_value_heads=3), r"multiple of num_key_value_heads"),
    (dict(head_dim=5), r"head_dim must be even"),
    (dict(hidden_size=10), r"hidden_size \(10\) must be divisible"),
    (dict(pad_token_id=13), r"pad_token_id"),
    (dict(dtype="bfloat16"), r"dtype"),
    (dict(rms_norm_eps=-1.0), r"rms_norm_eps"),
    (dict(tie_word_embeddings=1), r"tie_word_embeddings"),
]


@pytest.mark.parametrize("fields, message", REFUSED, ids=[m for _, m in REFUSED])
def test_unimplemented_or_bad_fields_are_refused_by_name(fields, message):
    with pytest.raises(ConfigError, match=message):
        LlamaConfig(**{**SIZES, **fields})


def test_default_rope_in_either_spelling_gives_its_theta():
    for fields in (dict(rope_parameters={"rope_type": "default", "rope_theta": 5e5}),
                   dict(rope_scaling={"type": "default", "rope_theta": 5e5}),
                   dict(rope_theta=5e5)):
        assert LlamaConfig(**SIZES, **fields).rope_theta == 5e5


def test_from_dict_refuses_unknown_keys_and_missing_sizes_by_name():
    with pytest.raises(ConfigError, match=r"quantization_config"):
        LlamaConfig.from_dict({**SIZES, "quantization_config": {"bits": 4}})
    with pytest.raises(ConfigError, match=r"missing fields \['intermediate_size'\]"):
        LlamaConfig.from_dict({k: v for k, v in SIZES.items() if k != "intermediate_size"})


def test_from_dict_takes_the_dtype_asked_for_and_computes_half_checkpoints_in_float32():
    d = {**SIZES, "torch_dtype": "bfloat16", "dtype": "bfloat16", "architectures": ["X"]}
    assert LlamaConfig.from_dict(d).dtype == "float32"
    assert LlamaConfig.from_dict(d, dtype="float64").dtype == "float64"
    assert LlamaConfig.from_dict({**SIZES, "dtype": "float64"}).dtype == "float64"


def test_qwen2_config_dict_takes_qwen2_defaults_where_they_differ():
    config = LlamaConfig.from_dict({**SIZES, "num_attention_heads": 32, "hidden_size": 64,
                                    "model_type": "qwen2"})
    assert config.num_key_value_heads == 32 and config.max_position_embeddings == 32768


def test_config_round_trips_through_to_dict():
    config = LlamaConfig(**SIZES, num_key_value_heads=1, rope_theta=1e6, model_type="qwen2",
                         tie_word_embeddings=True, pad_token_id=0, dtype="float64")
    assert LlamaConfig.from_dict(config.to_dict()) == config


# ---- the call convention, as GPT's ---------------------------------------------------------------

def test_forward_gives_logits_or_logits_and_the_mean_loss_with_minus_one_ignored():
    model = tiny()
    idx, targets = tokens(0), tokens(1)
    targets[0, :3] = -1
    logits, loss = model(idx)
    assert loss is None
    assert logits.shape == (2, 7, 13) and logits.dtype == np.float64
    same, loss = model(idx, targets)
    np.testing.assert_array_equal(same.data, logits.data)
    counted = targets != -1
    expected = ops.cross_entropy(ops.getitem(logits, counted), targets[counted])
    assert loss.item() == pytest.approx(expected.item(), rel=1e-14)


def test_a_float32_model_computes_and_differentiates_in_float32():
    model = tiny(dtype="float32")
    logits, loss = model(tokens(0), tokens(1))
    loss.backward()
    assert logits.dtype == loss.dtype == np.float32
    assert all(p.grad.dtype == np.float32 for p in model.parameters())


def test_the_padding_token_row_gets_no_gradient_from_its_lookups():
    """As torch's Embedding(padding_idx): untied, so the row's only gradient would be lookups."""
    model = tiny(pad_token_id=4)
    idx = tokens(0)
    idx[:, :3] = 4
    model(idx, tokens(1))[1].backward()
    grad = model.model.embed_tokens.weight.grad
    assert np.all(grad[4] == 0) and np.any(grad[idx[0, 3]] != 0)


def test_idx_must_be_two_dimensional():
    with pytest.raises(ValueError, match=r"idx must have shape \(B, T\)"):
        tiny()(np.zeros(3, np.int64))


# ---- the key/value cache and generation ----------------------------------------------------------

@pytest.mark.parametrize("chunks", [[7], [1] * 7, [3, 1, 3], [5, 2]])
def test_forward_in_chunks_with_a_cache_equals_one_forward(chunks):
    """Positions continue after the cached ones (RoPE at an offset; queries the last keys)."""
    model = tiny(model_type="qwen2", num_key_value_heads=1)
    idx = tokens(3)
    full = model(idx)[0].data
    cache, parts, start = KVCache(2), [], 0
    for n in chunks:
        parts.append(model(idx[:, start:start + n], cache=cache)[0].data)
        start += n
    assert cache.length == 7
    np.testing.assert_allclose(np.concatenate(parts, axis=1), full, rtol=1e-12, atol=1e-13)


def test_greedy_generation_equals_the_argmax_of_full_forward_passes():
    model = tiny()
    idx = tokens(4, (2, 3))
    out = model.generate(idx, 5, temperature=0)
    expected = idx
    for _ in range(5):
        nxt = model(expected)[0].data[:, -1].argmax(axis=-1)
        expected = np.concatenate([expected, nxt[:, None]], axis=1)
    np.testing.assert_array_equal(out, expected)


def test_sampling_is_reproducible_with_a_seed_and_restores_the_mode():
    model = tiny()
    model.train()
    first = model.generate(tokens(5, (1, 2)), 6, temperature=0.8, top_k=4, rng=7)
    again = model.generate(tokens(5, (1, 2)), 6, temperature=0.8, top_k=4, rng=7)
    np.testing.assert_array_equal(first, again)
    assert first.shape == (1, 8) and model.training


@pytest.mark.parametrize("kwargs, message", [(dict(temperature=-1.0), "temperature"),
                                             (dict(top_k=0), "top_k")])
def test_generate_refuses_bad_sampling_settings(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        tiny().generate(tokens(0, (1, 2)), 2, **kwargs)


def test_rms_norm_module_refuses_a_bad_size_or_eps():
    with pytest.raises(ConfigError, match="normalized_shape"):
        nn.RMSNorm(0)
    with pytest.raises(ConfigError, match="eps"):
        nn.RMSNorm(4, eps=-1.0)
