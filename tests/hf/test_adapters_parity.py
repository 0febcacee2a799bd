"""Parity with PEFT 0.21 for several adapters on one model: two adapters saved and loaded both
ways (PEFT's layout: the default at the root, the other in a folder named after it), with either
or both active; ``add_weighted_adapter`` (linear, cat, svd) against PEFT's; LoRA on GPT-2's
embedding both ways and merged (the tie to lm_head, as PEFT does it); and the q-and-v adapter
exported as the rank-2r c_attn adapter PEFT runs.

Skips without the parity extra (``pip install -e ".[parity]"``); CI installs it.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import safetensors.numpy

from minilora import GPT, hf
from minilora.lora import (
    LoRAConfig,
    add_adapter,
    add_weighted_adapter,
    apply_lora,
    merge_adapter,
    merge_and_unload,
    set_adapter,
)
from tests.extras import need
from tests.hf.helpers import assert_close, assert_same_adapter_files, random_peft_model, tokens
from tests.lora.helpers import train_every_adapter

torch, transformers, peft = need("torch", "transformers", "peft")
from tests.hf.test_parity import DTYPES, hf_gpt2, load_hf, logits_of  # noqa: E402

pytestmark = pytest.mark.usefixtures("quiet_libraries")

FIRST = {"r": 2, "lora_alpha": 4, "target_modules": ["c_attn"]}
SECOND = {"r": 3, "lora_alpha": 5, "target_modules": ["c_attn", "mlp.c_proj"]}
ACTIVE_SETS = [["default"], ["other"], ["default", "other"]]


@pytest.fixture(scope="module", params=DTYPES)
def base(request, tmp_path_factory):
    """(dtype, a directory holding a random GPT2LMHeadModel as transformers saves it)."""
    directory = tmp_path_factory.mktemp(f"hf-{request.param}")
    hf_gpt2(request.param).save_pretrained(directory)
    return request.param, directory


def ours_with_two(directory, dtype, second=SECOND):
    model = GPT.from_pretrained(directory, dtype=dtype)
    apply_lora(model, LoRAConfig.from_peft({"peft_type": "LORA", **FIRST}), rng=0)
    add_adapter(model, "other", LoRAConfig.from_peft({"peft_type": "LORA", **second}), rng=1)
    return train_every_adapter(model, 2, scale=0.3)


def peft_with_two(directory, dtype, second=SECOND):
    theirs = random_peft_model(load_hf(directory, dtype), FIRST, seed=3)
    theirs.add_adapter("other", peft.LoraConfig(task_type="CAUSAL_LM", **second))
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if ".other." in name:
                p.add_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * 0.2)
    return theirs.eval()


def set_peft(model, names):
    model.base_model.set_adapter(names)


@pytest.mark.parametrize("active", ACTIVE_SETS, ids="+".join)
def test_two_adapters_saved_by_minilora_run_in_peft(base, tmp_path, active):
    dtype, directory = base
    ours = ours_with_two(directory, dtype)
    hf.save_adapter(ours, tmp_path / "ours", base_model_name_or_path=str(directory))
    assert (tmp_path / "ours" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "ours" / "other" / "adapter_model.safetensors").is_file()
    theirs = peft.PeftModel.from_pretrained(load_hf(directory, dtype), tmp_path / "ours")
    theirs.load_adapter(tmp_path / "ours" / "other", adapter_name="other")
    set_peft(theirs.eval(), active)
    set_adapter(ours, active)
    idx = tokens()
    assert_close(logits_of(theirs, idx), ours.eval()(idx)[0].data, dtype, "minilora -> PEFT")
    # the files PEFT writes for the same two adapters
    theirs.save_pretrained(tmp_path / "peft")
    for sub in ("", "other"):
        assert_same_adapter_files(tmp_path / "ours" / sub, tmp_path / "peft" / sub,
                                  str(directory))


@pytest.mark.parametrize("active", ACTIVE_SETS, ids="+".join)
def test_two_adapters_saved_by_peft_run_in_minilora(base, tmp_path, active):
    dtype, directory = base
    theirs = peft_with_two(directory, dtype)
    theirs.save_pretrained(tmp_path)
    ours = hf.load_adapter(GPT.from_pretrained(directory, dtype=dtype), tmp_path)
    hf.load_adapter(ours, tmp_path / "other", adapter_name="other")
    assert ours.active_adapters == ["default"]  # PEFT's load_adapter does not activate either
    set_adapter(ours, active)
    set_peft(theirs, active)
    idx = tokens()
    assert_close(ours(idx)[0].data, logits_of(theirs, idx), dtype, "PEFT -> minilora")


@pytest.mark.parametrize("combination_type", ["linear", "cat", "svd"])
def test_weighted_combinations_equal_peft(base, tmp_path, combination_type):
    """The same two adapters (PEFT's, read by minilora), combined by each with weights 0.75 and
    -0.375: the same logits, and PEFT's saved combination runs the same in minilora. PEFT makes
    float32 tensors of the weights (for linear, of c_i = sqrt|w_i s_i|): the weights are exact in
    float32, and linear is held in float64 to float32's tolerance (c_i is not exact)."""
    dtype, directory = base
    second = {**SECOND, "r": 2} if combination_type == "linear" else SECOND  # linear: one rank
    theirs = peft_with_two(directory, dtype, second)
    theirs.save_pretrained(tmp_path / "two")
    ours = hf.load_adapter(GPT.from_pretrained(directory, dtype=dtype), tmp_path / "two")
    hf.load_adapter(ours, tmp_path / "two" / "other", adapter_name="other")
    theirs.add_weighted_adapter(["default", "other"], [0.75, -0.375], "mix",
                                combination_type=combination_type)
    add_weighted_adapter(ours, ["default", "other"], [0.75, -0.375], "mix",
                         combination_type=combination_type)
    theirs.set_adapter("mix")
    set_adapter(ours, "mix")
    idx = tokens()
    expected = logits_of(theirs, idx)
    if combination_type == "linear" and dtype == "float64":  # PEFT's float32 c_i
        assert_close(ours(idx)[0].data, expected, "float32",
                     "add_weighted_adapter linear, float64 against PEFT's float32 c_i")
    else:
        assert_close(ours(idx)[0].data, expected, dtype, f"add_weighted_adapter {combination_type}")
    assert ours.peft_config["mix"].r == theirs.peft_config["mix"].r
    theirs.save_pretrained(tmp_path / "mixed", selected_adapters=["mix"])
    again = hf.load_adapter(GPT.from_pretrained(directory, dtype=dtype),
                            tmp_path / "mixed" / "mix")
    assert_close(again(idx)[0].data, expected, dtype, f"add_weighted_adapter {combination_type}")


EMBEDDING = {"r": 3, "lora_alpha": 6, "target_modules": ["wte", "c_attn"]}


def test_an_embedding_adapter_from_peft_runs_and_merges_as_in_peft(base, tmp_path):
    """PEFT's lora_embedding_A/B read by minilora: the same logits; merged, both change lm_head
    (tied to wte) the same way."""
    dtype, directory = base
    theirs = random_peft_model(load_hf(directory, dtype), EMBEDDING, seed=5)
    theirs.save_pretrained(tmp_path)
    ours = hf.load_adapter(GPT.from_pretrained(directory, dtype=dtype), tmp_path)
    idx = tokens()
    assert_close(ours(idx)[0].data, logits_of(theirs, idx), dtype, "PEFT -> minilora")
    merged_theirs = theirs.merge_and_unload()
    assert merged_theirs.lm_head.weight.data_ptr() == \
        merged_theirs.transformer.wte.weight.data_ptr()  # PEFT keeps the tie, merged
    with pytest.warns(UserWarning, match="tied"):
        merge_and_unload(ours)
    assert ours.lm_head.weight is ours.transformer.wte.weight
    assert_close(ours(idx)[0].data, logits_of(merged_theirs, idx), dtype,
                 "merged in minilora == PEFT merge_and_unload")


def test_an_embedding_adapter_from_minilora_runs_in_peft(base, tmp_path):
    dtype, directory = base
    ours = train_every_adapter(apply_lora(GPT.from_pretrained(directory, dtype=dtype),
                                          LoRAConfig.from_peft({"peft_type": "LORA", **EMBEDDING}),
                                          rng=0), 6, scale=0.3)
    hf.save_adapter(ours, tmp_path / "ours", base_model_name_or_path=str(directory))
    theirs = peft.PeftModel.from_pretrained(load_hf(directory, dtype), tmp_path / "ours").eval()
    idx = tokens()
    assert_close(logits_of(theirs, idx), ours.eval()(idx)[0].data, dtype, "minilora -> PEFT")
    random_peft_model(load_hf(directory, dtype), EMBEDDING).save_pretrained(tmp_path / "peft")
    assert_same_adapter_files(tmp_path / "ours", tmp_path / "peft", str(directory))


def test_the_q_and_v_adapter_is_exported_as_a_rank_2r_c_attn_adapter_peft_runs(base, tmp_path):
    """r = 2 on q and v of every c_attn, and c_proj in full: PEFT reads a c_attn adapter of rank
    4 whose B has zero rows for k, and gives the same logits; minilora reads it back too."""
    dtype, directory = base
    config = LoRAConfig(r=2, lora_alpha=3, target_modules=["c_attn", "attn.c_proj"],
                        target_slices={"c_attn": ["q", "v"]})
    ours = train_every_adapter(apply_lora(GPT.from_pretrained(directory, dtype=dtype), config,
                                          rng=0), 7, scale=0.3)
    hf.save_adapter(ours, tmp_path, base_model_name_or_path=str(directory))
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert written["r"] == 2 and written["rank_pattern"] == {
        rf"transformer\.h\.{i}\.attn\.c_attn": 4 for i in range(2)}
    assert written["alpha_pattern"] == {rf"transformer\.h\.{i}\.attn\.c_attn": 6
                                        for i in range(2)}  # s = 6 / 4 = 3 / 2, kept
    tensors = safetensors.numpy.load((tmp_path / "adapter_model.safetensors").read_bytes())
    B = tensors["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"]
    c = ours.config.n_embd
    assert B.shape == (3 * c, 4) and not B[c:2 * c].any() and B[:c, 2:].sum() == 0
    theirs = peft.PeftModel.from_pretrained(load_hf(directory, dtype), tmp_path).eval()
    idx = tokens()
    expected = ours.eval()(idx)[0].data
    assert_close(logits_of(theirs, idx), expected, dtype, "minilora q,v -> PEFT")
    again = hf.load_adapter(GPT.from_pretrained(directory, dtype=dtype), tmp_path)
    assert_close(again(idx)[0].data, expected, dtype, "minilora q,v -> PEFT")


# ---- where minilora and PEFT differ, on purpose (docs/adapters.md) --------------------------

def test_peft_skips_an_unmerged_active_adapter_once_another_is_merged(base, tmp_path):
    """PEFT's forward is the base layer's alone as soon as any adapter is merged; minilora adds
    the active adapters it has not merged, so merging part of the active set changes nothing.
    (Both adapters on c_attn alone: in PEFT a layer that holds none of the merged ones still adds
    its paths.)"""
    dtype, directory = base
    theirs = peft_with_two(directory, dtype, {**SECOND, "target_modules": ["c_attn"]})
    theirs.save_pretrained(tmp_path)
    ours = hf.load_adapter(GPT.from_pretrained(directory, dtype=dtype), tmp_path)
    hf.load_adapter(ours, tmp_path / "other", adapter_name="other")
    for model in (theirs, ours):
        (set_peft if model is theirs else set_adapter)(model, ["default", "other"])
    idx = tokens()
    both = ours(idx)[0].data.copy()
    theirs.base_model.merge_adapter(["default"])
    merge_adapter(ours, ["default"])
    assert_close(ours(idx)[0].data, both, dtype, "minilora: part of the active set merged")
    set_adapter(ours, ["default"])  # what PEFT computes: default merged, other's path dropped
    assert_close(logits_of(theirs, idx), ours(idx)[0].data, dtype, "PEFT -> minilora")


def test_peft_scales_a_combination_of_rslora_adapters_by_sqrt_of_its_rank():
    """PEFT copies use_rslora into the combination, whose scaling is then r / sqrt(r) = sqrt(r)
    where its A and B assume 1; minilora's combination has use_rslora False, scaling 1."""
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=1, n_embd=8, n_head=2, vocab_size=11, n_positions=8, bos_token_id=None,
        eos_token_id=None)).double()
    config = {"r": 2, "lora_alpha": 4, "target_modules": ["c_attn"], "use_rslora": True}
    theirs = random_peft_model(model, config)
    theirs.add_adapter("b", peft.LoraConfig(**config))
    layer = theirs.base_model.model.transformer.h[0].attn.c_attn
    with torch.no_grad():
        layer.lora_B["b"].weight.normal_()
    with torch.no_grad():
        wanted = (layer.get_delta_weight("default") + layer.get_delta_weight("b")).numpy()
        theirs.add_weighted_adapter(["default", "b"], [1.0, 1.0], "mix", combination_type="cat")
        assert layer.scaling["mix"] == 2.0  # 4 / sqrt(4), not 1
        np.testing.assert_allclose(layer.get_delta_weight("mix").numpy(), 2.0 * wanted,
                                   rtol=1e-12)
