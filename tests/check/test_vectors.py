"""The golden vectors: the same bits as pinned for this version (so a machine whose rounding
leaked into them would fail here), equal to minilora's own engine within the manifest's
tolerances in float64 and float32, tolerances tight enough to catch a wrong layer, and (with
torch) PyTorch, transformers and PEFT reproducing them, the docs' script included."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest

from minilora import ConfigError, hf, io, ops
from minilora.check import VECTORS_VERSION, oracle, vectors, write_vectors
from minilora.tensor import Tensor
from tests.extras import need

# SHA-256 of every file ``minilora vectors`` writes, version 1. A change here is a new version
# of the vectors: bump VECTORS_VERSION and say what changed, never just refresh the pins.
PINNED = {
    "gpt2_lora/adapter/adapter_config.json":
        "383ba8afc30239458a2599174f48f6bf66210d6d4ab45640c5417b72ce7665ee",
    "gpt2_lora/adapter/adapter_model.safetensors":
        "0c577244c4a2d9798dbd9799dcee58641c5d5c6bb0b26c7f22cf0606eb956dbe",
    "gpt2_lora/base/config.json":
        "e1a5aab37e914adf91a198c89b7802055c1b92598bdea19239ca2f82f8891660",
    "gpt2_lora/base/model.safetensors":
        "2239b6164f09d513955c344b19fc08da8253e23d96f5e4da8aaf98c42f64e5d0",
    "gpt2_lora/reference.safetensors":
        "76715a1c7030b1e0c6bfc14ddd3ffa6cddd5175cb9eeac5272c7cb68ac602f1e",
    "lora_linear/lecture_3x3_r1.safetensors":
        "e727abf3719f652fc07b45c023b739289690836fa980272b0712e1767474f696",
    "lora_linear/r2_alpha3_dropout_batched.safetensors":
        "76d53709e7cea184c2899eac9cb9d74824011359b7950096ebb0ffcb60a54c45",
    "lora_linear/r2_alpha4_no_bias.safetensors":
        "ee6e5343f8d797479fcc4b69a63c8f87bb6e016d5ffdeab1f87ed83efda3bbb9",
    "lora_linear/r3_alpha1_s_one_third.safetensors":
        "cdd9d6e124343dc6602dc39ff455e8a95d28670079754f0b238b2ecc652c4ede",
    "lora_linear/r3_alpha6_rslora_irrational_s.safetensors":
        "2126e20c1cbfd7d7ff2bcb8d49c8e470974ea8152614cb51cdc2f556c1e3c3d3",
    "lora_linear/r4_alpha8_rslora.safetensors":
        "1e832cf1bd8e40fa5f9b518f49957461be2814159cdc7e0645777b83fc888272",
    "lora_linear/r4_full_rank.safetensors":
        "6d43620a7c03f28fd58fbf9e4e820e2b354dda5c70689e5ce6758a2bfef000b1",
    "manifest.json": "fbbc093f6d902cbf0d4ee4eedd822ac0d63ecee86b0998bab800d636e572ae93",
}
DOCS = Path(__file__).resolve().parents[2] / "docs" / "conformance.md"


@pytest.fixture(scope="module")
def golden(tmp_path_factory) -> Path:
    return write_vectors(tmp_path_factory.mktemp("vectors") / "golden")


@pytest.fixture(scope="module")
def manifest(golden) -> dict:
    return json.loads((golden / "manifest.json").read_text())


def test_the_vectors_are_the_pinned_bits(golden):
    assert VECTORS_VERSION == 1
    got = {str(p.relative_to(golden)): hashlib.sha256(p.read_bytes()).hexdigest()
           for p in sorted(golden.rglob("*")) if p.is_file()}
    assert got == PINNED


def test_the_manifest_lists_every_file_with_its_digest(golden, manifest):
    assert manifest["version"] == VECTORS_VERSION
    assert manifest["sha256"] == {k: v for k, v in PINNED.items() if k != "manifest.json"}


def _layer(t: dict, case: dict, dtype):
    """minilora's engine on a case, in ``dtype``: y and the gradients of x, A, B (and b)."""
    leaf = {k: Tensor(t[k].astype(dtype), requires_grad=k in ("x", "A", "B", "b"))
            for k in ("x", "W", "b", "A", "B") if k in t}
    y = ops.lora_linear(leaf["x"], leaf["W"], leaf.get("b"), leaf["A"], leaf["B"],
                        case["scaling"], t.get("mask"))
    y.backward(t["G"].astype(dtype))
    out = {"y": y.data, "dx": leaf["x"].grad, "dA": leaf["A"].grad, "dB": leaf["B"].grad,
           "W_merged": leaf["W"].data + np.asarray(case["scaling"], dtype) * (
               leaf["B"].data @ leaf["A"].data)}
    if "b" in leaf:
        out["db"] = leaf["b"].grad
    return out


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_the_layer_vectors_equal_minilora_within_the_manifests_atol(golden, manifest, dtype):
    for case in manifest["lora_linear"]:
        t = io.load_tensors(golden / case["file"])
        got = _layer(t, case, dtype)
        assert sorted(got) == sorted(case["outputs"])
        for name, value in got.items():
            err = float(np.max(np.abs(value.astype(np.float64) - t[name])))
            assert err <= case["atol"][dtype][name], (case["name"], name, err)


