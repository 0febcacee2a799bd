"""``check_merge`` on files minilora writes (no torch needed): correct merges in each dtype pass,
every kind of broken merge is WRONG on exactly the broken layer with its diagnosis, and the rest
of what a merged directory can get wrong is named. The same against files PEFT and transformers
write is in test_parity.py."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minilora import FileFormatError, hf
from minilora.check import check_merge
from minilora.check.rounding import round_to
from minilora.lora import LoRAConfig, merge_and_unload, named_lora_layers
from tests.check.helpers import (
    assert_diagnosed,
    broken_layers,
    merge,
    read_file_tensors,
    write_model,
)
from tests.hf.helpers import adapted, random_gpt, random_llama

CONFIG = LoRAConfig(r=8, lora_alpha=12, target_modules=("c_attn", "c_proj", "c_fc"))
DTYPES = ("float32", "float16", "bfloat16")


def _deltas(model) -> dict[str, np.ndarray]:
    """s B A of every adapted layer, computed in the model's float32, in the file's layout."""
    where = hf.model_file_map(model)
    out = {}
    for name, layer in named_lora_layers(model):
        delta, file = layer.delta_weight().astype(np.float64), where[f"{name}.weight"]
        out[file.key] = delta.T if file.transposed else delta
    return out


def _files(root, config=CONFIG, b_scale=1.0, make=random_gpt):
    base, model = make(), adapted(make(), config)
    for _, layer in named_lora_layers(model):
        layer.lora_B.data = (layer.lora_B.data * b_scale).astype(np.float32)
    hf.save_pretrained(base, root / "base")
    hf.save_adapter(model, root / "adapter")
    return root / "base", root / "adapter", model


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """(base dir, adapter dir, the adapted model, base tensors and deltas in the file's layout)."""
    root = tmp_path_factory.mktemp("minilora-merge")
    base, adapter, model = _files(root)
    return base, adapter, model, read_file_tensors(base), _deltas(model)


def test_minilora_merge_is_exact_or_round_off(files, tmp_path):
    base, adapter, model, _, _ = files
    hf.save_pretrained(merge_and_unload(copy.deepcopy(model)), tmp_path / "merged")
    report = check_merge(base, adapter, tmp_path / "merged")
    assert {row.verdict for row in report.rows} <= {"exact", "round-off"}
    assert {row.verdict for row in report.rows if row.kind == "adapted"} == {"round-off"}
    assert report.exit_code == 0 and not report.wrong


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("w_rounded_first", [False, True])
def test_a_correct_merge_in_each_dtype_is_exact_or_round_off(files, tmp_path, dtype,
                                                             w_rounded_first):
    """One rounding of W + s B A, or PEFT's way in half precision: W rounded, then the sum."""
    base, adapter, _, W, deltas = files
    start = {k: round_to(v, dtype) for k, v in W.items()} if w_rounded_first else W
    merged, _ = merge(start, {k: round_to(d, dtype) for k, d in deltas.items()}
                      if w_rounded_first else deltas, dtype)
    report = check_merge(base, adapter, write_model(tmp_path / "m", base, merged, dtype))
    assert {row.verdict for row in report.rows} <= {"exact", "round-off"}, report.table()
    assert {row.dtype for row in report.rows} == {dtype}


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.filter_too_much])
@given(data=st.data(), dtype=st.sampled_from(DTYPES))
def test_each_broken_merge_is_wrong_on_exactly_that_layer(files, tmp_path_factory, data, dtype):
    base, adapter, _, W, deltas = files
    breaks = data.draw(broken_layers({k: d.shape for k, d in deltas.items()}))
    merged, partners = merge(W, deltas, dtype, breaks, r=CONFIG.r)
    directory = write_model(tmp_path_factory.mktemp("broken") / "m", base, merged, dtype)
    assert_diagnosed(check_merge(base, adapter, directory), breaks, partners)


