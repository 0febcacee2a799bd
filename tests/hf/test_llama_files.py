"""Hugging Face Llama and Qwen2 directories, and PEFT adapters on them, without torch: minilora's
own round trip, the keys and layout of the files, ``minilora.from_pretrained`` choosing the model
by ``model_type``, the file maps, and the refusals. The same files against ``transformers`` and
PEFT themselves are in test_llama_parity.py."""

from __future__ import annotations

import json

import numpy as np
import pytest
import safetensors.numpy

import minilora
from minilora import GPT, FileFormatError, LlamaForCausalLM, hf
from minilora.hf import llama, qwen2
from minilora.lora import LoRAConfig, lora_state_dict, named_lora_layers
from tests.hf.helpers import LLAMAS, adapted, random_gpt, random_llama, tokens, write_safetensors

SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tensors_of(directory, name="model.safetensors"):
    return safetensors.numpy.load((directory / name).read_bytes())


def same_parameters(a, b) -> bool:
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    return pa.keys() == pb.keys() and all(np.array_equal(pa[k].data, pb[k].data) for k in pa)


@pytest.fixture(params=sorted(LLAMAS))
def saved(request, tmp_path):
    model = random_llama(request.param, "float64")
    model.save_pretrained(tmp_path / "m")
    return model, tmp_path / "m"


def rewrite_config(directory, **fields):
    config = json.loads((directory / "config.json").read_text())
    config.update(fields)
    (directory / "config.json").write_text(json.dumps(config))


# ---- models ------------------------------------------------------------------------------------

def test_save_then_load_gives_the_same_parameters_bit_for_bit(saved):
    model, directory = saved
    back = minilora.from_pretrained(directory, dtype="float64")
    assert type(back) is LlamaForCausalLM and back.config == model.config and not back.training
    assert same_parameters(model, back)
    tied = model.config.tie_word_embeddings
    assert (back.lm_head.weight is back.model.embed_tokens.weight) == tied
    np.testing.assert_array_equal(back(tokens())[0].data, model.eval()(tokens())[0].data)


def test_the_file_holds_transformers_keys_untransposed_and_lm_head_only_if_untied(saved):
    model, directory = saved
    tensors = tensors_of(directory)
    params = dict(model.named_parameters())
    tied = model.config.tie_word_embeddings
    assert set(tensors) == set(params) - ({"lm_head.weight"} if tied else set())
    for key, array in tensors.items():  # (out, in) in both: no transposes, even of a square one
        np.testing.assert_array_equal(array, params[key].data, err_msg=key)
    config = json.loads((directory / "config.json").read_text())
    kind = model.config.model_type
    assert config["model_type"] == kind and config["tie_word_embeddings"] is tied
    assert config["architectures"] == [{"llama": "LlamaForCausalLM",
                                        "qwen2": "Qwen2ForCausalLM"}[kind]]
    assert ("attention_bias" in config) == (kind == "llama")


def test_from_pretrained_returns_the_model_the_model_type_names(saved, tmp_path):
    _, directory = saved
    random_gpt().save_pretrained(tmp_path / "gpt2")
    assert type(minilora.from_pretrained(tmp_path / "gpt2")) is GPT
    assert type(LlamaForCausalLM.from_pretrained(directory)) is LlamaForCausalLM
    with pytest.raises(FileFormatError, match=r"model_type '(llama|qwen2)'"):
        GPT.from_pretrained(directory)
    with pytest.raises(FileFormatError, match="model_type 'gpt2'; minilora reads llama, qwen2"):
        LlamaForCausalLM.from_pretrained(tmp_path / "gpt2")
    rewrite_config(directory, model_type="mistral")
    with pytest.raises(FileFormatError, match="model_type 'mistral'; minilora reads gpt2, llama, "
                                              "qwen2"):
        minilora.from_pretrained(directory)


def test_the_dtype_asked_for_is_the_dtype_computed_in(saved):
    _, directory = saved
    back = minilora.from_pretrained(directory)  # float32 by default, as GPT.from_pretrained
    assert back.config.dtype == "float32"
    assert all(p.dtype == np.float32 for p in back.parameters())


