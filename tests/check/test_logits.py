"""``check_logits`` without torch: minilora's own float32 forward is round-off, the base's logits
are diagnosed as the adapter left out, and every file that cannot be read is one clear error.
The same against PEFT's forward is in test_parity.py."""

from __future__ import annotations

import numpy as np
import pytest
import safetensors.numpy

from minilora import ConfigError, FileFormatError, hf
from minilora.check import check_logits
from minilora.lora import LoRAConfig, disable_adapter, named_lora_layers
from tests.hf.helpers import adapted, random_gpt, random_llama

IDS = np.random.default_rng(3).integers(0, 23, (2, 16))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("logits")
    hf.save_pretrained(random_gpt(), root / "base")
    model = adapted(random_gpt(), LoRAConfig(r=4, lora_alpha=8, target_modules=("c_attn", "c_fc")))
    hf.save_adapter(model, root / "adapter")
    return root, root / "base", root / "adapter", model.eval()


def _logits(model) -> np.ndarray:
    return model(IDS)[0].data


def test_minilora_float32_logits_are_round_off_in_either_file_format(files):
    root, base, adapter, model = files
    logits = _logits(model)
    safetensors.numpy.save_file({"logits": logits, "input_ids": IDS}, str(root / "l.safetensors"))
    np.save(root / "l.npy", logits)
    np.save(root / "ids.npy", IDS)
    for report in (check_logits(base, adapter, root / "l.safetensors"),
                   check_logits(base, adapter, root / "l.npy", root / "ids.npy")):
        assert {row.verdict for row in report.rows} == {"round-off"}
        assert len(report.rows) == IDS.size and report.exit_code == 0
        assert report.summary["tolerance"] == 1e-4


def test_the_base_models_logits_are_the_adapter_left_out(files, tmp_path):
    _, base, adapter, model = files
    with disable_adapter(model):
        np.save(tmp_path / "l.npy", _logits(model)[0])  # (T, V) with ids (T,)
    np.save(tmp_path / "ids.npy", IDS[0])
    report = check_logits(base, adapter, tmp_path / "l.npy", tmp_path / "ids.npy")
    assert {row.code for row in report.rows} == {"not-merged"} and report.exit_code == 1
    assert "base model's logits" in report.rows[0].diagnosis


def test_a_fault_in_one_layer_is_wrong_without_a_global_diagnosis(files, tmp_path):
    _, base, adapter, model = files
    layer = next(named_lora_layers(model))[1]
    kept = layer.lora_B.data
    layer.lora_B.data = kept * 3  # that layer's delta tripled, as a tripled scaling would
    try:
        np.save(tmp_path / "l.npy", _logits(model))
    finally:
        layer.lora_B.data = kept
    np.save(tmp_path / "ids.npy", IDS)
    report = check_logits(base, adapter, tmp_path / "l.npy", tmp_path / "ids.npy")
    assert report.exit_code == 1 and report.summary["diagnosis"] == ""
    assert any("--merged" in note for note in report.notes)


def test_logits_that_cannot_be_read_are_refused_with_one_clear_error(files, tmp_path):
    _, base, adapter, model = files
    logits = _logits(model)
    np.save(tmp_path / "ids.npy", IDS)
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    np.save(tmp_path / "short.npy", logits[:, :, :5])
    np.save(tmp_path / "l.npy", logits)
    np.save(tmp_path / "bad_ids.npy", IDS + 100)
    (tmp_path / "l.pt").write_bytes(b"\x80\x04")
    cases = {("obj.npy", "ids.npy"): "without pickle", ("short.npy", "ids.npy"): "expected",
             ("l.npy", "bad_ids.npy"): "vocabulary has 23", ("l.pt", "ids.npy"): "pickle",
             ("l.npy", "l.npy"): "must be integers", ("missing.npy", "ids.npy"): "missing"}
    for (name, ids), words in cases.items():
        with pytest.raises(FileFormatError, match=words):
            check_logits(base, adapter, tmp_path / name, tmp_path / ids)
    with pytest.raises(ConfigError, match="--input-ids"):
        check_logits(base, adapter, tmp_path / "l.npy")
    with pytest.raises(ConfigError, match="tolerance must be positive"):
        check_logits(base, adapter, tmp_path / "l.npy", tmp_path / "ids.npy", tolerance=0)


def test_a_llamas_logits_are_checked_by_the_same_code(tmp_path):
    hf.save_pretrained(random_llama("qwen2"), tmp_path / "base")
    model = adapted(random_llama("qwen2"), LoRAConfig(r=4, lora_alpha=8,
                                                      target_modules=("q_proj", "v_proj")))
    hf.save_adapter(model, tmp_path / "adapter")
    safetensors.numpy.save_file({"logits": _logits(model.eval()), "input_ids": IDS},
                                str(tmp_path / "l.safetensors"))
    report = check_logits(tmp_path / "base", tmp_path / "adapter", tmp_path / "l.safetensors")
    assert {row.verdict for row in report.rows} == {"round-off"}
    with disable_adapter(model):
        safetensors.numpy.save_file({"logits": _logits(model), "input_ids": IDS},
                                    str(tmp_path / "l.safetensors"))
    report = check_logits(tmp_path / "base", tmp_path / "adapter", tmp_path / "l.safetensors")
    assert {row.code for row in report.rows} == {"not-merged"}
