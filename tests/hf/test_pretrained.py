"""Hugging Face GPT-2 directories without torch: minilora's own round trip, each way a file may
spell the same model (no ``transformer.`` prefix, old buffers, shards, float16, bfloat16), and the
refusals. The same files against ``transformers`` itself are in test_parity.py."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import safetensors.numpy

from minilora import GPT, FileFormatError, MiniLoRAError, hf
from minilora.hf import gpt2
from minilora.lora import LoRAConfig, apply_lora
from minilora.models import GPTConfig
from tests.hf.helpers import bfloat16_bits, random_gpt, tiny_config, tokens, write_safetensors


def tensors_of(directory):
    return safetensors.numpy.load((directory / "model.safetensors").read_bytes())


def same_parameters(a: GPT, b: GPT) -> bool:
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    return pa.keys() == pb.keys() and all(np.array_equal(pa[k].data, pb[k].data) for k in pa)


@pytest.fixture
def saved(tmp_path):
    model = random_gpt("float64")
    model.save_pretrained(tmp_path / "m")
    return model, tmp_path / "m"


def test_save_then_load_gives_the_same_parameters_bit_for_bit(saved):
    model, directory = saved
    back = GPT.from_pretrained(directory, dtype="float64")
    assert same_parameters(model, back) and back.config == model.config
    assert back.lm_head.weight is back.transformer.wte.weight and not back.training


def test_the_file_holds_gpt2s_keys_conv1d_transposed_and_no_lm_head(saved):
    model, directory = saved
    tensors = tensors_of(directory)
    assert set(tensors) == set(dict(gpt2.tensor_shapes(model.config)))
    assert "lm_head.weight" not in tensors
    w = model.transformer.h[0].attn.c_proj.weight.data  # square: only the name says transpose
    assert np.array_equal(tensors["transformer.h.0.attn.c_proj.weight"], w.T)
    assert np.array_equal(tensors["transformer.h.0.mlp.c_fc.weight"],
                          model.transformer.h[0].mlp.c_fc.weight.data.T)
    config = json.loads((directory / "config.json").read_text())
    assert config["model_type"] == "gpt2" and config["n_positions"] == 16
    assert config["tie_word_embeddings"] is True and config["n_inner"] is None


def test_tensor_shapes_are_the_models_parameters_in_the_files_layout():
    config = tiny_config(n_inner=40, n_layer=3)
    model = GPT(config)
    params = dict(model.named_parameters())
    shapes = dict(gpt2.tensor_shapes(config))
    assert set(shapes) == set(params)
    assert all(shapes[k] == gpt2.to_file(k, params[k].data).shape for k in shapes)


def test_n_inner_and_layer_norm_epsilon_round_trip(tmp_path):
    model = random_gpt(n_inner=24, layer_norm_epsilon=1e-3)
    model.save_pretrained(tmp_path / "m")
    back = GPT.from_pretrained(tmp_path / "m")
    assert back.transformer.h[0].mlp.c_fc.out_features == 24
    assert back.transformer.ln_f.eps == 1e-3
    np.testing.assert_array_equal(back(tokens())[0].data, model.eval()(tokens())[0].data)


def test_keys_without_the_transformer_prefix_and_old_buffers_read_the_same(saved, tmp_path):
    """The hub's original checkpoints: ``h.0.attn.c_attn.weight``, plus attn.bias/masked_bias."""
    model, directory = saved
    tensors = {k.removeprefix("transformer."): v for k, v in tensors_of(directory).items()}
    tensors["h.0.attn.bias"] = np.tril(np.ones((1, 1, 16, 16), np.float32))
    tensors["h.1.attn.masked_bias"] = np.array(-1e4, np.float32)
    old = tmp_path / "old"
    old.mkdir()
    safetensors.numpy.save_file(tensors, old / "model.safetensors")
    (old / "config.json").write_text((directory / "config.json").read_text())
    assert same_parameters(model, GPT.from_pretrained(old, dtype="float64"))


def test_a_tied_lm_head_in_the_file_is_read_only_if_equal(saved, tmp_path):
    model, directory = saved
    tensors = tensors_of(directory)
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "config.json").write_text((directory / "config.json").read_text())
    tensors["lm_head.weight"] = tensors["transformer.wte.weight"].copy()
    safetensors.numpy.save_file(tensors, tmp_path / "t" / "model.safetensors")
    assert same_parameters(model, GPT.from_pretrained(tmp_path / "t", dtype="float64"))
    tensors["lm_head.weight"][0, 0] += 1.0
    safetensors.numpy.save_file(tensors, tmp_path / "t" / "model.safetensors")
    with pytest.raises(FileFormatError, match="untied embeddings"):
        GPT.from_pretrained(tmp_path / "t")


