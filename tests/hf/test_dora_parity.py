"""Parity with PEFT 0.21 for DoRA (``use_dora=True``) on a tiny GPT2LMHeadModel, whose c_attn,
c_proj and c_fc are Conv1D layers (``fan_in_fan_out``): PEFT's adapter files run with PEFT's
logits in minilora and the other way, the files hold the same keys (the magnitude as
``...lora_magnitude_vector``); every gradient (A, B, m) equals PEFT's in float64; merged equals
PEFT's ``merge_and_unload``; unmerging gives W and m back; and where the two differ, pinned:
two DoRA adapters on one layer (docs/variants.md).

Skips without the parity extra (``pip install -e ".[parity]"``); CI installs it.
"""

from __future__ import annotations

import numpy as np
import pytest
import safetensors.numpy

from minilora import GPT, hf
from minilora.lora import (
    LoRAConfig,
    get_nb_trainable_parameters,
    merge_adapter,
    merge_and_unload,
    named_lora_layers,
    set_adapter,
    unmerge_adapter,
)
from tests.extras import need
from tests.hf.helpers import (
    WORST,
    adapted,
    assert_close,
    assert_same_adapter_files,
    peft_parameter_counts,
    random_peft_model,
    relative_error,
    tokens,
)

torch, transformers, peft = need("torch", "transformers", "peft")
from tests.hf.test_parity import DTYPES, hf_gpt2, load_hf, logits_of  # noqa: E402

pytestmark = pytest.mark.usefixtures("quiet_libraries")

DORA_CONFIGS = {
    "c_attn": {"r": 4, "lora_alpha": 8, "use_dora": True},
    "conv1d-rslora": {"r": 2, "lora_alpha": 3, "target_modules": ["c_attn", "c_proj", "c_fc"],
                      "use_rslora": True, "use_dora": True},
    "dropout-lora_only": {"r": 3, "target_modules": ["c_fc", "attn.c_proj"], "lora_dropout": 0.1,
                          "bias": "lora_only", "use_dora": True},
}
GRAD_TOL = 1e-8  # float64 gradients: the brief's bound, far above the ~1e-14 seen


@pytest.fixture(scope="module", params=DTYPES)
def base(request, tmp_path_factory):
    """(dtype, a directory holding a random GPT2LMHeadModel as transformers saves it)."""
    directory = tmp_path_factory.mktemp(f"hf-dora-{request.param}")
    hf_gpt2(request.param).save_pretrained(directory)
    return request.param, directory


def peft_dora(directory, dtype, name, seed=0):
    """PEFT's DoRA model with every trainable tensor (A, B, m, biases) moved off its start."""
    return random_peft_model(load_hf(directory, dtype), DORA_CONFIGS[name], seed)


@pytest.mark.parametrize("name", sorted(DORA_CONFIGS))
def test_a_peft_dora_adapter_gives_the_same_logits_in_minilora(base, tmp_path, name):
    dtype, directory = base
    theirs = peft_dora(directory, dtype, name)
    theirs.save_pretrained(tmp_path)
    ours = hf.load_adapter(GPT.from_pretrained(directory, dtype=dtype), tmp_path)
    idx = tokens()
    assert_close(ours(idx)[0].data, logits_of(theirs, idx), dtype, "PEFT DoRA -> minilora")
    trainable = hf.load_adapter(GPT.from_pretrained(directory, dtype=dtype), tmp_path,
                                is_trainable=True)
    assert get_nb_trainable_parameters(trainable) == peft_parameter_counts(theirs)