def test_a_wrong_layer_is_outside_the_tolerance_in_every_dtype(golden, manifest):
    """The tolerances catch a mistake: plain scaling where the case says rsLoRA, or the mask
    forgotten, moves the outputs past even bfloat16's atol."""
    for name, mistake in (("r4_alpha8_rslora", "plain"), ("r2_alpha3_dropout_batched", "mask")):
        case = next(c for c in manifest["lora_linear"] if c["name"] == name)
        t = io.load_tensors(golden / case["file"])
        if mistake == "plain":
            case = {**case, "scaling": case["lora_alpha"] / case["r"]}
        else:
            t = {k: v for k, v in t.items() if k != "mask"}
        got = _layer(t, case, "float64")
        for dtype in ("float16", "bfloat16"):
            assert any(np.max(np.abs(got[k] - t[k])) > case["atol"][dtype][k] for k in ("y", "dA"))


def _gpt(golden, manifest, dtype):
    g = manifest["gpt2_lora"]
    model = hf.from_pretrained(golden / g["base"], dtype)
    hf.load_adapter(model, golden / g["adapter"], is_trainable=True)
    model.requires_grad_(True)
    ref = io.load_tensors(golden / g["reference"])
    logits, loss = model(ref["input_ids"], ref["targets"])
    loss.backward()
    arch = hf.ARCHITECTURES["gpt2"]
    got = {"logits": logits.data, "loss": loss.data}
    for name, p in model.named_parameters():
        lora = name.endswith((".lora_A", ".lora_B"))
        key = f"grad/{hf.peft.PREFIX}{name}.weight" if lora else f"grad/{name}"
        got[key] = p.grad if lora else arch.to_file(name, p.grad)
    return got, ref, g["rtol"][dtype]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_the_gpt_vectors_equal_minilora_within_the_manifests_rtol(golden, manifest, dtype):
    got, ref, rtol = _gpt(golden, manifest, dtype)
    assert sorted(got) == sorted(k for k in ref if k not in ("input_ids", "targets"))
    for key, value in got.items():
        scale = float(np.max(np.abs(ref[key])))
        assert scale > 0, key  # B is non-zero: every gradient is too
        assert float(np.max(np.abs(value - ref[key]))) <= rtol * scale, key


def test_the_inputs_are_exact_in_every_dtype(golden, manifest):
    """Multiples of 2^-7 below 1: float16 and bfloat16 hold them exactly, so casting an input
    adds no error to what the tolerances bound."""
    from minilora.check.rounding import round_to

    for case in manifest["lora_linear"]:
        t = io.load_tensors(golden / case["file"])
        for k in case["inputs"]:
            assert np.array_equal(round_to(t[k], "bfloat16"), t[k]), (case["name"], k)


def test_the_oracles_reverse_mode_matches_its_closed_forms():
    """The scalar reverse mode and the closed forms agree on a layer (two codes, one answer)."""
    with oracle.decimal.localcontext(oracle.CONTEXT):
        x = [oracle.Num(oracle.Decimal(v)) for v in (0.5, -1.25)]
        A = [oracle.Num(oracle.Decimal(v)) for v in (0.75, 0.25)]
        h = oracle.dot(x, A)
        y = oracle.tanh(oracle.scale(h, oracle.Decimal(2)))
        oracle.backward(y)
        t = y.value
        assert x[0].grad == 2 * (1 - t * t) * A[0].value
        assert A[1].grad == 2 * (1 - t * t) * x[1].value


def test_write_vectors_refuses_an_existing_directory_and_leaves_nothing_on_failure(
        tmp_path, monkeypatch):
    (tmp_path / "there").mkdir()
    with pytest.raises(ConfigError, match="already exists"):
        write_vectors(tmp_path / "there")

    def broken(case):
        raise RuntimeError("disk full")

    monkeypatch.setattr(vectors, "layer_reference", broken)
    with pytest.raises(RuntimeError):
        write_vectors(tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["there"]


# ---- with torch: PyTorch, transformers and PEFT on the same files ---------------------------

def _docs_script() -> str:
    text = DOCS.read_text(encoding="utf-8")
    m = re.search(r"<!-- run by tests/check/test_vectors.py -->\n```text\n(.*?)```", text, re.S)
    assert m, "docs/conformance.md lost its PyTorch script"
    return m.group(1)


@pytest.mark.parametrize("dtype", ["float64", "float32", "float16", "bfloat16"])
def test_the_docs_pytorch_script_passes_in_every_dtype(golden, monkeypatch, dtype):
    need("torch")
    script = _docs_script()
    assert len(script.strip().splitlines()) <= 14
    monkeypatch.chdir(golden.parent)
    exec(compile(script.replace('DTYPE = "float32"', f'DTYPE = "{dtype}"'), str(DOCS), "exec"),
         {"__name__": "docs.conformance"})


def test_transformers_and_peft_reproduce_the_gpt_vectors(golden, manifest):
    torch, transformers, peft = need("torch", "transformers", "peft")
    g = manifest["gpt2_lora"]
    base = transformers.GPT2LMHeadModel.from_pretrained(golden / g["base"], dtype=torch.float64)
    model = peft.PeftModel.from_pretrained(base, golden / g["adapter"], is_trainable=True)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    ref = io.load_tensors(golden / g["reference"])
    logits = model(torch.from_numpy(ref["input_ids"])).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                             torch.from_numpy(ref["targets"]).reshape(-1))
    loss.backward()
    rtol = g["rtol"]["float64"]
    checks = {"logits": logits.detach().numpy(), "loss": loss.detach().numpy()}
    for name, p in model.named_parameters():
        key = "grad/" + name.replace(".default", "")
        if ".lora_" not in key:
            key = "grad/" + name.removeprefix("base_model.model.").replace(".base_layer", "")
        if key in ref:
            checks[key] = p.grad.numpy()
    assert len(checks) == len([k for k in ref if k not in ("input_ids", "targets")])
    for key, value in checks.items():
        assert np.max(np.abs(value - ref[key])) <= rtol * np.max(np.abs(ref[key])), key