def test_a_sharded_model_reads_the_same(saved, tmp_path):
    model, directory = saved
    tensors = tensors_of(directory)
    shard = tmp_path / "s"
    shard.mkdir()
    (shard / "config.json").write_text((directory / "config.json").read_text())
    names = sorted(tensors)
    weight_map = {}
    for i, part in enumerate((names[::2], names[1::2])):
        name = f"model-0000{i + 1}-of-00002.safetensors"
        safetensors.numpy.save_file({k: tensors[k] for k in part}, shard / name)
        weight_map.update(dict.fromkeys(part, name))
    (shard / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert same_parameters(model, GPT.from_pretrained(shard, dtype="float64"))


def test_float16_and_bfloat16_are_read_exactly(tmp_path):
    model = random_gpt("float32")
    model.save_pretrained(tmp_path / "m")
    tensors = tensors_of(tmp_path / "m")
    for dtype in ("F16", "BF16"):
        d = tmp_path / dtype
        d.mkdir()
        (d / "config.json").write_text((tmp_path / "m" / "config.json").read_text())
        half = {k: (v.astype(np.float16) if dtype == "F16" else bfloat16_bits(v))
                for k, v in tensors.items()}
        write_safetensors(d / "model.safetensors",
                          {k: (dtype, v.shape, v.astype(v.dtype.newbyteorder("<")).tobytes())
                           for k, v in half.items()})
        back = GPT.from_pretrained(d, dtype="float64")
        for key, h in half.items():
            exact = h.astype(np.float64) if dtype == "F16" else \
                (h.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
            ours = gpt2.to_file(key, dict(back.named_parameters())[key].data)
            np.testing.assert_array_equal(ours, exact, err_msg=f"{dtype} {key}")


def test_dropout_replaces_the_files_three_rates(saved):
    _, directory = saved
    model = GPT.from_pretrained(directory, dropout=0.25)
    assert model.config.dropout == 0.25 and model.transformer.drop.p == 0.25


# ---- refusals: each names the file and the field or tensor --------------------------------

def rewrite_config(directory, **fields):
    path = directory / "config.json"
    config = json.loads(path.read_text())
    config.update(fields)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize("field, value, shown", [
    ("activation_function", "relu", "activation_function is 'relu'"),
    ("scale_attn_by_inverse_layer_idx", True, "scale_attn_by_inverse_layer_idx"),
    ("reorder_and_upcast_attn", True, "reorder_and_upcast_attn"),
    ("scale_attn_weights", False, "scale_attn_weights"),
    ("tie_word_embeddings", False, "tie_word_embeddings"),
    ("add_cross_attention", True, "add_cross_attention"),
    ("architectures", ["GPT2ForSequenceClassification"], "architectures"),
    ("model_type", "llama", "model_type 'llama'"),
    ("n_head", 5, "n_embd (16) must be divisible by n_head (5)"),
    ("n_layer", 0, "n_layer must be a positive integer"),
    ("n_positions", "16", "n_positions must be a positive integer"),
    ("layer_norm_epsilon", -1.0, "layer_norm_epsilon must be a finite number > 0"),
    ("attn_pdrop", 0.3, "minilora's GPT has one dropout rate"),
    ("resid_pdrop", 1.5, "resid_pdrop must be a number in [0, 1)"),
])
def test_a_variant_minilora_does_not_run_is_refused_naming_the_field(saved, field, value, shown):
    _, directory = saved
    rewrite_config(directory, **{field: value})
    with pytest.raises(FileFormatError) as e:
        GPT.from_pretrained(directory)
    assert shown in str(e.value) and "config.json" in str(e.value)


@pytest.mark.parametrize("sizes, shown", [
    ({"n_layer": 10**9}, "missing tensors"),
    ({"n_embd": 10**5, "n_head": 1}, "has shape"),
    ({"vocab_size": 10**9}, "has shape (23, 16), the config implies (1000000000, 16)"),
])
def test_config_sizes_that_disagree_with_the_tensors_are_refused_before_allocating(saved, sizes,
                                                                                  shown):
    """A 2 kB config claiming 10^9 layers or a 10^9 vocabulary fails on the headers, before the
    model (or even a list of every tensor's name) is built: a few MB at most."""
    import tracemalloc

    _, directory = saved
    rewrite_config(directory, **sizes)
    tracemalloc.start()
    try:
        with pytest.raises(FileFormatError) as e:
            GPT.from_pretrained(directory)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert shown in str(e.value) and peak < 8 * 2**20, peak


@pytest.mark.parametrize("damage, shown", [
    (lambda t: t.pop("transformer.h.1.mlp.c_proj.bias"), "missing tensors"),
    (lambda t: t.update(extra=np.zeros(2)), "unexpected tensor 'extra'"),
    (lambda t: t.update({"transformer.ln_f.bias": np.zeros(3)}), "has shape (3,)"),
    (lambda t: t.update({"transformer.ln_f.bias": np.zeros(16, np.int64)}), "dtype I64"),
    (lambda t: t.update({"h.0.ln_1.weight": t["transformer.h.0.ln_1.weight"]}), "the same tensor"),
    (lambda t: t["transformer.wpe.weight"].__setitem__((0, 0), np.nan), "NaN or infinity"),
])
def test_bad_tensors_are_refused_naming_the_key(saved, damage, shown):
    _, directory = saved
    tensors = tensors_of(directory)
    damage(tensors)
    safetensors.numpy.save_file(tensors, directory / "model.safetensors")
    with pytest.raises(FileFormatError) as e:
        GPT.from_pretrained(directory)
    assert shown in str(e.value) and "model.safetensors" in str(e.value)


def test_pickle_is_refused_in_one_line_saying_to_use_safetensors(tmp_path):
    d = tmp_path / "pt"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04not opened")
    for path in (d, d / "pytorch_model.bin", tmp_path / "x.ckpt"):
        if path.suffix == ".ckpt":
            path.write_bytes(b"\x80\x04")
        with pytest.raises(FileFormatError) as e:
            GPT.from_pretrained(path)
        assert "pickle" in str(e.value) and "safetensors" in str(e.value)
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/passwd.safetensors",
                                   "sub/x.safetensors", "link.safetensors", "x.bin"])
