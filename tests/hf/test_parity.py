"""Parity with the real libraries (transformers 5.24, PEFT 0.21, torch 2.13): a random tiny
``GPT2LMHeadModel`` saved by ``save_pretrained`` and read by minilora, and back; PEFT adapters with
random non-zero A, B, biases and saved modules, read by minilora and back, for several configs;
minilora's merge written as a Hugging Face model against PEFT's ``merge_and_unload()``.

Skips without the parity extra (``pip install -e ".[parity]"``); CI installs it. The worst relative
error per direction and dtype is printed at the end of the run ("parity figures").
"""

from __future__ import annotations

import numpy as np
import pytest
import safetensors.numpy

from minilora import GPT, ConfigError, FileFormatError, hf
from minilora.hf import gpt2
from minilora.lora import (
    LoRAConfig,
    get_nb_trainable_parameters,
    merge_and_unload,
    named_lora_layers,
)
from tests.extras import need
from tests.hf.helpers import (
    adapted,
    assert_close,
    assert_same_adapter_files,
    peft_parameter_counts,
    random_gpt,
    random_peft_model,
    tokens,
)

torch, transformers, peft = need("torch", "transformers", "peft")
DTYPES = ("float64", "float32")
TORCH = {"float64": torch.float64, "float32": torch.float32}

PEFT_CONFIGS = {
    "c_attn": {"r": 4, "lora_alpha": 8},
    "patterns-lora_only": {"r": 2, "lora_alpha": 4, "target_modules": ["c_attn", "c_proj", "c_fc"],
                           "rank_pattern": {"h.1.attn.c_attn": 3, r"h\.0\.mlp\.c_fc": 5},
                           "alpha_pattern": {"c_fc": 6}, "bias": "lora_only"},
    "rslora-all-linear-bias_all": {"r": 3, "lora_alpha": 5, "target_modules": "all-linear",
                                   "use_rslora": True, "bias": "all"},
    "regex-dropout": {"r": 2, "target_modules": r".*\.h\.1\.mlp\.c_(fc|proj)",
                      "lora_dropout": 0.1, "init_lora_weights": "gaussian"},
    "modules_to_save-bias_all": {"r": 2, "target_modules": ["c_attn"],
                                 "modules_to_save": ["ln_f", "h.0.mlp"], "bias": "all"},
    "tied-lm_head": {"r": 2, "target_modules": ["c_attn"], "modules_to_save": ["lm_head"],
                     "ensure_weight_tying": True},
}


pytestmark = pytest.mark.usefixtures("quiet_libraries")


def hf_gpt2(dtype: str, seed: int = 0, **config):
    """A random tiny GPT2LMHeadModel in eval mode, LayerNorms random too."""
    torch.manual_seed(seed)
    fields = {"vocab_size": 23, "n_positions": 16, "n_embd": 16, "n_layer": 2, "n_head": 4,
              "bos_token_id": None, "eos_token_id": None, **config}
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**fields)).to(TORCH[dtype])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".ln_" in name:
                p.add_(torch.randn_like(p) * 0.3)
    return model.eval()


def logits_of(model, idx) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(idx)).logits.numpy()


@pytest.fixture(scope="module", params=DTYPES)
def base(request, tmp_path_factory):
    """(dtype, a directory holding a random GPT2LMHeadModel as transformers saves it)."""
    directory = tmp_path_factory.mktemp(f"hf-{request.param}")
    hf_gpt2(request.param).save_pretrained(directory)
    return request.param, directory


def load_hf(directory, dtype):
    return transformers.GPT2LMHeadModel.from_pretrained(directory, dtype=TORCH[dtype]).eval()


# ---- models ---------------------------------------------------------------------------------

def test_a_transformers_gpt2_gives_the_same_logits_in_minilora(base):
    dtype, directory = base
    idx = tokens()
    ours = GPT.from_pretrained(directory, dtype=dtype)
    assert_close(ours(idx)[0].data, logits_of(load_hf(directory, dtype), idx), dtype,
                 "HF -> minilora")