@pytest.mark.parametrize("variant", ["llama", "qwen2-tied"])
@settings(max_examples=8, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.filter_too_much])
@given(data=st.data())
def test_a_llama_or_qwen2_merge_is_checked_by_the_same_code(tmp_path_factory, variant, data):
    """Nothing in the check is GPT-2's: Llama's names, shapes (fewer key/value heads) and
    layout come from minilora.hf, and the same breaks are found."""
    root = tmp_path_factory.mktemp(variant)
    config = LoRAConfig(r=8, lora_alpha=12, target_modules="all-linear")
    base, adapter, model = _files(root, config, make=lambda: random_llama(variant))
    W, deltas = read_file_tensors(base), _deltas(model)
    breaks = data.draw(broken_layers({k: d.shape for k, d in deltas.items()}))
    dtype = data.draw(st.sampled_from(DTYPES))
    merged, partners = merge(W, deltas, dtype, breaks, r=8)
    directory = write_model(root / "m", base, merged, dtype)
    assert_diagnosed(check_merge(base, adapter, directory), breaks, partners)


def test_a_delta_below_bfloat16_resolution_is_unresolvable(tmp_path):
    """A tiny adapter merged into bfloat16: merged or not, the file holds the same values."""
    base, adapter, model = _files(tmp_path, b_scale=1e-7)
    W, deltas = read_file_tensors(base), _deltas(model)
    for name, tensors in {"merged": merge(W, deltas, "bfloat16")[0], "not merged": W}.items():
        report = check_merge(base, adapter, write_model(tmp_path / name, base, tensors,
                                                        "bfloat16"))
        adapted_rows = [row for row in report.rows if row.kind == "adapted"]
        assert {row.verdict for row in adapted_rows} == {"unresolvable"}, name
        assert report.exit_code == 0 and "--logits" in report.notes[0]


def test_the_same_tiny_delta_is_resolvable_in_float32(tmp_path):
    base, adapter, _ = _files(tmp_path, b_scale=1e-7)
    W = read_file_tensors(base)
    report = check_merge(base, adapter, write_model(tmp_path / "m", base, W, "float32"))
    assert {row.code for row in report.rows if row.kind == "adapted"} == {"not-merged"}


def test_pattern_and_rslora_scaling_mistakes_are_named(tmp_path):
    config = LoRAConfig(r=4, lora_alpha=6, target_modules=("c_attn",), use_rslora=True,
                        rank_pattern={"h.1.attn.c_attn": 2}, alpha_pattern={"h.1.attn.c_attn": 5})
    base, adapter, model = _files(tmp_path, config)
    W, deltas = read_file_tensors(base), _deltas(model)
    layer0, layer1 = sorted(deltas)
    merged, _ = merge(W, deltas, "float32")
    merged[layer0] = W[layer0] + deltas[layer0] / 2  # plain alpha/r for rsLoRA's alpha/sqrt(r)
    merged[layer1] = W[layer1] + deltas[layer1] * (6 / 2) / (5 / np.sqrt(2))  # the global r, alpha
    directory = write_model(tmp_path / "m", base, merged, "float32")
    rows = {r.name: r for r in check_merge(base, adapter, directory).rows}
    assert rows[layer0].code == "plain-scaling" and "alpha/sqrt(r) = 3" in rows[layer0].diagnosis
    assert rows[layer1].code == "pattern-ignored"


def test_an_unknown_factor_is_measured(files, tmp_path):
    base, adapter, _, W, deltas = files
    key = sorted(deltas)[0]
    merged, _ = merge(W, deltas, "float32")
    merged[key] = W[key] + 1.37 * deltas[key]
    row = next(r for r in check_merge(base, adapter, write_model(tmp_path / "m", base, merged,
                                                                 "float32")).rows if r.name == key)
    assert row.code == "scaled" and "delta scaled by 1.37" in row.diagnosis


