"""PiSSA, OLoRA and LoRA+ against PEFT 0.21 (torch 2.13, transformers): the same factors, residual,
logits and gradients, the same optimizer groups, the same converted rank-2r file.

PEFT refuses PiSSA and OLoRA in float64 ("Please initialize PiSSA under float32 ..."), so these
compare float32 models. Two LAPACKs (scipy's and torch's) factor the same float32 W: singular
vectors and Q agree to a few hundred float32 eps relative to ||W|| (they are as well conditioned
as the gaps between W's singular values allow, ample for these random W), and a singular vector
is defined up to its sign: each pair (A_i, B_i) is compared after turning it to PEFT's sign,
which flips ``dL/dA_i`` and ``dL/dB_i`` the same way.

PEFT 0.21's OLoRA factors a GPT-2 Conv1D's weight as stored, (in, out), without the transpose its
PiSSA makes: ``lora_A`` comes out (r, out) and the first forward pass fails. The OLoRA comparison
is on a Llama (``nn.Linear`` layers), and on GPT-2 against OLoRA's definition on the (out, in) W;
one test pins PEFT's failure, so a PEFT that fixes it shows here (docs/variants.md).
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import safetensors.numpy

import minilora
from minilora import GPT, hf
from minilora.lora import LoRAConfig, apply_lora, named_lora_layers
from minilora.lora.loraplus import GROUPS, create_loraplus_optimizer
from minilora.optim import AdamW
from tests.extras import need
from tests.hf.helpers import assert_close, assert_same_adapter_files, tokens

torch, transformers, peft = need("torch", "transformers", "peft")
from peft.optimizers import create_loraplus_optimizer as peft_loraplus  # noqa: E402

from tests.hf.test_parity import hf_gpt2  # noqa: E402  (needs torch)
from tests.models.test_llama_parity import VOCAB, hf_model  # noqa: E402  (needs torch)

# two LAPACKs' float32 factors of one W (see the module docstring): relative to the largest entry
FACTOR_TOL = 1e-4
GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]
LLAMA_TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]

pytestmark = pytest.mark.usefixtures("quiet_libraries")


def peft_name(name: str) -> str:
    """minilora's name for a PEFT parameter: no ``base_model.model.``, adapter name or copies."""
    name = name.removeprefix("base_model.model.").replace(".modules_to_save.default", "")
    name = re.sub(r"\.(lora_[AB])\.default\.weight$", r".\1", name.replace(".base_layer", ""))
    return re.sub(r"\.(lora_embedding_[AB])\.default$", r".\1", name)


def model_pair(tmp_path, kind: str, init: str, r: int, alpha: int, targets):
    """(PEFT's model, minilora's): the same float32 transformers model (``"gpt2"``: a tiny
    GPT-2; ``"llama"``: a tiny Llama), the same config with ``init``."""
    (hf_gpt2("float32") if kind == "gpt2" else hf_model("llama-untied", torch.float32)) \
        .save_pretrained(tmp_path / "base")
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base",
                                                             dtype=torch.float32)
    theirs = peft.get_peft_model(base, peft.LoraConfig(
        r=r, lora_alpha=alpha, init_lora_weights=init, target_modules=targets,
        task_type="CAUSAL_LM")).eval()
    ours = minilora.from_pretrained(tmp_path / "base", dtype="float32")
    apply_lora(ours, LoRAConfig(r=r, lora_alpha=alpha, init_lora_weights=init,
                                target_modules=targets), rng=0)
    return theirs, ours.eval()


def gpt2_pair(tmp_path, init: str):
    return model_pair(tmp_path, "gpt2", init, 4, 8, GPT2_TARGETS)


def llama_pair(tmp_path, init: str):
    return model_pair(tmp_path, "llama", init, 3, 6, LLAMA_TARGETS)


def peft_layers(model) -> dict:
    return {peft_name(n): m for n, m in model.named_modules()
            if isinstance(m, peft.tuners.lora.LoraLayer)}


