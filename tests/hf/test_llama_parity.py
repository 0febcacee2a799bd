"""Llama and Qwen2 files with the real libraries (transformers 5.24, PEFT 0.21): tiny random
``LlamaForCausalLM`` and ``Qwen2ForCausalLM`` (fewer key/value heads than query heads, tied and
untied) saved by ``save_pretrained`` and read by ``minilora.from_pretrained``, and back through
``AutoModelForCausalLM``; PEFT adapters with random non-zero A, B, biases and saved modules, read
by minilora and back; minilora's merge against PEFT's ``merge_and_unload()``.

Logits within 1e-10 relative in float64, with transformers' two float32 steps (RMSNorm's
statistics, the rotary tables) computed in float64 by ``in_float64``
(tests/models/test_llama_parity.py says why), and within 1e-5 in float32 with transformers as
shipped. Skips without the parity extra (``pip install -e ".[parity]"``); CI installs it.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import safetensors.numpy

import minilora
from minilora import hf
from minilora.lora import LoRAConfig, get_nb_trainable_parameters, merge_and_unload
from tests.extras import need
from tests.hf.helpers import (
    adapted,
    assert_close,
    assert_same_adapter_files,
    peft_parameter_counts,
    random_llama,
    random_peft_model,
    tokens,
)

torch, transformers, peft = need("torch", "transformers", "peft")
from tests.models.test_llama_parity import VOCAB, hf_model, in_float64  # noqa: E402  (needs torch)

TORCH = {"float64": torch.float64, "float32": torch.float32}
# the variants of tests/models/test_llama_parity.py: GQA and MQA, tied and untied, biases
VARIANTS = ("llama-untied", "llama-tied-mqa-biases", "qwen2-untied", "qwen2-tied")
SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PEFT_CONFIGS = {
    "q,v": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
    "seven-patterns-lora_only": {"r": 2, "lora_alpha": 4, "target_modules": SEVEN,
                                 "rank_pattern": {"layers.1.mlp.down_proj": 3},
                                 "alpha_pattern": {"gate_proj": 6}, "bias": "lora_only"},
    "all-linear-rslora-bias_all": {"r": 3, "lora_alpha": 5, "target_modules": "all-linear",
                                   "use_rslora": True, "bias": "all"},
    "norm-suffix-saved": {"r": 2, "target_modules": ["k_proj"], "modules_to_save": ["norm"]},
    "lm_head-saved": {"r": 2, "target_modules": ["o_proj"], "modules_to_save": ["lm_head"]},
}


pytestmark = pytest.mark.usefixtures("quiet_libraries")


def idx() -> np.ndarray:
    return tokens(2, 9, vocab=VOCAB, seed=3)


def logits_of(model, dtype: str) -> np.ndarray:
    """transformers' (or PEFT's) logits; in float64 with the float32 casts computed in float64."""
    if dtype == "float64":
        in_float64(model)
    with torch.no_grad():
        return model(torch.from_numpy(idx())).logits.numpy()


def load_hf(directory, dtype: str):
    return transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=TORCH[dtype]).eval()


@pytest.fixture(scope="module", params=[(v, d) for v in VARIANTS for d in TORCH],
                ids=lambda p: f"{p[0]}-{p[1]}")
def base(request, tmp_path_factory):
    """(variant, dtype, a directory holding the random model as transformers saves it)."""
    variant, dtype = request.param
    directory = tmp_path_factory.mktemp(f"{variant}-{dtype}")
    hf_model(variant, TORCH[dtype]).save_pretrained(directory)
    return variant, dtype, directory


# ---- models ------------------------------------------------------------------------------------

def test_a_transformers_checkpoint_gives_the_same_logits_in_minilora(base):
    variant, dtype, directory = base
    ours = minilora.from_pretrained(directory, dtype=dtype)
    assert type(ours).__name__ == "LlamaForCausalLM" and ours.config.model_type in variant
    assert ours.config.tie_word_embeddings == ("-tied" in variant)
    assert_close(ours(idx())[0].data, logits_of(load_hf(directory, dtype), dtype), dtype,
                 "HF -> minilora")


@pytest.mark.parametrize("dtype", TORCH)
@pytest.mark.parametrize("variant", ["llama", "llama-tied", "qwen2", "qwen2-tied"])
def test_minilora_saves_what_automodel_loads_with_the_same_logits(tmp_path, variant, dtype):
    model = random_llama(variant, dtype, vocab_size=VOCAB, num_key_value_heads=1, head_dim=6,
                         rope_theta=5e5, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=[2, 3])
    model.save_pretrained(tmp_path / "ours")
    theirs, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "ours", dtype=TORCH[dtype], output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert type(theirs).__name__ == {"llama": "LlamaForCausalLM",
                                     "qwen2": "Qwen2ForCausalLM"}[model.config.model_type]
    assert_close(logits_of(theirs.eval(), dtype), model.eval()(idx())[0].data, dtype,
                 "minilora -> HF")
    # config.json is the one transformers writes for the model it loaded
    theirs.save_pretrained(tmp_path / "theirs")
    mine, written = (json.loads((tmp_path / d / "config.json").read_text())
                     for d in ("ours", "theirs"))
    written.pop("transformers_version")
    assert mine == written


def test_a_sharded_checkpoint_reads_the_same(tmp_path):
    theirs = hf_model("qwen2-untied")
    theirs.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert_close(minilora.from_pretrained(tmp_path, dtype="float64")(idx())[0].data,
                 logits_of(theirs, "float64"), "float64", "HF -> minilora")


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("variant", ["llama-untied", "qwen2-tied"])
def test_half_precision_checkpoints_are_read_exactly(tmp_path, variant, half):
    theirs = hf_model(variant, torch.float32).to(half)
    theirs.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == str(half)[6:]
    ours = minilora.from_pretrained(tmp_path)  # computes in float32, as asked
    assert ours.config.dtype == "float32"
    mine = dict(ours.named_parameters())
    for name, p in theirs.named_parameters():
        np.testing.assert_array_equal(mine[name].data, p.detach().to(torch.float32).numpy(),
                                      err_msg=name)


# ---- PEFT adapters -----------------------------------------------------------------------------

def peft_config(name: str, variant: str) -> dict:
    config = copy.deepcopy(PEFT_CONFIGS[name])  # PEFT rewrites the lists it is given
    if name == "lm_head-saved" and "-tied" in variant:
        config["ensure_weight_tying"] = True  # tied: PEFT keeps the tie only when asked
    return config


def peft_model(directory, dtype: str, config: dict, seed=0):
    """get_peft_model on the base in ``directory`` with every trainable tensor made random."""
    return random_peft_model(load_hf(directory, dtype), config, seed)


@pytest.mark.parametrize("name", sorted(PEFT_CONFIGS))
def test_a_peft_adapter_gives_the_same_logits_in_minilora(base, tmp_path, name):
    variant, dtype, directory = base
    theirs = peft_model(directory, dtype, peft_config(name, variant))
    theirs.save_pretrained(tmp_path)
    ours = hf.load_adapter(minilora.from_pretrained(directory, dtype=dtype), tmp_path)
    assert_close(ours(idx())[0].data, logits_of(theirs, dtype), dtype, "PEFT -> minilora")
    assert get_nb_trainable_parameters(hf.load_adapter(
        minilora.from_pretrained(directory, dtype=dtype), tmp_path, is_trainable=True)) == \
        peft_parameter_counts(theirs)


@pytest.mark.parametrize("name", sorted(PEFT_CONFIGS))
def test_minilora_saves_the_adapter_peft_saves_and_peft_loads_it(base, tmp_path, name):
    variant, dtype, directory = base
    config = peft_config(name, variant)
    ours = adapted(minilora.from_pretrained(directory, dtype=dtype),
                   LoRAConfig.from_peft({"peft_type": "LORA", **config}))
    hf.save_adapter(ours, tmp_path / "ours", base_model_name_or_path=str(directory))
    theirs = peft.PeftModel.from_pretrained(load_hf(directory, dtype), tmp_path / "ours").eval()
    assert_close(logits_of(theirs, dtype), ours.eval()(idx())[0].data, dtype, "minilora -> PEFT")
    mine_json = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert mine_json["fan_in_fan_out"] is False
    if name == "norm-suffix-saved":  # PEFT's plain suffix "norm" would match all five RMSNorms,
        # minilora's dotted one model.norm alone: written by full name, so PEFT reads the same
        assert mine_json["modules_to_save"] == ["model.norm"]
        return
    # the same files PEFT writes for the same adapter: keys (PEFT's names for Llama), shapes,
    # dtypes, and every field of the config
    peft_model(directory, dtype, config).save_pretrained(tmp_path / "peft")
    assert_same_adapter_files(tmp_path / "ours", tmp_path / "peft", str(directory))


@pytest.mark.parametrize("name", sorted(PEFT_CONFIGS))
def test_merging_in_minilora_equals_peft_merge_and_unload(base, tmp_path, name):
    variant, dtype, directory = base
    theirs = peft_model(directory, dtype, peft_config(name, variant))
    theirs.save_pretrained(tmp_path / "adapter")
    ours = hf.load_adapter(minilora.from_pretrained(directory, dtype=dtype), tmp_path / "adapter")
    merge_and_unload(ours).save_pretrained(tmp_path / "merged")
    merged = {k: v.numpy() for k, v in theirs.merge_and_unload().state_dict().items()}
    written = safetensors.numpy.load((tmp_path / "merged" / "model.safetensors").read_bytes())
    tied = "-tied" in variant
    assert set(written) == set(merged) - ({"lm_head.weight"} if tied else set())
    for key, value in written.items():
        assert_close(value, merged[key], dtype, "merged in minilora == PEFT merge_and_unload")
    assert_close(minilora.from_pretrained(tmp_path / "merged", dtype=dtype)(idx())[0].data,
                 logits_of(theirs, dtype), dtype, "merged in minilora == PEFT merge_and_unload")


def test_all_linear_picks_the_layers_peft_picks(base):
    """PEFT's "all-linear" on Llama: the seven projections of every layer, never lm_head."""
    _, dtype, directory = base
    theirs = peft.get_peft_model(load_hf(directory, dtype), peft.LoraConfig(
        task_type="CAUSAL_LM", target_modules="all-linear"))
    peft_layers = sorted(n.removeprefix("base_model.model.") for n, m in theirs.named_modules()
                         if isinstance(m, peft.tuners.lora.LoraLayer))
    ours = adapted(minilora.from_pretrained(directory, dtype=dtype),
                   LoRAConfig(target_modules="all-linear"))
    from minilora.lora import named_lora_layers

    assert sorted(n for n, _ in named_lora_layers(ours)) == peft_layers
    assert len(peft_layers) == 2 * len(SEVEN)
