"""Damaged and hostile Hugging Face directories and PEFT adapters: every one is refused with a
MiniLoRAError naming a file in it, or (when the damage leaves a valid file, e.g. a flipped bit in
tensor data, which these formats do not checksum) read into a complete model; never another
exception, never a half-loaded model, never an allocation sized by the config before the sizes
are checked against the files. Every case runs on each architecture minilora reads: GPT-2, Llama
(untied) and Qwen2 (tied).
"""

from __future__ import annotations

import json
import shutil
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minilora import FileFormatError, MiniLoRAError, hf
from minilora.lora import LoRAConfig, lora_state_dict, named_lora_layers
from tests.hf.helpers import adapted, random_gpt, random_llama, tokens
from tests.reliability.conftest import COUNTS

# architecture -> (a random base model, an adapter config that uses every kind of adapter tensor)
ARCHS = {
    "gpt2": (random_gpt, LoRAConfig(r=2, lora_alpha=4, target_modules=["c_attn", "c_proj"],
                                    bias="lora_only", modules_to_save=["ln_f"],
                                    rank_pattern={"h.1.attn.c_attn": 3})),
    "llama": (lambda: random_llama("llama"),
              LoRAConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"],
                         modules_to_save=["model.norm", "lm_head"],
                         rank_pattern={"layers.1.self_attn.q_proj": 3})),
    "qwen2": (lambda: random_llama("qwen2-tied"),
              LoRAConfig(r=2, lora_alpha=4, target_modules=["k_proj", "gate_proj"],
                         bias="lora_only", modules_to_save=["lm_head"], ensure_weight_tying=True)),
}
MODEL_FILES = ("config.json", "model.safetensors")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def examples(n: int):
    return settings(max_examples=n, deadline=None, suppress_health_check=[
        HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module", params=sorted(ARCHS))
def good(request, tmp_path_factory):
    """root/{model, adapter}: a Hugging Face directory and a PEFT adapter for it; root.arch
    names the architecture."""
    root = tmp_path_factory.mktemp(request.param)
    make, adapter = ARCHS[request.param]
    make().save_pretrained(root / "model")
    hf.save_adapter(adapted(make(), adapter), root / "adapter")
    (root / "arch").write_text(request.param)
    return root


def base_of(good):
    """A fresh random base model of ``good``'s architecture."""
    return ARCHS[(good / "arch").read_text()][0]()


def copy_with(good_dir, out, name: str, data: bytes):
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(good_dir, out)
    (out / name).write_bytes(data)
    return out


def snapshot(model) -> dict:
    return {"params": {n: (p.data.copy(), p.requires_grad) for n, p in model.named_parameters()},
            "modules": [(n, type(m).__name__) for n, m in model.named_modules()],
            "lora_config": "lora_config" in model.__dict__}


def same(a: dict, b: dict) -> bool:
    return a["modules"] == b["modules"] and a["lora_config"] == b["lora_config"] and \
        a["params"].keys() == b["params"].keys() and all(
            np.array_equal(a["params"][k][0], b["params"][k][0])
            and a["params"][k][1] == b["params"][k][1] for k in a["params"])


def outcome_of_model(directory) -> str:
    """'refused' or 'read'; anything else fails. A read model is whole: every parameter finite,
    of the dtype asked for, and it runs."""
    COUNTS["damaged Hugging Face files"] += 1
    try:
        model = hf.from_pretrained(directory)
    except MiniLoRAError as e:
        assert str(directory) in str(e), f"the message does not name {directory}: {e}"
        return "refused"
    assert all(p.dtype == np.float32 and np.all(np.isfinite(p.data)) for p in model.parameters())
    length = min(4, getattr(model.config, "block_size", 4))
    logits, _ = model(tokens(vocab=model.config.vocab_size, t=length))
    assert logits.shape[-1] == model.config.vocab_size
    return "read"


def outcome_of_adapter(directory, model) -> str:
    """'refused' (``model`` exactly as it was) or 'read' (a whole adapter); nothing else."""
    COUNTS["damaged Hugging Face files"] += 1
    before = snapshot(model)
    try:
        hf.load_adapter(model, directory)
    except MiniLoRAError as e:
        assert str(directory) in str(e), f"the message does not name {directory}: {e}"
        assert same(before, snapshot(model)), "a refused adapter changed the model"
        return "refused"
    assert list(named_lora_layers(model))
    assert all(np.all(np.isfinite(v)) for v in lora_state_dict(model).values())
    return "read"


# ---- byte damage ----------------------------------------------------------------------------

@examples(40)
@given(which=st.sampled_from(MODEL_FILES + ADAPTER_FILES), data=st.data())
def test_a_truncated_file_is_refused(good, tmp_path, which, data):
    kind = "model" if which in MODEL_FILES else "adapter"
    raw = (good / kind / which).read_bytes()
    n = data.draw(st.integers(0, len(raw) - 1), label="length")
    out = copy_with(good / kind, tmp_path / kind, which, raw[:n])
    outcome = outcome_of_model(out) if kind == "model" else outcome_of_adapter(out, base_of(good))
    if which.endswith(".safetensors") or n < len(raw.rstrip()):  # JSON may lose only a newline
        assert outcome == "refused"


@examples(60)
@given(which=st.sampled_from(MODEL_FILES + ADAPTER_FILES), data=st.data())
def test_a_flipped_bit_is_refused_or_gives_a_whole_model(good, tmp_path, which, data):
    kind = "model" if which in MODEL_FILES else "adapter"
    raw = bytearray((good / kind / which).read_bytes())
    bit = data.draw(st.integers(0, 8 * len(raw) - 1), label="bit")
    raw[bit // 8] ^= 1 << (bit % 8)
    out = copy_with(good / kind, tmp_path / kind, which, bytes(raw))
    outcome = outcome_of_model(out) if kind == "model" else outcome_of_adapter(out, base_of(good))
    if which.endswith(".safetensors") and bit // 8 < 8:  # the header length
        assert outcome == "refused"


@examples(30)
@given(which=st.sampled_from(("model.safetensors", "adapter_model.safetensors")),
       length=st.one_of(st.integers(0, 2**64 - 1), st.sampled_from([2**64 - 1, 2**63, 10**9])))
def test_a_wrong_or_oversized_header_length_is_refused(good, tmp_path, which, length):
    kind = "model" if which == "model.safetensors" else "adapter"
    raw = (good / kind / which).read_bytes()
    if length == struct.unpack("<Q", raw[:8])[0]:
        return
    out = copy_with(good / kind, tmp_path / kind, which, struct.pack("<Q", length) + raw[8:])
    assert (outcome_of_model(out) if kind == "model"
            else outcome_of_adapter(out, base_of(good))) == "refused"


# ---- hostile JSON and sizes -------------------------------------------------------------------

JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
                    | st.text(max_size=8), lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=8)


@examples(80)
@given(kind=st.sampled_from(("model", "adapter")), data=st.data())
def test_a_config_field_given_any_json_value_is_refused_or_read_whole(good, tmp_path, kind, data):
    name = "config.json" if kind == "model" else "adapter_config.json"
    config = json.loads((good / kind / name).read_text())
    field = data.draw(st.sampled_from(sorted(config) + ["an_unknown_field"]), label="field")
    config[field] = data.draw(JSON, label="value")
    out = copy_with(good / kind, tmp_path / kind, name, json.dumps(config).encode())
    outcome_of_model(out) if kind == "model" else outcome_of_adapter(out, base_of(good))


# the fields that set tensor shapes, each shape changing with the field (so only the true sizes
# fit the tensors): GPT-2's n_inner of 64 is its default, 4 n_embd
SIZES = {"gpt2": {"n_layer": st.integers(1, 10**6), "n_embd": st.integers(1, 10**6),
                  "vocab_size": st.integers(1, 10**9), "n_positions": st.integers(1, 10**9),
                  "n_inner": st.integers(1, 10**9)},
         "llama": {"num_hidden_layers": st.integers(1, 10**6),
                   "hidden_size": st.integers(1, 10**6), "vocab_size": st.integers(1, 10**9),
                   "intermediate_size": st.integers(1, 10**9), "head_dim": st.integers(1, 10**6)}}


@examples(40)
@given(data=st.data())
def test_config_sizes_are_checked_against_the_tensors_before_anything_is_allocated(good,
                                                                                  tmp_path, data):
    """Any sizes a config may claim (a width the heads do not divide or not): refused from the
    headers, or (the true sizes) read."""
    config = json.loads((good / "model" / "config.json").read_text())
    fields = SIZES["gpt2" if config["model_type"] == "gpt2" else "llama"]
    sizes = data.draw(st.fixed_dictionaries({}, optional=fields), label="sizes")
    true = {k: config.get(k) for k in sizes}
    config.update(sizes)
    out = copy_with(good / "model", tmp_path / "model", "config.json", json.dumps(config).encode())
    outcome = outcome_of_model(out)
    assert outcome == ("read" if sizes == true or sizes == {**true, "n_inner": 64} else "refused")


@examples(30)
@given(data=st.data())
def test_a_hostile_shard_index_is_refused(good, tmp_path, data):
    """An index that names files outside the directory, misses keys, or maps them wrongly."""
    out = tmp_path / "sharded"
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(good / "model", out)
    keys = sorted(json.loads(_header(out / "model.safetensors")))
    keys.remove("__metadata__")
    (out / "model.safetensors").rename(out / "model-00001-of-00001.safetensors")
    names = st.sampled_from(["model-00001-of-00001.safetensors", "../model.safetensors",
                             "/tmp/x.safetensors", "pytorch_model.bin", "", "missing.safetensors",
                             "sub/model.safetensors"])
    weight_map = {k: data.draw(names, label=k) for k in keys}
    if data.draw(st.booleans(), label="drop a key"):
        weight_map.pop(keys[0])
    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    good_map = set(weight_map.values()) == {"model-00001-of-00001.safetensors"} and \
        len(weight_map) == len(keys)
    assert outcome_of_model(out) == ("read" if good_map else "refused")


def _header(path) -> str:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return raw[8:8 + n].decode()


def test_refusals_name_the_file_in_one_line(good, tmp_path):
    out = copy_with(good / "adapter", tmp_path / "a", "adapter_config.json", b'{"peft_type": 1}')
    with pytest.raises(FileFormatError) as e:
        hf.load_adapter(random_gpt(), out)
    assert "adapter_config.json" in str(e.value) and "\n" not in str(e.value)


class _Marker:
    """Unpickling this writes a file: proof, if it appears, that a pickle was opened."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_pickle_checkpoint_is_never_opened(good, tmp_path, monkeypatch):
    import pickle

    marker = tmp_path / "opened"
    for kind, name in (("model", "pytorch_model.bin"), ("adapter", "adapter_model.bin")):
        out = tmp_path / kind
        shutil.copytree(good / kind, out)
        (out / ("model.safetensors" if kind == "model" else "adapter_model.safetensors")).unlink()
        (out / name).write_bytes(pickle.dumps(_Marker(marker)))
    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, lambda *a, **k: pytest.fail("pickle was called"))
    with pytest.raises(FileFormatError, match="pickle"):
        hf.from_pretrained(tmp_path / "model")
    with pytest.raises(FileFormatError, match="pickle"):
        hf.load_adapter(base_of(good), tmp_path / "adapter")
    assert not marker.exists()
    hf.load_adapter(hf.from_pretrained(good / "model"), good / "adapter")  # good files: no pickle