def signs(ours_A: np.ndarray, theirs_A: np.ndarray) -> np.ndarray:
    """+1 or -1 per rank: the sign that turns our (A_i, B_i) into PEFT's."""
    return np.where(np.sum(ours_A * theirs_A, axis=1) < 0, -1.0, 1.0)


def compare_layers(theirs, ours, conv1d: bool, aligned: bool) -> dict[str, np.ndarray]:
    """A, B (sign-aligned when ``aligned``) and the residual W of every adapted layer within
    FACTOR_TOL of PEFT's; layer name -> the signs used."""
    used = {}
    for name, layer in peft_layers(theirs).items():
        mine = ours.get_submodule(name)
        A = layer.lora_A["default"].weight.detach().numpy()
        B = layer.lora_B["default"].weight.detach().numpy()
        W = layer.get_base_layer().weight.detach().numpy()
        d = signs(mine.lora_A.data, A) if aligned else np.ones(A.shape[0])
        used[name] = d
        for what, a, b in (("A", d[:, None] * mine.lora_A.data, A),
                           ("B", mine.lora_B.data * d, B),
                           ("W_res", mine.weight.data, W.T if conv1d else W)):
            err = np.abs(a - b).max() / np.abs(b).max()
            assert err <= FACTOR_TOL, f"{name} {what}: relative error {err:.3g}"
    return used


def gradients(theirs, ours, idx, targets) -> tuple[dict, dict]:
    """(PEFT's, minilora's) gradients of the mean cross-entropy, by minilora's names."""
    out = theirs(torch.from_numpy(idx)).logits
    loss = torch.nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]),
                                             torch.from_numpy(targets).reshape(-1))
    loss.backward()
    peft_grads = {peft_name(n): p.grad.numpy() for n, p in theirs.named_parameters()
                  if p.requires_grad}
    _, our_loss = ours(idx, targets)
    our_loss.backward()
    our_grads = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert set(peft_grads) == set(our_grads)
    return peft_grads, our_grads


def compare_logits_and_gradients(theirs, ours, used: dict, vocab: int) -> None:
    idx, targets = tokens(vocab=vocab, seed=1), tokens(vocab=vocab, seed=2)
    with torch.no_grad():
        peft_logits = theirs(torch.from_numpy(idx)).logits.numpy()
    assert_close(ours(idx)[0].data, peft_logits, "float32", "variant logits")
    peft_grads, our_grads = gradients(theirs, ours, idx, targets)
    for name, g in our_grads.items():
        layer, _, kind = name.rpartition(".")
        d = used[layer]
        g = d[:, None] * g if kind == "lora_A" else g * d
        err = np.abs(g - peft_grads[name]).max() / np.abs(peft_grads[name]).max()
        assert err <= FACTOR_TOL, f"gradient of {name}: relative error {err:.3g}"


# ---- PiSSA -----------------------------------------------------------------------------------

def test_pissa_on_gpt2_equals_peft_factors_residual_logits_and_every_gradient(tmp_path):
    theirs, ours = gpt2_pair(tmp_path, "pissa")
    used = compare_layers(theirs, ours, conv1d=True, aligned=True)
    compare_logits_and_gradients(theirs, ours, used, vocab=23)


def test_a_peft_pissa_adapter_loads_onto_the_original_base_with_peft_logits(tmp_path):
    """PEFT's file keeps init_lora_weights='pissa'; loading it (PEFT's from_pretrained, and
    minilora's load_adapter) factors the original W again and then reads the trained A, B."""
    theirs, _ = gpt2_pair(tmp_path, "pissa")
    with torch.no_grad():
        for _, p in theirs.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    theirs.save_pretrained(tmp_path / "trained")
    ours = hf.load_adapter(GPT.from_pretrained(tmp_path / "base", dtype="float32"),
                           tmp_path / "trained")
    idx = tokens(seed=3)
    with torch.no_grad():
        expected = theirs(torch.from_numpy(idx)).logits.numpy()
    err = np.abs(ours(idx)[0].data - expected).max() / np.abs(expected).max()
    assert err <= FACTOR_TOL