@pytest.mark.parametrize("dtype", DTYPES)
def test_minilora_saves_what_gpt2lmheadmodel_loads_with_the_same_logits(tmp_path, dtype):
    model = random_gpt(dtype, n_inner=24, layer_norm_epsilon=1e-4)
    model.save_pretrained(tmp_path)
    theirs, info = transformers.GPT2LMHeadModel.from_pretrained(
        tmp_path, dtype=TORCH[dtype], output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert theirs.config.n_inner == 24 and theirs.config.layer_norm_epsilon == 1e-4
    idx = tokens()
    assert_close(logits_of(theirs.eval(), idx), model.eval()(idx)[0].data, dtype, "minilora -> HF")


def test_gelu_pytorch_tanh_and_old_style_files_read_the_same(tmp_path):
    theirs = hf_gpt2("float64", activation_function="gelu_pytorch_tanh")
    theirs.save_pretrained(tmp_path)
    idx = tokens()
    ours, _ = GPT.from_pretrained(tmp_path, dtype="float64")(idx)
    assert_close(ours.data, logits_of(theirs, idx), "float64", "HF -> minilora")


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
def test_half_precision_checkpoints_are_read_exactly(tmp_path, half):
    theirs = hf_gpt2("float32").to(half)
    theirs.save_pretrained(tmp_path)
    ours = dict(GPT.from_pretrained(tmp_path, dtype="float32").named_parameters())
    for name, p in theirs.named_parameters():
        if name == "lm_head.weight":
            continue
        exact = p.detach().to(torch.float32).numpy()
        np.testing.assert_array_equal(gpt2.to_file(name, ours[name].data), exact, err_msg=name)


def test_a_sharded_checkpoint_reads_the_same(tmp_path):
    theirs = hf_gpt2("float64")
    theirs.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    idx = tokens()
    ours, _ = GPT.from_pretrained(tmp_path, dtype="float64")(idx)
    assert_close(ours.data, logits_of(theirs, idx), "float64", "HF -> minilora")


def test_every_gpt2config_field_is_mapped_fixed_or_changes_no_logit():
    known = set(gpt2.MAPPED) | set(gpt2.FIXED) | set(gpt2.IGNORED)
    fields = set(transformers.GPT2Config.__dataclass_fields__) - set(
        transformers.PreTrainedConfig.__dataclass_fields__)
    assert fields <= known, f"GPT2Config fields minilora does not handle: {fields - known}"
    defaults = transformers.GPT2Config()
    for name, default in {**gpt2.MAPPED, **{k: v[0] for k, v in gpt2.FIXED.items()}}.items():
        if hasattr(defaults, name) and name != "quantization_config":
            assert getattr(defaults, name) == default, name


# ---- PEFT adapters --------------------------------------------------------------------------

def peft_model(directory, dtype, config: dict, seed=0):
    """get_peft_model on the base in ``directory`` with every trainable tensor made random."""
    return random_peft_model(load_hf(directory, dtype), config, seed)


@pytest.mark.parametrize("name", sorted(PEFT_CONFIGS))
def test_a_peft_adapter_gives_the_same_logits_in_minilora(base, tmp_path, name):
    dtype, directory = base
    theirs = peft_model(directory, dtype, PEFT_CONFIGS[name])
    theirs.save_pretrained(tmp_path)
    ours = hf.load_adapter(GPT.from_pretrained(directory, dtype=dtype), tmp_path)
    idx = tokens()
    assert_close(ours(idx)[0].data, logits_of(theirs, idx), dtype, "PEFT -> minilora")
    assert get_nb_trainable_parameters(hf.load_adapter(
        GPT.from_pretrained(directory, dtype=dtype), tmp_path, is_trainable=True)) == \
        peft_parameter_counts(theirs)


@pytest.mark.parametrize("name", sorted(PEFT_CONFIGS))
def test_minilora_saves_the_adapter_peft_saves_and_peft_loads_it(base, tmp_path, name):
    dtype, directory = base
    config = LoRAConfig.from_peft({"peft_type": "LORA", **PEFT_CONFIGS[name]})
    ours = adapted(GPT.from_pretrained(directory, dtype=dtype), config)
    hf.save_adapter(ours, tmp_path / "ours", base_model_name_or_path=str(directory))
    theirs = peft.PeftModel.from_pretrained(load_hf(directory, dtype), tmp_path / "ours").eval()
    idx = tokens()
    assert_close(logits_of(theirs, idx), ours.eval()(idx)[0].data, dtype, "minilora -> PEFT")
    # the same files PEFT writes for the same adapter: keys, shapes, dtypes and every field
    peft_model(directory, dtype, PEFT_CONFIGS[name]).save_pretrained(tmp_path / "peft")
    assert_same_adapter_files(tmp_path / "ours", tmp_path / "peft", str(directory),
                              bias_copies=config.bias == "all" and bool(config.modules_to_save))


@pytest.mark.parametrize("name", sorted(PEFT_CONFIGS))
def test_merging_in_minilora_equals_peft_merge_and_unload(base, tmp_path, name):
    dtype, directory = base
    theirs = peft_model(directory, dtype, PEFT_CONFIGS[name])
    theirs.save_pretrained(tmp_path / "adapter")
    ours = hf.load_adapter(GPT.from_pretrained(directory, dtype=dtype), tmp_path / "adapter")
    merge_and_unload(ours).save_pretrained(tmp_path / "merged")
    assert not list(named_lora_layers(ours))
    merged = {k: v.numpy() for k, v in theirs.merge_and_unload().state_dict().items()}
    written = safetensors.numpy.load((tmp_path / "merged" / "model.safetensors").read_bytes())
    assert set(written) == set(merged) - {"lm_head.weight"}
    for key, value in written.items():
        assert_close(value, merged[key], dtype, "merged in minilora == PEFT merge_and_unload")
    idx = tokens()
    assert_close(GPT.from_pretrained(tmp_path / "merged", dtype=dtype)(idx)[0].data,
                 logits_of(theirs, idx), dtype, "merged in minilora == PEFT merge_and_unload")


def test_the_peft_field_table_is_peft_0_21s():
    """Every LoraConfig field is mapped, descriptive or refused, with PEFT's own default; the
    JSON minilora writes has exactly the fields PEFT's save_pretrained writes."""
    from minilora.lora.peft_config import (
        DESCRIPTIVE,
        MAPPED,
        MINILORA_ONLY,
        PEFT_VERSION,
        REFUSED,
        peft_dict,
    )

    assert peft.__version__ == PEFT_VERSION
    defaults = peft.LoraConfig()
    fields = {f for f in defaults.__dataclass_fields__ if f != "runtime_config"}  # not saved
    table = {**MAPPED, **{k: v[0] for k, v in DESCRIPTIVE.items()}, **REFUSED}
    assert set(table) == fields
    for name, default in table.items():
        value = getattr(defaults, name)
        assert (value.value if hasattr(value, "value") else value) == default, name
    assert not set(MAPPED) & set(REFUSED) and not set(MAPPED) & set(DESCRIPTIVE)
    assert set(LoRAConfig.__dataclass_fields__) == set(MAPPED) | set(MINILORA_ONLY)
    assert not set(MINILORA_ONLY) & fields
    written = defaults.to_dict()
    written.pop("runtime_config", None)
    assert set(peft_dict(LoRAConfig())) == set(written)


def test_loraconfig_reads_peft_own_config_objects():
    theirs = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["c_fc", "c_attn"],
                             task_type="CAUSAL_LM", use_rslora=True, init_lora_weights="gaussian",
                             rank_pattern={"c_fc": 2})
    ours = LoRAConfig.from_peft(theirs.to_dict())
    assert ours == LoRAConfig(r=4, lora_alpha=16, target_modules=["c_attn", "c_fc"],
                              task_type="CAUSAL_LM", use_rslora=True,
                              init_lora_weights="gaussian", rank_pattern={"c_fc": 2})
    with pytest.raises(ConfigError, match="lora_bias"):
        LoRAConfig.from_peft(peft.LoraConfig(lora_bias=True).to_dict())
    assert LoRAConfig.from_peft(peft.LoraConfig(use_dora=True).to_dict()).use_dora
    assert peft.LoraConfig(**{k: v for k, v in ours.to_peft().items()
                              if k not in ("peft_type", "peft_version")}).r == 4


@pytest.mark.parametrize("config", [{"modules_to_save": ["lm_head"]},
                                    {"modules_to_save": ["wte"], "ensure_weight_tying": True}])
def test_an_adapter_peft_untied_is_refused_naming_the_tie(base, tmp_path, config):
    """PEFT trains lm_head apart from wte in both (its logits then differ from any tied model)."""
    dtype, directory = base
    peft_model(directory, dtype, {"r": 2, **config}).save_pretrained(tmp_path)
    model = GPT.from_pretrained(directory, dtype=dtype)
    with pytest.raises(FileFormatError, match="which GPT-2 ties to it"):
        hf.load_adapter(model, tmp_path)
