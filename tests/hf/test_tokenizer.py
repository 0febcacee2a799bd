"""GPT-2's BPE tokenizer from a Hugging Face directory: the ids ``transformers``' GPT-2 tokenizer
gives, on a few thousand characters of mixed text, for both file layouts (``tokenizer.json``;
``vocab.json`` + ``merges.txt``). The tokenizer is trained in the test on the built-in corpus (no
download). Needs ``tokenizers`` (the ``hf`` extra); the comparison also ``transformers``."""

from __future__ import annotations

import json

import numpy as np
import pytest

from minilora import FileFormatError, hf
from minilora.data import BPETokenizer, load_builtin, tokenizer_from_dict
from tests.extras import need

(tokenizers,) = need("tokenizers")

MIXED = (load_builtin("world").text[:3000]
         + "\n\nDon't panic: it's 3.14159 -- or 22/7?  Tabs\tand   spaces,\r\nCRLF lines.\n"
         + "Accents: café, naïve, Ærøskøbing; Greek: αβγ δέλτα; CJK: 日本語のテキスト; "
         + "emoji: 🙂👍🏽 and a lone ZWJ \u200d; math: ∑ x² ≤ ∞.\n"
         + "def f(x):\n    return {'a': [1, 2, 3]}  # code\n<|endoftext|>next document "
         + "HTTP://EXAMPLE.com/path?q=1&r=2 — “quotes” ‘single’ ... end")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two directories with the same trained byte-level BPE: tokenizer.json, and the pair."""
    tk = tokenizers
    tokenizer = tk.Tokenizer(tk.models.BPE())
    tokenizer.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(vocab_size=600, special_tokens=["<|endoftext|>"],
                                     initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
                                     show_progress=False)
    tokenizer.train_from_iterator([load_builtin("world").text[:200_000]], trainer)
    as_json, as_pair = tmp_path_factory.mktemp("json"), tmp_path_factory.mktemp("pair")
    tokenizer.save(str(as_json / "tokenizer.json"))
    tokenizer.model.save(str(as_pair))
    for d in (as_json, as_pair):
        (d / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 600}))
    return as_json, as_pair


def test_ids_equal_transformers_gpt2_tokenizer_on_mixed_text(trained):
    (transformers,) = need("transformers")
    as_json, as_pair = trained
    theirs = transformers.GPT2Tokenizer.from_pretrained(as_pair)  # reads vocab.json, merges.txt
    expected = theirs(MIXED)["input_ids"]
    assert len(MIXED) > 3000 and len(expected) > 1000
    assert theirs.convert_tokens_to_ids("<|endoftext|>") in expected
    for directory in (as_pair, as_json):
        ours = hf.load_tokenizer(directory)
        assert ours.encode(MIXED).tolist() == expected, directory.name
        assert ours.vocab_size == len(theirs)
    from_json = transformers.AutoTokenizer.from_pretrained(as_json)
    assert from_json(MIXED)["input_ids"] == expected


@pytest.fixture(scope="module")
def llama_style(tmp_path_factory):
    """A directory as a Llama 2 checkpoint holds its tokenizer: SentencePiece-style BPE (words
    marked by a leading ``▁``, no byte-level alphabet) with byte fallback (``<0x00>`` ...
    ``<0xFF>`` after ``<unk>``, ``<s>``, ``</s>``), a post-processor that puts ``<s>`` first, and
    the ``tokenizer_config.json`` that makes transformers pick ``LlamaTokenizer``. Trained here."""
    tk = tokenizers
    tokenizer = tk.Tokenizer(tk.models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tokenizer.pre_tokenizer = tk.pre_tokenizers.Metaspace(replacement="▁",
                                                          prepend_scheme="first", split=False)
    tokenizer.decoder = tk.decoders.Sequence([
        tk.decoders.Replace("▁", " "), tk.decoders.ByteFallback(), tk.decoders.Fuse(),
        tk.decoders.Strip(" ", 1, 0)])
    specials = ["<unk>", "<s>", "</s>"]
    trainer = tk.trainers.BpeTrainer(vocab_size=600, special_tokens=specials,
                                     show_progress=False)
    tokenizer.train_from_iterator([load_builtin("world").text[:200_000]], trainer)
    d = json.loads(tokenizer.to_str())
    learned = sorted((t for t in d["model"]["vocab"] if t not in specials),
                     key=d["model"]["vocab"].get)
    tokens = specials + [f"<0x{b:02X}>" for b in range(256)] + learned
    d["model"]["vocab"] = {t: i for i, t in enumerate(tokens)}
    for added in d["added_tokens"]:
        added["id"] = tokens.index(added["content"])
    bos = {"SpecialToken": {"id": "<s>", "type_id": 0}}
    d["post_processor"] = {"type": "TemplateProcessing",
                           "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
                           "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}},
                                    bos, {"Sequence": {"id": "B", "type_id": 1}}],
                           "special_tokens": {"<s>": {"id": "<s>", "ids": [1],
                                                      "tokens": ["<s>"]}}}
    directory = tmp_path_factory.mktemp("llama")
    (directory / "tokenizer.json").write_text(json.dumps(d))
    (directory / "config.json").write_text(json.dumps({"model_type": "llama",
                                                       "vocab_size": len(tokens)}))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False, "legacy": False}))
    return directory


def test_a_llama_style_tokenizer_gives_autotokenizers_ids(llama_style):
    """The ids of transformers' LlamaTokenizer on the same files: without special tokens, and
    with them (``<s>`` first, transformers' default); bytes no token holds (CJK, emoji) fall back
    to ``<0xNN>`` tokens; decode gives the text back."""
    (transformers,) = need("transformers")
    theirs = transformers.AutoTokenizer.from_pretrained(llama_style)
    assert type(theirs).__name__ == "LlamaTokenizer"
    ours = hf.load_tokenizer(llama_style, vocab_size=len(theirs))
    ids = ours.encode(MIXED).tolist()
    assert ids == theirs(MIXED, add_special_tokens=False)["input_ids"] and len(ids) > 600
    assert ours.encode(MIXED, add_special_tokens=True).tolist() == theirs(MIXED)["input_ids"] \
        == [1] + ids
    assert any(3 <= i < 259 for i in ids)  # byte fallback was used
    assert ours.decode(ids) == MIXED == theirs.decode(ids)
    assert ours.vocab_size == len(theirs)


def test_decode_gives_the_text_back(trained):
    ours = hf.load_tokenizer(trained[1])
    ids = ours.encode(MIXED)
    assert ids.dtype == np.int64 and ours.decode(ids) == MIXED


def test_a_bpe_tokenizer_round_trips_through_its_dict(trained):
    ours = hf.load_tokenizer(trained[0])
    again = tokenizer_from_dict(json.loads(json.dumps(ours.to_dict())))
    assert isinstance(again, BPETokenizer) and again == ours
    assert again.encode(MIXED).tolist() == ours.encode(MIXED).tolist()


@pytest.mark.parametrize("name, text, shown", [
    ("tokenizer.json", "{not json", "tokenizers refused"),
    ("tokenizer.json", b"\xff\xfe", "not UTF-8"),
    ("vocab.json", '{"a": 0, "b": 0}', "distinct integer id"),
    ("vocab.json", '{"a": "x"}', "distinct integer id"),
    ("vocab.json", "[1, 2]", "expected an object"),
    ("merges.txt", "#version: 0.2\na b c\n", "merges.txt line 2"),
    ("merges.txt", "#version: 0.2\nzz yy\n", "tokenizers refused"),
])
def test_damaged_tokenizer_files_are_refused_naming_the_file(trained, tmp_path, name, text,
                                                             shown):
    directory = tmp_path / "t"
    directory.mkdir()
    source = trained[0] if name == "tokenizer.json" else trained[1]
    for f in source.iterdir():
        (directory / f.name).write_bytes(f.read_bytes())
    (directory / name).write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(FileFormatError) as e:
        hf.load_tokenizer(directory)
    assert shown in str(e.value)


def test_a_tokenizer_larger_than_the_model_is_refused(trained):
    with pytest.raises(FileFormatError, match="600 tokens, the model's vocabulary 500"):
        hf.load_tokenizer(trained[0], vocab_size=500)
    assert hf.has_tokenizer(trained[0]) and hf.has_tokenizer(trained[1])