@pytest.mark.parametrize("name", sorted(DORA_CONFIGS))
def test_minilora_saves_the_dora_adapter_peft_saves_and_peft_loads_it(base, tmp_path, name):
    dtype, directory = base
    config = LoRAConfig.from_peft({"peft_type": "LORA", **DORA_CONFIGS[name]})
    ours = adapted(GPT.from_pretrained(directory, dtype=dtype), config)
    hf.save_adapter(ours, tmp_path / "ours", base_model_name_or_path=str(directory))
    written = safetensors.numpy.load((tmp_path / "ours" / "adapter_model.safetensors")
                                     .read_bytes())
    magnitudes = [k for k in written if k.endswith(".lora_magnitude_vector")]
    assert len(magnitudes) == len(list(named_lora_layers(ours)))
    theirs = peft.PeftModel.from_pretrained(load_hf(directory, dtype), tmp_path / "ours").eval()
    idx = tokens()
    assert_close(logits_of(theirs, idx), ours.eval()(idx)[0].data, dtype, "minilora DoRA -> PEFT")
    peft_dora(directory, dtype, name).save_pretrained(tmp_path / "peft")
    assert_same_adapter_files(tmp_path / "ours", tmp_path / "peft", str(directory))


def peft_name(name: str) -> str:
    """PEFT's parameter name for minilora's ``...c_attn.lora_A`` (``lora_B``,
    ``lora_magnitude_vector``): ``base_model.model....c_attn.lora_A.default.weight``."""
    return f"base_model.model.{name}.default.weight"


@pytest.mark.parametrize("name", sorted(DORA_CONFIGS))
def test_every_gradient_equals_peft_in_float64(tmp_path, name):
    """<logits, G> for a random G: the logits within 1e-10 and dL/dA, dL/dB, dL/dm of every
    layer within 1e-8 of PEFT's autograd through its DoraLinearLayer (the norm detached in
    both). Dropout layers are in eval mode on both sides: the masks cannot be shared."""
    directory = tmp_path / "base"
    hf_gpt2("float64").save_pretrained(directory)
    theirs = peft_dora(directory, "float64", name)
    theirs.save_pretrained(tmp_path / "adapter")
    ours = hf.load_adapter(GPT.from_pretrained(directory, dtype="float64"), tmp_path / "adapter",
                           is_trainable=True)
    ours.eval()
    idx = tokens()
    g = np.random.default_rng(1).standard_normal((*idx.shape, 23))
    logits = theirs(torch.from_numpy(idx)).logits
    (logits * torch.from_numpy(g)).sum().backward()
    mine = ours(idx)[0]
    mine.backward(g)
    assert_close(mine.data, logits.detach().numpy(), "float64", "DoRA logits for the gradients")
    grads = dict(theirs.named_parameters())
    checked = 0
    for param_name, p in ours.named_parameters():
        if not p.requires_grad or param_name.endswith(".bias"):
            continue
        their_grad = grads[peft_name(param_name)].grad.numpy()
        err = relative_error(p.grad, their_grad)
        WORST[("DoRA gradients (A, B, m)", "float64")] = max(
            WORST[("DoRA gradients (A, B, m)", "float64")], err)
        assert err <= GRAD_TOL, f"{param_name}: relative error {err:.3g}"
        checked += 1
    assert checked == 3 * len(list(named_lora_layers(ours)))


@pytest.mark.parametrize("name", sorted(DORA_CONFIGS))
def test_merging_dora_in_minilora_equals_peft_merge_and_unload(base, tmp_path, name):
    dtype, directory = base
    theirs = peft_dora(directory, dtype, name)
    theirs.save_pretrained(tmp_path / "adapter")
    ours = hf.load_adapter(GPT.from_pretrained(directory, dtype=dtype), tmp_path / "adapter")
    merge_and_unload(ours).save_pretrained(tmp_path / "merged")
    merged = {k: v.numpy() for k, v in theirs.merge_and_unload().state_dict().items()}
    written = safetensors.numpy.load((tmp_path / "merged" / "model.safetensors").read_bytes())
    assert set(written) == set(merged) - {"lm_head.weight"}
    for key, value in written.items():
        assert_close(value, merged[key], dtype, "DoRA merged in minilora == PEFT merge_and_unload")