def test_a_delta_in_a_layer_the_adapter_does_not_adapt(tmp_path):
    base, adapter, model = _files(tmp_path, LoRAConfig(r=8, lora_alpha=12,
                                                       target_modules=("h.0.attn.c_proj",)))
    W, deltas = read_file_tensors(base), _deltas(model)
    merged = dict(W)
    target = "transformer.h.1.attn.c_proj.weight"
    merged[target] = W[target] + deltas["transformer.h.0.attn.c_proj.weight"]
    rows = {r.name: r for r in check_merge(base, adapter, write_model(tmp_path / "m", base,
                                                                      merged, "float32")).rows}
    assert rows[target].code == "delta-of-other" and "wrong layer" in rows[target].diagnosis
    assert rows["transformer.h.0.attn.c_proj.weight"].code == "merged-elsewhere"


def test_missing_extra_nonfinite_and_transposed_tensors_are_named(files, tmp_path):
    base, adapter, _, W, deltas = files
    merged, _ = merge(W, deltas, "float32")
    del merged["transformer.h.0.ln_1.bias"]
    merged["transformer.h.0.attn.c_attn.lora_A.weight"] = np.zeros((8, 16))
    merged["transformer.h.1.ln_2.weight"] = np.full(16, np.nan)
    merged["transformer.h.1.attn.c_attn.weight"] = merged["transformer.h.1.attn.c_attn.weight"].T
    merged["lm_head.weight"] = W["transformer.wte.weight"] + 1  # a tied copy that differs
    report = check_merge(base, adapter, write_model(tmp_path / "m", base, merged, "float32"))
    codes = {row.name: row.code for row in report.wrong}
    assert codes == {"transformer.h.0.ln_1.bias": "missing",
                     "transformer.h.0.attn.c_attn.lora_A.weight": "extra",
                     "transformer.h.1.ln_2.weight": "not-finite",
                     "transformer.h.1.attn.c_attn.weight": "transposed-weight",
                     "lm_head.weight": ""}
    extra = next(r for r in report.wrong if r.code == "extra")
    assert "merge_and_unload" in extra.diagnosis


def test_a_tied_copy_equal_to_the_embedding_is_fine(files, tmp_path):
    base, adapter, _, W, deltas = files
    merged, _ = merge(W, deltas, "float32")
    merged["lm_head.weight"] = W["transformer.wte.weight"]
    report = check_merge(base, adapter, write_model(tmp_path / "m", base, merged, "float32"))
    assert report.exit_code == 0
    assert next(r for r in report.rows if r.name == "lm_head.weight").verdict == "exact"


def test_an_adapters_trained_bias_must_be_in_the_merge(tmp_path):
    base, adapter, model = _files(tmp_path, LoRAConfig(r=8, lora_alpha=12, bias="lora_only"))
    W, deltas = read_file_tensors(base), _deltas(model)
    merged, _ = merge(W, deltas, "float32")  # the base's biases, not the trained ones
    report = check_merge(base, adapter, write_model(tmp_path / "m", base, merged, "float32"))
    assert {row.code for row in report.wrong} == {"untrained"}
    assert {row.kind for row in report.wrong} == {"trained by the adapter"}


def test_a_directory_that_is_not_a_merge_of_the_base_is_refused(files, tmp_path):
    base, adapter, _, _, _ = files
    with pytest.raises(FileFormatError, match="model directory does not exist"):
        check_merge(base, adapter, tmp_path / "nowhere")
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(FileFormatError, match="model_type 'bert'"):
        check_merge(base, adapter, tmp_path / "llama")


def test_the_json_report_holds_every_row(files, tmp_path):
    base, adapter, _, W, deltas = files
    merged, _ = merge(W, deltas, "bfloat16", {"transformer.h.1.mlp.c_fc.weight": "doubled"})
    report = check_merge(base, adapter, write_model(tmp_path / "m", base, merged, "bfloat16"))
    report.save_json(tmp_path / "r.json")
    d = json.loads((tmp_path / "r.json").read_text())
    assert d["ok"] is False and d["exit_code"] == 1 and d["counts"]["WRONG"] == 1
    assert len(d["rows"]) == len(report.rows)
    assert d["summary"]["unit_roundoff"] == {"bfloat16": 2.0 ** -8}