def test_an_index_naming_a_file_outside_the_directory_is_refused(saved, tmp_path, shard):
    _, directory = saved
    tensors = tensors_of(directory)
    (tmp_path / "outside.safetensors").write_bytes((directory / "model.safetensors").read_bytes())
    os.symlink(tmp_path / "outside.safetensors", directory / "link.safetensors")
    (directory / "model.safetensors").unlink()
    index = {"weight_map": dict.fromkeys(tensors, shard)}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(FileFormatError) as e:
        GPT.from_pretrained(directory)
    assert "refused" in str(e.value) or "pickle" in str(e.value)


def test_a_model_file_linked_from_outside_is_refused_but_the_hub_cache_layout_is_read(saved,
                                                                                     tmp_path):
    model, directory = saved
    outside = tmp_path / "elsewhere.safetensors"
    os.replace(directory / "model.safetensors", outside)
    os.symlink(outside, directory / "model.safetensors")
    with pytest.raises(FileFormatError, match="outside"):
        GPT.from_pretrained(directory)
    # the cache: models--x/snapshots/REV/model.safetensors -> ../../blobs/SHA
    repo = tmp_path / "models--x"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    for name, data in (("model.safetensors", outside.read_bytes()),
                       ("config.json", (directory / "config.json").read_bytes())):
        (repo / "blobs" / name.upper()).write_bytes(data)
        os.symlink(f"../../blobs/{name.upper()}", snapshot / name)
    assert same_parameters(model, GPT.from_pretrained(snapshot, dtype="float64"))


def test_saving_refuses_an_adapted_model_and_a_model_without_biases(tmp_path):
    model = apply_lora(random_gpt(), LoRAConfig(r=2))
    with pytest.raises(MiniLoRAError, match="merge_and_unload"):
        model.save_pretrained(tmp_path / "a")
    with pytest.raises(MiniLoRAError, match="bias=False"):
        GPT(GPTConfig(vocab_size=5, n_embd=8, n_head=2, n_layer=1, bias=False)).save_pretrained(
            tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_is_pretrained_dir_tells_a_hugging_face_directory_from_others(saved, tmp_path):
    _, directory = saved
    assert hf.is_pretrained_dir(directory)
    assert not hf.is_pretrained_dir(tmp_path) and not hf.is_pretrained_dir(tmp_path / "none")


def test_a_key_in_two_shards_or_in_none_is_refused(saved, tmp_path):
    _, directory = saved
    tensors = tensors_of(directory)
    (directory / "model.safetensors").unlink()
    names = sorted(tensors)
    safetensors.numpy.save_file({k: tensors[k] for k in names}, directory / "a.safetensors")
    safetensors.numpy.save_file({names[0]: tensors[names[0]]}, directory / "b.safetensors")
    index = directory / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {**dict.fromkeys(names, "a.safetensors"),
                                                names[0]: "b.safetensors"}}))
    with pytest.raises(FileFormatError, match=r"is also in b\.safetensors"):
        GPT.from_pretrained(directory)
    index.write_text(json.dumps({"weight_map": dict.fromkeys(names[1:], "a.safetensors")}))
    with pytest.raises(FileFormatError, match="maps elsewhere"):  # a.safetensors holds names[0]
        GPT.from_pretrained(directory)
    safetensors.numpy.save_file({k: tensors[k] for k in names[1:]}, directory / "a.safetensors")
    with pytest.raises(FileFormatError, match="missing tensors"):
        GPT.from_pretrained(directory)