def test_unmerging_dora_on_gpt2s_conv1d_layers_gives_w_and_m_back_bit_for_bit(tmp_path):
    """PEFT #3531 (fixed in 0.21 by #3532): PEFT's DoRA unmerge divided a Conv1D weight along the
    wrong axis. minilora holds every weight as (out, in) and keeps the array each merge replaced:
    W and m come back bit for bit on c_attn (non-square) and c_proj (square). PEFT 0.21's unmerge
    divides and subtracts, and gives W back to round-off."""
    directory = tmp_path / "base"
    hf_gpt2("float64").save_pretrained(directory)
    theirs = peft_dora(directory, "float64", "conv1d-rslora")
    theirs.save_pretrained(tmp_path / "adapter")
    ours = hf.load_adapter(GPT.from_pretrained(directory, dtype="float64"), tmp_path / "adapter")
    before = {n: p.data.copy() for n, p in ours.named_parameters()}
    idx = tokens()
    unmerged = ours(idx)[0].data
    merge_adapter(ours)
    assert_close(ours(idx)[0].data, unmerged, "float64", "DoRA merged == unmerged on Conv1D")
    unmerge_adapter(ours)
    for n, p in ours.named_parameters():
        np.testing.assert_array_equal(p.data, before[n], err_msg=n)
    weights = {n: p.detach().clone() for n, p in theirs.named_parameters()}
    theirs.merge_adapter()
    theirs.unmerge_adapter()
    for n, p in theirs.named_parameters():
        assert relative_error(p.detach().numpy(), weights[n].numpy()) < 1e-14, n
    with theirs.disable_adapter():  # the path #3531 crashed on
        logits_of(theirs, idx)


def two_dora_adapters(directory, tmp_path):
    """PEFT's model with DoRA adapters "default" and "other" on c_attn, both trained and active,
    with lora_dropout, so that PEFT's training path exists; minilora with the same two."""
    config = {"r": 2, "lora_alpha": 4, "use_dora": True, "lora_dropout": 0.1}
    theirs = random_peft_model(load_hf(directory, "float64"), config, seed=2)
    theirs.add_adapter("other", peft.LoraConfig(task_type="CAUSAL_LM", **{**config, "r": 3}))
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if ".other." in n:
                p.add_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * 0.2)
    theirs.save_pretrained(tmp_path / "two")
    theirs.base_model.set_adapter(["default", "other"])
    ours = hf.load_adapter(GPT.from_pretrained(directory, dtype="float64"), tmp_path / "two")
    hf.load_adapter(ours, tmp_path / "two" / "other", adapter_name="other")
    set_adapter(ours, ["default", "other"])
    return theirs.eval(), ours.eval()


def test_peft_composes_two_dora_adapters_in_turn_in_eval_and_adds_them_in_training(tmp_path):
    """Two DoRA adapters on one layer. PEFT 0.21 in eval mode hands each the output the ones
    before it left, so the second rescales the first: y = c_2 (c_1 (W + ΔW_1) + ΔW_2) x + b,
    and its merge (since #3608's fix) agrees with that. In training, with a dropout, it adds
    them: y = (W + Σ_i (c_i (W + ΔW_i) - W)) x + b. minilora always adds them (order does not
    matter, merged == unmerged for any subset): PEFT's training form, not its eval form."""
    directory = tmp_path / "base"
    hf_gpt2("float64").save_pretrained(directory)
    theirs, ours = two_dora_adapters(directory, tmp_path)
    idx = tokens()
    mine = ours(idx)[0].data
    in_eval = logits_of(theirs, idx)
    assert relative_error(mine, in_eval) > 1e-3  # not round-off: a different function
    for module in theirs.modules():  # PEFT's training path, its dropout made the identity
        if isinstance(module, peft.tuners.lora.LoraLayer):
            module.train()
            for dropout in module.lora_dropout.values():
                dropout.p = 0.0
    assert_close(mine, logits_of(theirs, idx), "float64", "two DoRA adapters: PEFT training")
    merge_and_unload(ours)
    assert_close(ours(idx)[0].data, mine, "float64", "two DoRA adapters merged in minilora")
