"""Hostile and damaged files: each is refused with a FileFormatError naming the file and the fault,
never another exception, never a half-changed model, never pickle.

Every checkpoint (a full model, or a LoRA adapter beside its base) goes through every public way
minilora reads one (files.LOADERS: read_checkpoint, load_run, RunDir.restore, resume, and the
``minilora`` command). Byte damage (truncations, bit flips, wrong header lengths and headers) is
found by the checksum or the header checks; hostile content written with a correct checksum
(JSON facts of the wrong type or meaning, tensors of the wrong dtype, shape, name or value) by the
checks behind it. The io-level cases (each kind of header fault, npz) are in tests/test_io.py.
"""

from __future__ import annotations

import json
import pickle
import struct
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from minilora import DataError, FileFormatError, io
from minilora.data import load_text
from minilora.train import RunDir, load_run, read_checkpoint
from tests.reliability import files
from tests.reliability.conftest import COUNTS

KINDS = ("base", "lora")
FAST_LOADERS = ("read_checkpoint", "load_run", "restore", "cli")  # resume: fewer examples below


def examples(n: int):
    """n examples; tmp directories are reused (each example overwrites), no deadline."""
    return settings(max_examples=n, deadline=None, suppress_health_check=[
        HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return files.make_runs(tmp_path_factory.mktemp("runs"))


@pytest.fixture(scope="module")
def good_bytes(root):
    return {k: (root / k / "checkpoint.safetensors").read_bytes() for k in KINDS}


def hostile(root):
    return root / "hostile"  # beside base and lora, so a LoRA copy still finds ../base


# ---- byte damage: truncation, bit flips, header length, header ----------------------------

@examples(30)
@given(kind=st.sampled_from(KINDS), loader=st.sampled_from(FAST_LOADERS), data=st.data())
def test_a_truncated_checkpoint_is_refused(root, good_bytes, kind, loader, data):
    raw = good_bytes[kind]
    n = data.draw(st.integers(0, len(raw) - 1), label="length")
    run = files.write_bytes(root / kind, hostile(root), raw[:n])
    assert files.refused(loader, run, root / kind)


@examples(40)
@given(kind=st.sampled_from(KINDS), loader=st.sampled_from(FAST_LOADERS), data=st.data())
def test_a_checkpoint_with_a_flipped_bit_is_refused(root, good_bytes, kind, loader, data):
    raw = bytearray(good_bytes[kind])
    bit = data.draw(st.integers(0, 8 * len(raw) - 1), label="bit")
    raw[bit // 8] ^= 1 << (bit % 8)
    run = files.write_bytes(root / kind, hostile(root), bytes(raw))
    assert files.refused(loader, run, root / kind)


@examples(30)
@given(kind=st.sampled_from(KINDS), loader=st.sampled_from(FAST_LOADERS),
       length=st.one_of(st.integers(0, 2**64 - 1), st.sampled_from([2**64 - 1, 2**63, 10**9,
                                                                      100 * 2**20 + 1])))
def test_a_wrong_or_oversized_header_length_is_refused(root, good_bytes, kind, loader, length):
    raw = good_bytes[kind]
    assume(length != struct.unpack("<Q", raw[:8])[0])
    run = files.write_bytes(root / kind, hostile(root), struct.pack("<Q", length) + raw[8:])
    assert files.refused(loader, run, root / kind)


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
                    | st.text(max_size=8), lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=8)


@examples(30)
@given(kind=st.sampled_from(KINDS), loader=st.sampled_from(FAST_LOADERS), header=JSON)
def test_a_foreign_header_is_refused(root, good_bytes, kind, loader, header):
    """A header that is valid JSON of any shape but not this file's (tensors described wrongly,
    or not at all), over the file's own data."""
    raw = good_bytes[kind]
    (n,) = struct.unpack("<Q", raw[:8])
    text = json.dumps(header).encode()
    run = files.write_bytes(root / kind, hostile(root),
                            struct.pack("<Q", len(text)) + text + raw[8 + n:])
    assert files.refused(loader, run, root / kind)


# ---- hostile JSON facts, with a correct checksum ------------------------------------------

def leaves(obj, path=()):
    """Every (path, value) in a JSON tree, containers included."""
    yield path, obj
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) \
        if isinstance(obj, list) else ()
    for k, v in items:
        yield from leaves(v, (*path, k))


def replaced(obj, path, value):
    if not path:
        return value
    out = json.loads(json.dumps(obj))
    node = out
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    return out


def kind_of(v) -> str:
    return {bool: "bool", int: "number", float: "number", str: "str", list: "list",
            dict: "object", type(None): "null"}[type(v)]


# Facts whose value may take more than one JSON kind: optional (null) or a union (a regex string or
# a list of names). Anything else given a value of another kind must be refused.
UNIONS = {("tokenizer",), ("lora_config", "target_modules"), ("lora_config", "modules_to_save"),
          ("lora_config", "task_type"), ("lora_config", "init_lora_weights"),  # True is "kaiming"
          ("model_config", "n_inner"),
          ("lora_config", "rank_pattern"), ("lora_config", "alpha_pattern"),
          ("train_config", "lr_decay_iters"), ("last_eval", "tokens_per_s")}


@examples(120)
@given(kind=st.sampled_from(KINDS), loader=st.sampled_from(FAST_LOADERS), data=st.data())
def test_json_facts_of_the_wrong_type_are_refused(root, kind, loader, data):
    _, meta = files.parts(root / kind)
    paths = [p for p, _ in leaves(meta) if p]
    path = data.draw(st.sampled_from(paths), label="path")
    old = dict(leaves(meta))[path]
    new = data.draw(JSON.filter(lambda v: kind_of(v) != kind_of(old)), label="value")
    run = files.forge(root / kind, hostile(root), meta=replaced(meta, path, new))
    message = files.refused(loader, run, root / kind)
    if path[:2] not in UNIONS and path[:1] not in UNIONS:
        assert message, f"{path} = {new!r} was accepted"


@examples(60)
@given(kind=st.sampled_from(KINDS), loader=st.sampled_from(FAST_LOADERS), data=st.data())
def test_any_json_fact_changed_is_refused_or_loads_cleanly(root, kind, loader, data):
    """Values of the right kind but any content (a negative iteration, an unknown tokenizer type, a
    rank that does not match the tensors): refused with a FileFormatError, or accepted."""
    _, meta = files.parts(root / kind)
    paths = [p for p, _ in leaves(meta) if p]
    path = data.draw(st.sampled_from(paths), label="path")
    old = dict(leaves(meta))[path]
    same_kind = {"number": st.integers(-3, 2**40) | st.floats(allow_nan=False),
                 "str": st.text(max_size=12) | st.sampled_from(["full", "lora", "char", "byte",
                                                                 "PCG64", "MT19937", "AdamW"]),
                 "bool": st.booleans(), "null": st.none(), "list": st.lists(JSON, max_size=3),
                 "object": st.dictionaries(st.text(max_size=8), JSON, max_size=3)}[kind_of(old)]
    files.refused(loader, files.forge(root / kind, hostile(root),
                                      meta=replaced(meta, path, data.draw(same_kind))),
                  root / kind)


@pytest.mark.parametrize("loader", sorted(files.LOADERS))
@pytest.mark.parametrize("kind", KINDS)
def test_a_tokenizer_smaller_than_the_vocabulary_loads_or_is_refused_naming_the_run(root, kind,
                                                                                     loader):
    """Fewer tokens than the model's vocabulary is allowed (a padded vocabulary), so such a
    checkpoint loads; resuming on data its tokenizer cannot read is refused naming the checkpoint,
    and generate samples only ids the tokenizer can write."""
    _, meta = files.parts(root / kind)
    for chars in ("ab", "a\n"):
        forged = json.loads(json.dumps(meta))
        forged["tokenizer"]["chars"] = chars
        run = files.forge(root / kind, hostile(root), meta=forged)
        message = files.refused(loader, run, root / kind)
        if loader == "resume":
            assert message and "its tokenizer cannot read the run's data" in message
        if loader == "cli" and chars == "a\n":
            assert message is None  # generate wrote its tokens: none outside the tokenizer


@examples(20)
@given(kind=st.sampled_from(KINDS), data=st.data())
def test_resume_refuses_wrong_json_facts_with_a_file_format_error(root, kind, data):
    _, meta = files.parts(root / kind)
    paths = [p for p, _ in leaves(meta) if p and p[:1] not in UNIONS and p[:2] not in UNIONS]
    path = data.draw(st.sampled_from(paths), label="path")
    old = dict(leaves(meta))[path]
    new = data.draw(JSON.filter(lambda v: kind_of(v) != kind_of(old)), label="value")
    run = files.forge(root / kind, hostile(root), meta=replaced(meta, path, new))
    assert files.refused("resume", run, root / kind)


BAD_FACTS = {  # the issue's list: wrong types for iter, rng, configs, tokenizer, optimizer meta
    "iter as a string": ("iter", "4"), "iter negative": ("iter", -1),
    "iter past max_iters": ("iter", 10**6), "rng not a list": ("rng", {"a": 1}),
    "rng of another generator": ("rng", [{"bit_generator": "MT19937", "state": {}}] * 3),
    "rng state damaged": ("rng", [{"bit_generator": "PCG64", "state": {"state": "x"}}] * 3),
    "model_config a list": ("model_config", [1, 2]),
    "model_config n_embd % n_head": ("model_config", {"n_head": 3}),
    "model_config of a huge model": ("model_config", {"n_embd": 2**20, "n_layer": 10**6}),
    "model_config of another size": ("model_config", {"block_size": 8}),
    "model_config dropout a string": ("model_config", {"dropout": "0.1"}),
    "lora_config of another rank": ("lora_config", {"r": 3}),
    "lora_config with an unknown field": ("lora_config", {"rank": 2}),
    "lora_config targeting nothing": ("lora_config", {"target_modules": ["q_proj"]}),
    "train_config lr a string": ("train_config", {"lr": "fast"}),
    "train_config unknown field": ("train_config", {"epochs": 3}),
    "tokenizer chars a number": ("tokenizer", {"type": "char", "chars": 7}),
    # fewer ids than the model's are fine (a padded vocabulary); more can never be embedded
    "tokenizer larger than the vocabulary": ("tokenizer", {"type": "char", "chars": "".join(
        chr(0x100 + i) for i in range(1000))}),
    "tokenizer of unknown type": ("tokenizer", {"type": "bpe"}),
    "optimizer not an object": ("optimizer", "AdamW"),
    "optimizer of unknown type": ("optimizer", {"type": "Lion", "param_groups": []}),
    "elapsed_s negative": ("elapsed_s", -1.0), "format of another program": ("format", "torch"),
    "kind unknown": ("kind", "merged"), "data source a number": ("data", {"source": 1, "seed": 0}),
}


@pytest.mark.parametrize("fact", list(BAD_FACTS))
@pytest.mark.parametrize("kind", KINDS)
def test_each_wrong_fact_named_in_the_issue_is_refused_by_every_loader(root, kind, fact):
    key, value = BAD_FACTS[fact]
    _, meta = files.parts(root / kind)
    if key == "lora_config" and kind == "base":
        pytest.skip("a full model has no lora_config")
    if key in ("train_config", "model_config", "lora_config") and isinstance(value, dict):
        value = {**meta[key], **value}  # one field changed
    run = files.forge(root / kind, hostile(root), meta={**meta, key: value})
    for loader in files.LOADERS:
        message = files.refused(loader, run, root / kind)
        assert message or (kind, loader, fact) in NEEDS_THE_BASE, loader


# an adapter's sizes come from its base: read alone, its file cannot contradict them
NEEDS_THE_BASE = {("lora", "read_checkpoint", "model_config of a huge model"),
                  ("lora", "read_checkpoint", "model_config of another size")}


@pytest.mark.parametrize("text, match", [
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ('{"format": NaN}', "NaN is not JSON"),
    ('{"iter": 1e400}', "out of range"),
    ('{"format": "minilora.run/1", "format": "x"}', "duplicate key"),
    ("not json", "not valid JSON"),
    ("[]", "expected an object"),
])
def test_metadata_that_is_not_strict_json_is_refused(root, text, match):
    run = files.forge(root / "base", hostile(root), raw_meta=text)
    for loader in files.LOADERS:
        message = files.refused(loader, run, root / "base")
        assert loader == "cli" or match in message, message


def test_a_self_referencing_adapter_is_refused_not_followed_forever(root):
    _, meta = files.parts(root / "lora")
    run = files.forge(root / "lora", hostile(root),
                      meta={**meta, "base": {**meta["base"], "path": "."}})
    assert "is a LoRA run, not a model" in files.refused("load_run", run, root / "lora")


@pytest.mark.parametrize("pattern", ["(.*)*z", r"(\w+\.?)+$", ".*.*.*.*.*z"])
def test_an_adapter_with_a_backtracking_regex_is_refused_at_once(root, pattern):
    _, meta = files.parts(root / "lora")
    run = files.forge(root / "lora", hostile(root), meta={
        **meta, "lora_config": {**meta["lora_config"], "target_modules": pattern}})
    assert "exponential time" in files.refused("load_run", run, root / "lora")


@pytest.mark.parametrize("command", [["generate", "--prompt", "the"], ["train", "--resume"]])
def test_the_command_refuses_a_hostile_checkpoint_in_one_line_with_exit_code_2(root, command):
    """The real entry point, in a process of its own (the loaders' tests call cli.main)."""
    _, meta = files.parts(root / "lora")
    run = files.forge(root / "lora", hostile(root), meta={**meta, "iter": "4"})
    flag = "--out" if command[0] == "train" else "--model"
    COUNTS["damaged files"] += 1
    done = subprocess.run([sys.executable, "-m", "minilora.cli", command[0], flag, str(run),
                           *command[1:]], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("minilora: error: ")
    assert f"{run}/checkpoint.safetensors: metadata.iter: expected int, got str" in done.stderr


# ---- hostile tensors, with a correct checksum ------------------------------------------------

def damage_tensor(tensors: dict, name: str, how: str, rng) -> dict:
    out = dict(tensors)
    a = out[name]
    if how == "dtype":
        out[name] = a.astype(rng.choice([np.float16, np.float64, np.int32, np.uint8, np.bool_]))
    elif how == "transpose":
        assume(a.ndim == 2 and a.shape[0] != a.shape[1])
        out[name] = np.ascontiguousarray(a.T)
    elif how == "flatten":
        assume(a.ndim > 1)
        out[name] = a.reshape(-1)
    elif how == "extra axis":
        out[name] = a[None]
    elif how == "one row less":
        assume(a.shape[0] > 1)
        out[name] = a[:-1]
    elif how in ("nan", "inf"):
        b = a.copy().reshape(-1)
        b[rng.integers(b.size)] = np.nan if how == "nan" else -np.inf
        out[name] = b.reshape(a.shape)
    elif how == "renamed":
        out[name + "_x"] = out.pop(name)
    elif how == "missing":
        del out[name]
    elif how == "extra":
        out[name.rsplit(".", 1)[0] + ".extra"] = a
    return out


TENSOR_DAMAGE = ("dtype", "transpose", "flatten", "extra axis", "one row less", "nan", "inf",
                 "renamed", "missing", "extra")


@examples(80)
@given(kind=st.sampled_from(KINDS), loader=st.sampled_from(FAST_LOADERS),
       how=st.sampled_from(TENSOR_DAMAGE), data=st.data())
def test_tensors_of_the_wrong_dtype_shape_name_or_value_are_refused(root, kind, loader, how,
                                                                    data):
    tensors, _ = files.parts(root / kind)
    name = data.draw(st.sampled_from(sorted(tensors)), label="tensor")
    if loader in ("load_run", "cli"):
        assume(name.startswith("model."))  # these read only the weights
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    run = files.forge(root / kind, hostile(root), tensors=damage_tensor(tensors, name, how, rng))
    message = files.refused(loader, run, root / kind)
    # alone, an adapter's file cannot say every shape (that needs its base): read_checkpoint
    # checks what it can (ranks, 2-D), load_run and restore the rest
    assert message or (kind == "lora" and loader == "read_checkpoint")


@examples(10)
@given(kind=st.sampled_from(KINDS), how=st.sampled_from(TENSOR_DAMAGE), data=st.data())
def test_resume_refuses_tensors_of_the_wrong_dtype_shape_name_or_value(root, kind, how, data):
    tensors, _ = files.parts(root / kind)
    name = data.draw(st.sampled_from(sorted(tensors)), label="tensor")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    run = files.forge(root / kind, hostile(root), tensors=damage_tensor(tensors, name, how, rng))
    assert files.refused("resume", run, root / kind)


# ---- the metrics log, read on resume ---------------------------------------------------------

@examples(40)
@given(lines=st.lists(JSON.map(json.dumps) | st.binary(max_size=20).map(
    lambda b: b.decode("latin-1")), min_size=1, max_size=4), torn=st.booleans())
def test_a_damaged_metrics_log_is_refused_or_read_never_anything_else(root, lines, torn):
    run = files.forge(root / "base", hostile(root))
    text = "\n".join(lines) + ("" if torn else "\n")
    (run / "metrics.jsonl").write_bytes(text.encode("utf-8", "surrogatepass"))
    COUNTS["damaged files"] += 1
    try:
        records = RunDir(run).read_metrics()
    except FileFormatError as e:
        assert "metrics.jsonl" in str(e)
        return
    assert all(isinstance(r["iter"], int) for r in records)  # what resume relies on


def test_resume_drops_a_torn_last_metrics_line_and_refuses_a_damaged_one(root):
    run = files.forge(root / "base", hostile(root))
    good = (run / "metrics.jsonl").read_bytes()
    (run / "metrics.jsonl").write_bytes(good + b'{"iter": 6, "train_lo')
    assert RunDir(run).read_metrics() == io.read_jsonl(root / "base" / "metrics.jsonl")
    (run / "metrics.jsonl").write_bytes(b'{"iter": "0"}\n' + good)
    assert "line 1" in files.refused("resume", run, root / "base")
    (run / "metrics.jsonl").write_bytes(good + good)
    assert "does not follow" in files.refused("resume", run, root / "base")


# ---- text data, npz, JSON configs, and no pickle anywhere --------------------------------------

@settings(max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=64))
def test_any_bytes_as_a_data_file_give_text_or_a_data_error_naming_it(tmp_path, raw):
    path = tmp_path / "data.txt"
    path.write_bytes(raw)
    COUNTS["damaged files"] += 1
    try:
        assert isinstance(load_text(path), str)
    except DataError as e:
        assert str(path) in str(e)


@settings(max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=JSON)
def test_a_json_config_of_the_wrong_shape_is_refused_naming_the_file(tmp_path, value):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(value))
    schema = {"n_layer": int, "dropout": float, "target_modules": [str]}
    COUNTS["damaged files"] += 1
    try:
        io.load_json(path, schema)
    except FileFormatError as e:
        assert str(path) in str(e)
    else:
        io.check_schema(value, schema)


def test_no_loader_ever_unpickles(root, tmp_path, monkeypatch):
    """Every loader on good files, and on an npz of object arrays, with pickle made to fail."""
    def no_pickle(*args, **kwargs):
        raise AssertionError("pickle was called")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, no_pickle)
    npz = tmp_path / "adapter.npz"
    np.savez(npz, a=np.array([{"x": 1}], dtype=object))
    with pytest.raises(FileFormatError, match="object arrays"):
        io.load_tensors(npz)
    for kind in KINDS:
        read_checkpoint(root / kind)
        load_run(root / kind)


def test_the_package_never_imports_pickle_or_allows_it():
    from pathlib import Path

    import minilora
    for path in Path(minilora.__file__).parent.rglob("*.py"):
        text = path.read_text()
        assert "import pickle" not in text and "allow_pickle=True" not in text, path
        assert "np.load(" not in text or "allow_pickle=False" in text, path