def test_special_tokens_round_trip_and_take_transformers_defaults(tmp_path):
    """bos and eos change no number, but a merged model handed back keeps them; a Llama config
    without them means transformers' 1 and 2, a Qwen2 config None."""
    model = random_llama("llama", bos_token_id=5, eos_token_id=[6, 7])
    model.save_pretrained(tmp_path / "a")
    back = minilora.from_pretrained(tmp_path / "a")
    assert (back.config.bos_token_id, back.config.eos_token_id) == (5, [6, 7])
    for variant, expected in (("llama", (1, 2)), ("qwen2", (None, None))):
        random_llama(variant).save_pretrained(tmp_path / variant)
        config = json.loads((tmp_path / variant / "config.json").read_text())
        del config["bos_token_id"], config["eos_token_id"]
        (tmp_path / variant / "config.json").write_text(json.dumps(config))
        back = minilora.from_pretrained(tmp_path / variant).config
        assert (back.bos_token_id, back.eos_token_id) == expected, variant


@pytest.mark.parametrize("fields, shown", [
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope type 'yarn' is not implemented"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5}}, "rope type 'llama3'"),
    ({"use_sliding_window": True}, "use_sliding_window"),
    ({"layer_types": ["sliding_attention", "full_attention"]}, "layer_types"),
    ({"attention_dropout": 0.1}, "attention_dropout"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"quantization_config": {"quant_method": "bitsandbytes"}}, "quantization_config"),
    ({"architectures": ["LlamaForSequenceClassification"]}, "architectures"),
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
])
def test_a_field_minilora_does_not_implement_is_refused_naming_it(tmp_path, fields, shown):
    random_llama().save_pretrained(tmp_path)
    rewrite_config(tmp_path, **fields)
    with pytest.raises(FileFormatError, match=shown) as e:
        minilora.from_pretrained(tmp_path)
    assert "config.json" in str(e.value) and "\n" not in str(e.value)


def test_qwen2_refuses_the_bias_fields_it_does_not_have(tmp_path):
    random_llama("qwen2").save_pretrained(tmp_path)
    rewrite_config(tmp_path, mlp_bias=True)
    with pytest.raises(FileFormatError, match="mlp_bias: Qwen2 has no such field"):
        minilora.from_pretrained(tmp_path)


def test_llama_has_no_dropout_to_replace(saved):
    _, directory = saved
    assert minilora.from_pretrained(directory, dropout=0.0) is not None
    with pytest.raises(FileFormatError, match=r"dropout=0.1: minilora's (Llama|Qwen2) has no "
                                              r"dropout"):
        minilora.from_pretrained(directory, dropout=0.1)


def test_sizes_that_disagree_with_the_tensors_are_refused_before_allocating(tmp_path):
    random_llama().save_pretrained(tmp_path)
    for fields, shown in (({"num_hidden_layers": 10**9}, "missing tensors"),
                          ({"vocab_size": 10**9}, r"has shape \(23, 16\), the config implies"),
                          ({"num_key_value_heads": 4}, "k_proj.weight' has shape"),
                          ({"tie_word_embeddings": True}, "'lm_head.weight' differs from")):
        rewrite_config(tmp_path, **{**dict(num_hidden_layers=2, vocab_size=23,
                                           num_key_value_heads=2, tie_word_embeddings=False),
                                    **fields})
        with pytest.raises(FileFormatError, match=shown):
            minilora.from_pretrained(tmp_path)


def test_a_llamamodel_file_without_the_prefix_and_old_inv_freq_buffers_read_the_same(tmp_path):
    """Older checkpoints keep RoPE's ``inv_freq`` buffer; a LlamaModel's keys lack ``model.``."""
    model = random_llama("llama-tied")
    model.save_pretrained(tmp_path)
    tensors = {k.removeprefix("model."): v for k, v in tensors_of(tmp_path).items()}
    for i in range(2):
        tensors[f"layers.{i}.self_attn.rotary_emb.inv_freq"] = np.ones(2, np.float32)
    (tmp_path / "model.safetensors").write_bytes(safetensors.numpy.save(tensors))
    assert same_parameters(minilora.from_pretrained(tmp_path), model)


def test_a_tied_lm_head_in_the_file_is_read_only_if_equal(tmp_path):
    model = random_llama("qwen2-tied")
    model.save_pretrained(tmp_path)
    tensors = tensors_of(tmp_path)
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].copy()
    (tmp_path / "model.safetensors").write_bytes(safetensors.numpy.save(tensors))
    assert same_parameters(minilora.from_pretrained(tmp_path), model)
    tensors["lm_head.weight"][0, 0] += 1.0
    (tmp_path / "model.safetensors").write_bytes(safetensors.numpy.save(tensors))
    with pytest.raises(FileFormatError, match=r"differs from 'model\.embed_tokens\.weight'"):
        minilora.from_pretrained(tmp_path)


