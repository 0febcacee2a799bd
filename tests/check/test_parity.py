"""``minilora check`` on files made by transformers 5.24 and PEFT 0.21 in the test: a tiny random
GPT-2 (``save_pretrained``), a LoRA adapter on its Conv1D layers (``fan_in_fan_out``, B random and
large enough to be resolvable in bfloat16), and merges by ``merge_and_unload()`` in float32,
float16 and bfloat16, correct and broken on purpose; logits from PEFT's forward.

Skips without the parity extra (``pip install -e ".[parity]"``); CI installs it.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minilora.check import check_logits, check_merge
from tests.check.helpers import assert_diagnosed, broken_layers, merge, read_file_tensors
from tests.extras import need

torch, transformers, peft = need("torch", "transformers", "peft")
TORCH = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
LORA = {"r": 8, "lora_alpha": 12, "target_modules": ["c_attn", "c_proj", "c_fc"],
        "fan_in_fan_out": True}


@pytest.fixture(autouse=True)
def quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        yield


def _save_base_and_adapter(root, b_scale: float):
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=23, n_positions=16, n_embd=16, n_layer=2,
                                     n_head=4, bos_token_id=None, eos_token_id=None)
    transformers.GPT2LMHeadModel(config).eval().save_pretrained(root / "base")
    model = peft.get_peft_model(_base(root), peft.LoraConfig(**LORA))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * b_scale)
    model.save_pretrained(root / "adapter")
    return root / "base", root / "adapter"


def _base(root, dtype="float32"):
    return transformers.GPT2LMHeadModel.from_pretrained(root / "base", dtype=TORCH[dtype]).eval()


def _peft(root, dtype="float32"):
    return peft.PeftModel.from_pretrained(_base(root, dtype), root / "adapter").eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """(root, base dir, adapter dir, base tensors and PEFT's deltas, file layout, float64)."""
    root = tmp_path_factory.mktemp("peft-check")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base, adapter = _save_base_and_adapter(root, b_scale=0.1)
        model = _peft(root)
    deltas = {name.removeprefix("base_model.model.") + ".weight":
              module.get_delta_weight("default").double().numpy()
              for name, module in model.named_modules() if hasattr(module, "get_delta_weight")}
    return root, base, adapter, read_file_tensors(base), deltas


def _peft_merge(root, out, dtype: str, cast_after: bool = False):
    """merge_and_unload() of the adapter on the base loaded in ``dtype`` (PEFT's half-precision
    merge), or in float32 and cast to ``dtype`` afterwards; saved by save_pretrained."""
    model = _peft(root, "float32" if cast_after else dtype).merge_and_unload()
    (model.to(TORCH[dtype]) if cast_after else model).save_pretrained(out)
    return out


def test_a_peft_merge_in_float32_is_exact_or_round_off(files, tmp_path):
    root, base, adapter, _, _ = files
    report = check_merge(base, adapter, _peft_merge(root, tmp_path / "m", "float32"))
    assert {row.verdict for row in report.rows if row.kind == "adapted"} <= {"exact", "round-off"}
    assert {row.verdict for row in report.rows} <= {"exact", "round-off"}
    assert len([row for row in report.rows if row.kind == "adapted"]) == 8
    assert report.exit_code == 0


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("cast_after", [False, True], ids=["merged-in-dtype", "cast-after"])
def test_peft_merges_in_float16_and_bfloat16_are_round_off(files, tmp_path, dtype, cast_after):
    root, base, adapter, _, _ = files
    report = check_merge(base, adapter, _peft_merge(root, tmp_path / "m", dtype, cast_after))
    assert {row.verdict for row in report.rows} <= {"exact", "round-off"}, report.table()
    assert {row.dtype for row in report.rows} == {dtype}
    if not cast_after:  # two roundings: W to the dtype, then the sum; never the single best one
        assert "round-off" in {row.verdict for row in report.rows if row.kind == "adapted"}


def test_a_peft_merge_below_bfloat16_resolution_is_unresolvable(tmp_path):
    """A tiny adapter merged into bfloat16, and the base in bfloat16 with no merge at all: the
    files cannot tell the two apart, and the check says so instead of guessing."""
    base, adapter = _save_base_and_adapter(tmp_path, b_scale=1e-9)
    _base(tmp_path, "bfloat16").save_pretrained(tmp_path / "not-merged")
    for merged in (_peft_merge(tmp_path, tmp_path / "merged", "bfloat16"),
                   tmp_path / "not-merged"):
        report = check_merge(base, adapter, merged)
        assert {row.verdict for row in report.rows if row.kind == "adapted"} == {"unresolvable"}
        assert report.exit_code == 0


def _save_merge(root, out, tensors: dict, dtype: str):
    """A model holding ``tensors`` (file keys, float64), rounded by torch to ``dtype`` and saved
    by transformers."""
    model = _base(root, dtype)
    with torch.no_grad():
        for key, value in tensors.items():
            model.get_parameter(key).copy_(torch.from_numpy(value))
    model.save_pretrained(out)
    return out


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.filter_too_much])
@given(data=st.data(), dtype=st.sampled_from(["float32", "float16", "bfloat16"]))
def test_each_broken_peft_merge_is_wrong_on_exactly_that_layer(files, tmp_path_factory, data,
                                                               dtype):
    """PEFT's own deltas (get_delta_weight) added the wrong way to the layers Hypothesis picks."""
    root, base, adapter, W, deltas = files
    breaks = data.draw(broken_layers({k: d.shape for k, d in deltas.items()}))
    merged, partners = merge(W, deltas, dtype, breaks, r=LORA["r"])
    out = _save_merge(root, tmp_path_factory.mktemp("broken") / "m", merged, dtype)
    assert_diagnosed(check_merge(base, adapter, out), breaks, partners)


# ---- logits ---------------------------------------------------------------------------------

IDS = np.random.default_rng(0).integers(0, 23, (2, 16))


def _logits(model, path):
    with torch.no_grad():
        logits = model(torch.from_numpy(IDS)).logits.float().numpy()
    np.save(path / "ids.npy", IDS)
    np.save(path / "logits.npy", logits)
    return path / "logits.npy", path / "ids.npy"


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_peft_logits_are_round_off(files, tmp_path, dtype):
    root, base, adapter, _, _ = files
    logits, ids = _logits(_peft(root, dtype), tmp_path)
    report = check_logits(base, adapter, logits, ids, computed_in=dtype)
    assert {row.verdict for row in report.rows} == {"round-off"}, report.render()
    assert report.exit_code == 0


def test_logits_without_the_adapter_or_with_its_scaling_doubled_are_diagnosed(files, tmp_path):
    root, base, adapter, _, _ = files
    model = _peft(root)
    with model.disable_adapter():
        logits, ids = _logits(model, tmp_path)
    report = check_logits(base, adapter, logits, ids)
    assert {row.code for row in report.rows} == {"not-merged"} and report.exit_code == 1
    for module in model.modules():
        if hasattr(module, "scaling") and isinstance(module.scaling, dict):
            module.scaling["default"] *= 2
    logits, ids = _logits(model, tmp_path)
    report = check_logits(base, adapter, logits, ids)
    assert {row.code for row in report.rows} == {"merged-twice"}


def test_logits_of_a_tiny_adapter_are_unresolvable(tmp_path):
    base, adapter = _save_base_and_adapter(tmp_path, b_scale=1e-9)
    logits, ids = _logits(_peft(tmp_path), tmp_path)
    report = check_logits(base, adapter, logits, ids)
    assert {row.verdict for row in report.rows} == {"unresolvable"} and report.exit_code == 0