def test_the_rank_2r_conversion_writes_the_file_peft_writes(tmp_path):
    theirs, _ = gpt2_pair(tmp_path, "pissa")
    theirs.save_pretrained(tmp_path / "init")  # the initial adapter, before training
    with torch.no_grad():
        for _, p in theirs.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    theirs.save_pretrained(tmp_path / "trained")
    theirs.save_pretrained(tmp_path / "peft",
                           path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    ours = hf.load_adapter(GPT.from_pretrained(tmp_path / "base", dtype="float32"),
                           tmp_path / "trained")
    hf.save_adapter(ours, tmp_path / "ours", base_model_name_or_path=str(tmp_path / "base"),
                    path_initial_model_for_weight_conversion=tmp_path / "init")
    assert_same_adapter_files(tmp_path / "ours", tmp_path / "peft", str(tmp_path / "base"))
    mine, peft_state = (safetensors.numpy.load((tmp_path / d / "adapter_model.safetensors")
                                               .read_bytes()) for d in ("ours", "peft"))
    for key, value in peft_state.items():  # concatenations of the same file tensors: exact
        np.testing.assert_array_equal(mine[key], value, err_msg=key)
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["init_lora_weights"]) == (8, 16, True)
    plain = hf.load_adapter(GPT.from_pretrained(tmp_path / "base", dtype="float32"),
                            tmp_path / "peft")  # a plain adapter on the original base
    idx = tokens(seed=4)
    assert_close(plain(idx)[0].data, ours(idx)[0].data, "float32", "converted logits")


# ---- OLoRA -----------------------------------------------------------------------------------

def test_olora_on_llama_linear_layers_equals_peft_factors_residual_logits_and_gradients(tmp_path):
    theirs, ours = llama_pair(tmp_path, "olora")
    used = compare_layers(theirs, ours, conv1d=False, aligned=False)  # Householder QR: one sign
    compare_logits_and_gradients(theirs, ours, used, vocab=VOCAB)


def test_olora_on_gpt2_is_the_qr_of_the_out_in_weight(tmp_path):
    """OLoRA's definition on GPT-2: W = Q R for W: (out, in), the transpose of the Conv1D's
    stored array; A = R_r, B = Q_r, W_res = W - s Q_r R_r; outputs unchanged at initialisation."""
    hf_gpt2("float32").save_pretrained(tmp_path / "base")
    hf_model_ = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "base",
                                                             dtype=torch.float32)
    ours = GPT.from_pretrained(tmp_path / "base", dtype="float32")
    r, alpha = 4, 8
    apply_lora(ours, LoRAConfig(r=r, lora_alpha=alpha, init_lora_weights="olora",
                                target_modules=GPT2_TARGETS), rng=0)
    for name, layer in named_lora_layers(ours):
        W = hf_model_.get_submodule(name).weight.detach().T  # (out, in)
        Q, R = torch.linalg.qr(W)
        for what, a, b in (("A", layer.lora_A.data, R[:r]), ("B", layer.lora_B.data, Q[:, :r]),
                           ("W_res", layer.weight.data, W - (alpha / r) * Q[:, :r] @ R[:r])):
            b = b.numpy()
            err = np.abs(a - b).max() / np.abs(b).max()
            assert err <= FACTOR_TOL, f"{name} {what}: relative error {err:.3g}"
    idx = tokens(seed=5)
    with torch.no_grad():
        expected = hf_model_(torch.from_numpy(idx)).logits.numpy()
    assert_close(ours(idx)[0].data, expected, "float32", "OLoRA at init")


def test_peft_021_olora_on_gpt2_builds_lora_a_of_shape_r_out_and_fails(tmp_path):
    """The reproduction docs/variants.md quotes: PEFT 0.21 factors the Conv1D's (in, out) array,
    so c_attn's lora_A is (r, 3C) and the first forward pass is a shape error. If this test fails,
    PEFT fixed it: compare OLoRA on GPT-2 with PEFT then, and update the docs."""
    hf_gpt2("float32").save_pretrained(tmp_path / "base")
    base = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "base", dtype=torch.float32)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights="olora",
                                                      target_modules=["c_attn"]))
    layer = model.base_model.model.transformer.h[0].attn.c_attn
    assert tuple(layer.lora_A["default"].weight.shape) == (4, 48)  # (r, out): out = 3 * 16
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        model(torch.from_numpy(tokens()))


