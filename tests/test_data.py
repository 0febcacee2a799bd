"""Tokenizers, text datasets and batches, built-in corpora and the exact-match metric."""

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minilora import ConfigError, DataError, FileFormatError
from minilora.data import (
    ALPHABET,
    ByteTokenizer,
    CharTokenizer,
    TextDataset,
    builtin_tokenizer,
    exact_match,
    list_builtin,
    load_builtin,
    load_dataset,
    load_text,
    tokenizer_from_dict,
)
from minilora.data.builtin import CATEGORIES

SMALL = 20_000  # characters: enough to test the generators quickly


# ---- tokenizers -----------------------------------------------------------------------------
@given(st.text(min_size=1, max_size=200))
@settings(max_examples=50, deadline=None)
def test_char_tokenizer_round_trips_any_text_it_was_built_from(text):
    tok = CharTokenizer.from_text(text)
    ids = tok.encode(text)
    assert ids.dtype == np.int64 and ids.shape == (len(text),)
    assert tok.decode(ids) == text


@given(st.text(max_size=200))
@settings(max_examples=50, deadline=None)
def test_byte_tokenizer_round_trips_any_text(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids.shape == (len(text.encode("utf-8")),) and (ids < 256).all()
    assert tok.decode(ids) == text


def test_char_vocabulary_is_the_sorted_characters():
    tok = CharTokenizer.from_text("hello world")
    assert tok.chars == (" ", "d", "e", "h", "l", "o", "r", "w")
    assert tok.encode("hold").tolist() == [3, 5, 4, 1]


def test_unknown_character_is_a_data_error_naming_it_and_its_position():
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(DataError, match=r"'z'.*position 3"):
        tok.encode("abcz")


def test_every_unknown_character_is_reported_at_once_with_what_to_do():
    tok = CharTokenizer.from_text("abc ")
    text = "abc é ñ ß ü " + "é" * 39 + " ø æ å ç ð þ"
    with pytest.raises(DataError) as e:
        tok.encode(text)
    message = str(e.value)
    assert message.startswith("CharTokenizer: the text holds 10 characters not in the "
                              "vocabulary of 4 characters: 'é' (U+00E9, first at position 4, "
                              "40 times), 'ñ' (U+00F1, at position 6), 'ß' (U+00DF, at position 8)")
    assert "and 2 more" in message and "'ð'" not in message  # eight shown, in order of position
    assert message.endswith("remove or replace them, or use a model whose tokenizer reads any "
                            "text (a ByteTokenizer: --tokenizer byte when pretraining)")


def test_decoding_an_id_outside_the_vocabulary_is_a_data_error():
    with pytest.raises(DataError, match="id 7 at position 1"):
        CharTokenizer("ab").decode([0, 7])


@pytest.mark.parametrize("tok", [CharTokenizer("\n ab"), ByteTokenizer()])
def test_tokenizer_json_round_trip(tok):
    again = tokenizer_from_dict(json.loads(json.dumps(tok.to_dict())))
    assert again == tok and again.encode(" ab") .tolist() == tok.encode(" ab").tolist()


@pytest.mark.parametrize("bad", [
    None, [], "char", {}, {"type": "word"}, {"type": "char"}, {"type": "char", "chars": 5},
    {"type": "char", "chars": ""}, {"type": "char", "chars": "aa"},
    {"type": "char", "chars": ["ab"]}, {"type": "char", "chars": "ab", "extra": 1},
    {"type": "byte", "chars": "ab"}, {"type": ["char"]}, {"type": "char", "chars": "\ud800"},
])
def test_hostile_tokenizer_json_is_a_config_error(bad):
    with pytest.raises(ConfigError):
        tokenizer_from_dict(bad)


def test_hostile_tokenizer_json_names_its_file_when_given():
    with pytest.raises(FileFormatError, match=r"tok\.json"):
        tokenizer_from_dict({"type": 3}, source="run/tok.json")


# ---- text files -----------------------------------------------------------------------------
def test_load_text_reads_utf8(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("héllo\n", encoding="utf-8")
    assert load_text(path) == "héllo\n"


@pytest.mark.parametrize(("content", "match"), [
    (None, "does not exist"), (b"", "empty"), (b"ok\xff\xfe", "byte offset 2"),
    ("dir", "directory"),
])
def test_unusable_text_files_are_data_errors_naming_the_file(tmp_path, content, match):
    path = tmp_path / "data.txt"
    if content == "dir":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(DataError, match=match) as info:
        load_text(path)
    assert "data.txt" in str(info.value)


# ---- datasets and batches -------------------------------------------------------------------
def test_split_is_ninety_ten_by_position():
    ds = TextDataset("abcdefghij" * 10)
    assert len(ds.train) == 90 and len(ds.val) == 10
    assert ds.tokenizer.decode(ds.val) == "abcdefghij"


def test_batches_are_windows_with_targets_shifted_by_one():
    ds = TextDataset("".join(chr(0x100 + i) for i in range(1000)))  # distinct: id i at offset i
    x, y = ds.get_batch("train", 8, 16, np.random.default_rng(0))
    assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == np.int64
    starts = x[:, :1]
    np.testing.assert_array_equal(x, starts + np.arange(16))  # a real window of the data
    np.testing.assert_array_equal(y, starts + 1 + np.arange(16))  # the next token of each
    assert (starts + 16 < len(ds.train)).all() and len(set(starts.ravel())) > 1


def test_batches_are_deterministic_for_a_seed():
    ds = load_dataset("builtin:majority")
    a = ds.get_batch("val", 4, 32, np.random.default_rng(5))
    b = ds.get_batch("val", 4, 32, np.random.default_rng(5))
    c = ds.get_batch("val", 4, 32, np.random.default_rng(6))
    np.testing.assert_array_equal(a[0], b[0])
    assert not np.array_equal(a[0], c[0])


def test_a_split_shorter_than_a_block_is_a_data_error():
    ds = TextDataset("abcdefghij" * 5)  # val holds 5 tokens
    with pytest.raises(DataError, match=r"val split has 5 tokens.*block_size \+ 1 = 9"):
        ds.get_batch("val", 2, 8, np.random.default_rng(0))
    with pytest.raises(DataError):
        ds.check_block_size(8)
    ds.get_batch("val", 2, 4, np.random.default_rng(0))  # exactly block_size + 1 is enough


@pytest.mark.parametrize("kwargs", [{"split": "test"}, {"batch_size": 0}, {"block_size": -1},
                                    {"rng": 0}])
def test_bad_batch_arguments_are_config_errors(kwargs):
    args = {"split": "train", "batch_size": 2, "block_size": 4, "rng": np.random.default_rng(0),
            **kwargs}
    with pytest.raises(ConfigError):
        TextDataset("abcdefghij" * 5).get_batch(**args)


def test_file_dataset_with_a_foreign_tokenizer_names_file_and_character(tmp_path):
    path = tmp_path / "new.txt"
    path.write_text("abc\nABC\n")
    with pytest.raises(DataError, match=r"new.txt.*'A'.*position 4"):
        load_dataset(path, tokenizer=builtin_tokenizer())


# ---- built-in corpora ---------------------------------------------------------------------
def test_list_builtin_names_a_pretraining_corpus_and_a_task():
    assert {"world", "majority"} <= set(list_builtin())


@pytest.mark.parametrize("name", ["world", "majority"])
def test_builtin_corpora_are_deterministic_for_a_seed(name):
    a, b = load_builtin(name, seed=3, n_chars=SMALL), load_builtin(f"builtin:{name}", 3, SMALL)
    assert a.text == b.text and a.task == b.task
    assert load_builtin(name, seed=4, n_chars=SMALL).text != a.text
    assert len(a.text) >= SMALL


def test_both_corpora_share_one_alphabet_and_pretraining_covers_all_of_it():
    world = load_builtin("world", 0).text
    majority = load_builtin("majority", 0, SMALL)
    assert set(world) == set(ALPHABET)  # every embedding gets trained while pretraining
    assert set(majority.text) <= set(ALPHABET)
    assert all(set(p + a) <= set(ALPHABET) for p, a in majority.task.pairs)
    assert builtin_tokenizer().vocab_size == len(ALPHABET)


def test_heldout_prompts_never_occur_in_the_training_text():
    corpus = load_builtin("majority", 0)
    lines = corpus.text.splitlines()
    prompts = {p for p, _ in corpus.task.pairs}
    assert len(prompts) == len(corpus.task.pairs) == 200
    for prompt in prompts:
        assert not any(line.startswith(prompt) for line in lines), prompt


def test_majority_answers_are_the_category_of_most_words():
    corpus = load_builtin("majority", 1, SMALL)
    category = {w: c for c, ws in CATEGORIES.items() for w in ws}
    examples = [line.split(": ") for line in corpus.text.splitlines()]
    examples += [(p[:-2], a) for p, a in corpus.task.pairs]
    for words, answer in examples:
        cats = [category[w] for w in words.split()]
        assert 3 <= len(cats) <= 6 and 2 * cats.count(answer) > len(cats)


def test_unknown_builtin_is_a_config_error_listing_the_choices():
    with pytest.raises(ConfigError, match="builtin:world"):
        load_builtin("shakespeare")


def test_builtin_dataset_carries_its_task_and_the_builtin_tokenizer():
    ds = load_dataset("builtin:majority")
    assert ds.task is not None and ds.tokenizer == builtin_tokenizer()
    assert load_dataset("builtin:world").task is None


# ---- exact match ----------------------------------------------------------------------------
PAIRS = [("cat dog fig: ", "animal"), ("fig kiwi box: ", "fruit"), ("box cup cat: ", "thing")]


def test_exact_match_counts_completions_up_to_the_first_newline():
    seen = {}

    def generate(prompts, max_new_tokens):
        seen["prompts"], seen["n"] = prompts, max_new_tokens
        return ["animal\ncat", "fruits\n", "thin"]

    result = exact_match(generate, PAIRS)
    assert result.correct == 1 and result.total == 3 and result.accuracy == pytest.approx(1 / 3)
    assert result.completions == ["animal", "fruits", "thin"]
    assert seen["prompts"][0] == "\ncat dog fig: "  # given after a newline, as in training
    assert seen["n"] == len("animal") + 1


def test_exact_match_of_an_oracle_is_one_and_of_the_base_format_is_zero():
    pairs = load_builtin("majority", 0, SMALL).task.pairs
    answers = {"\n" + p: a for p, a in pairs}
    assert exact_match(lambda ps, n: [answers[p] + "\n" for p in ps], pairs).accuracy == 1.0
    assert exact_match(lambda ps, n: ["\n" for _ in ps], pairs).accuracy == 0.0


def test_exact_match_refuses_a_generate_fn_that_returns_the_wrong_thing():
    with pytest.raises(ConfigError):
        exact_match(lambda ps, n: ["animal"], PAIRS)