def test_a_bfloat16_checkpoint_is_read_exactly(tmp_path):
    from tests.hf.helpers import bfloat16_bits

    model = random_llama("llama")
    model.save_pretrained(tmp_path)
    raw = {k: ("BF16", v.shape, bfloat16_bits(v).tobytes())
           for k, v in tensors_of(tmp_path).items()}
    write_safetensors(tmp_path / "model.safetensors", raw, {"format": "pt"})
    back = dict(minilora.from_pretrained(tmp_path).named_parameters())
    for key, (_, shape, data) in raw.items():
        exact = (np.frombuffer(data, np.uint16).astype(np.uint32) << 16).view(np.float32)
        np.testing.assert_array_equal(back[key].data, exact.reshape(shape), err_msg=key)


def test_model_file_map_names_each_parameters_key_and_layout():
    """Data for a caller reading the files itself: GPT-2's Conv1D weights transposed, its lm_head
    the embedding; a Llama's keys its own names, nothing transposed, lm_head tied as configured."""
    gpt = hf.model_file_map(random_gpt())
    assert gpt["transformer.h.0.attn.c_proj.weight"] == hf.FileTensor(
        "transformer.h.0.attn.c_proj.weight", transposed=True)
    assert not gpt["transformer.h.0.ln_1.weight"].transposed
    assert gpt["lm_head.weight"] == hf.FileTensor("transformer.wte.weight", False,
                                                  tied_to="transformer.wte.weight")
    for variant in LLAMAS:
        model = random_llama(variant)
        files = hf.model_file_map(model)
        assert set(files) == {n for n, _ in model.named_parameters()} | {"lm_head.weight"}
        assert not any(f.transposed for f in files.values())
        tied = model.config.tie_word_embeddings
        assert files["lm_head.weight"].tied_to == ("model.embed_tokens.weight" if tied else None)
        assert all(f.key == n for n, f in files.items() if f.tied_to is None)
    assert llama.TRANSPOSED == qwen2.TRANSPOSED == ()


# ---- adapters ----------------------------------------------------------------------------------

ADAPTERS = {
    "q,v": LoRAConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]),
    "all-seven": LoRAConfig(r=2, lora_alpha=3, target_modules=SEVEN, bias="lora_only",
                            rank_pattern={"layers.1.mlp.down_proj": 3}),
    "all-linear-saved": LoRAConfig(r=2, target_modules="all-linear", use_rslora=True,
                                   modules_to_save=["model.norm"], bias="all"),
    "tied-lm_head": LoRAConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"],
                               ensure_weight_tying=True),
}


@pytest.mark.parametrize("name", sorted(ADAPTERS))
@pytest.mark.parametrize("variant", ["llama", "qwen2-tied"])
def test_an_adapter_round_trips_bit_for_bit_with_peft_keys(tmp_path, variant, name):
    model = adapted(random_llama(variant, "float64"), ADAPTERS[name])
    hf.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is False and config["task_type"] == "CAUSAL_LM"
    keys = set(tensors_of(tmp_path, "adapter_model.safetensors"))
    assert all(k.startswith("base_model.model.model.") or k.startswith("base_model.model.lm_head")
               for k in keys)
    layer = next(iter(dict(named_lora_layers(model))))
    assert f"base_model.model.{layer}.lora_A.weight" in keys
    base = random_llama(variant, "float64")
    hf.load_adapter(base, tmp_path)
    np.testing.assert_array_equal(base(tokens())[0].data, model.eval()(tokens())[0].data)
    ours, theirs = lora_state_dict(model), lora_state_dict(base)
    tie = llama.tied(model.config)  # a tied pair is named by the embedding, as PEFT names it
    assert all(np.array_equal(ours[k], theirs[tie.get(k, k)]) for k in ours)
    files = hf.adapter_file_map(model)
    assert set(files) == set(ours) and {f.key for f in files.values()} <= keys
    assert not any(f.transposed for f in files.values())


def test_all_linear_on_llama_adapts_the_seven_projections_and_not_lm_head():
    model = adapted(random_llama("llama"), LoRAConfig(target_modules="all-linear"))
    names = {n.rpartition(".")[2] for n, _ in named_lora_layers(model)}
    assert names == set(SEVEN) and type(model.lm_head).__name__ == "Linear"


def test_an_adapter_for_another_architecture_is_refused_and_the_model_left_as_it_was(tmp_path):
    hf.save_adapter(adapted(random_gpt(), LoRAConfig(r=2)), tmp_path)
    model = random_llama()
    before = {n: p.data.copy() for n, p in model.named_parameters()}
    with pytest.raises(FileFormatError, match="the adapter does not fit the model"):
        hf.load_adapter(model, tmp_path)
    assert not list(named_lora_layers(model))
    assert all(np.array_equal(p.data, before[n]) for n, p in model.named_parameters())