def test_peft_021_olora_on_a_square_gpt2_conv1d_changes_the_output_at_initialisation(tmp_path):
    """On a square Conv1D (attn.c_proj, 16 x 16) PEFT's shapes fit, and the mistake is silent:
    W_res + s B A is then the transpose's factorisation added to W's rows, not W, so the logits
    of the fresh adapter differ from the base's; minilora's are the base's (the test above)."""
    hf_gpt2("float32").save_pretrained(tmp_path / "base")
    base = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "base", dtype=torch.float32)
    idx = torch.from_numpy(tokens())
    with torch.no_grad():
        before = base(idx).logits.numpy()
        model = peft.get_peft_model(base, peft.LoraConfig(
            r=4, lora_alpha=8, init_lora_weights="olora", target_modules=["attn.c_proj"]))
        after = model(idx).logits.numpy()
    assert np.abs(after - before).max() > 1e-2 * np.abs(before).max()


# ---- LoRA+ -----------------------------------------------------------------------------------

def peft_groups(model, **kw) -> list[tuple[list[str], float, float]]:
    opt = peft_loraplus(model, torch.optim.AdamW, **kw)
    names = {id(p): peft_name(n) for n, p in model.named_parameters()}
    return [([names[id(p)] for p in g["params"]], g["lr"], g["weight_decay"])
            for g in opt.param_groups]


def our_groups(model, **kw) -> list[tuple[list[str], float, float]]:
    opt = create_loraplus_optimizer(model, AdamW, **kw)
    return [(g["names"], g["lr"], g["weight_decay"]) for g in opt.param_groups]


LORAPLUS = dict(lr=2e-3, loraplus_lr_ratio=16, loraplus_weight_decay=0.1,
                loraplus_lr_embedding=1e-5)


@pytest.mark.parametrize("config", [
    {"target_modules": ["c_attn", "wte"], "bias": "all"},
    {"target_modules": ["c_attn", "c_fc"], "bias": "lora_only", "modules_to_save": ["ln_f"]},
], ids=["embedding-bias_all", "lora_only-saved_layernorm"])
def test_loraplus_groups_and_rates_equal_peft_on_gpt2(tmp_path, config):
    hf_gpt2("float32").save_pretrained(tmp_path / "base")
    base = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "base", dtype=torch.float32)
    theirs = peft.get_peft_model(base, peft.LoraConfig(r=2, **config))
    ours = apply_lora(GPT.from_pretrained(tmp_path / "base", dtype="float32"),
                      LoRAConfig(r=2, **config), rng=0)
    expected = peft_groups(theirs, **LORAPLUS)
    assert [len(g[0]) for g in expected] == [len(g[0]) for g in our_groups(ours, **LORAPLUS)]
    assert our_groups(ours, **LORAPLUS) == expected
    assert len(expected) == len(GROUPS) and expected[2][0], "lora_B is in groupB"


def test_loraplus_decays_an_rmsnorm_weight_as_peft_does(tmp_path):
    """transformers' ALL_LAYERNORM_LAYERS is nn.LayerNorm alone: a saved RMSNorm's weight is in
    groupB, with weight decay, in PEFT and here."""
    hf_model("llama-untied", torch.float32).save_pretrained(tmp_path / "base")
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base",
                                                             dtype=torch.float32)
    config = {"target_modules": ["q_proj", "v_proj"], "modules_to_save": ["model.norm"]}
    theirs = peft.get_peft_model(base, peft.LoraConfig(r=2, **config))
    ours = apply_lora(minilora.from_pretrained(tmp_path / "base", dtype="float32"),
                      LoRAConfig(r=2, **config), rng=0)
    expected = peft_groups(theirs, **LORAPLUS)
    assert "model.norm.weight" in expected[2][0]
    assert our_groups(ours, **LORAPLUS) == expected
