"""Instruction data (minilora.data.instruct): prompt-completion JSON Lines, the loss on the
completion's tokens only, padded batches, and a damaged line named by its number."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minilora import cli
from minilora.data import (
    ByteTokenizer,
    CharTokenizer,
    InstructDataset,
    builtin_tokenizer,
    load_dataset,
    read_jsonl,
)
from minilora.errors import DataError
from minilora.models import GPT, GPTConfig
from tests.extras import need

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "majority.jsonl"
# float64 logits of one example alone and in a padded batch: the same sums, a few ulps apart
FLOAT64_ROUND_OFF = 1e-12

texts = st.text(alphabet="abc xyz:\n", min_size=1, max_size=12)


def _write(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines),
                    encoding="utf-8")
    return path


def _counted(dataset, x, y, row):
    """The ids a batch row counts (y not ignored), decoded."""
    return dataset.tokenizer.decode(y[row][y[row] != -1])


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(texts, texts), min_size=2, max_size=6), st.integers(0, 2**32 - 1))
def test_a_batch_counts_each_completion_and_nothing_else(pairs, seed):
    """Row by row: x is the example less its last token then padding; y counts exactly the
    completion's tokens, each at the position of the token before it."""
    data = InstructDataset([(n, p, c) for n, (p, c) in enumerate(pairs, 1)], val_fraction=0.5)
    rng = np.random.default_rng(seed)
    rows = data.split("train")[np.random.default_rng(seed).integers(len(data.train), size=5)]
    x, y = data.get_batch("train", 5, 64, rng)
    assert x.shape == y.shape == (5, max(len(data.ids[i]) for i in rows) - 1)
    for row, i in enumerate(rows):
        prompt, completion = pairs[i]
        n = len(prompt) + len(completion)  # characters: one token each
        assert data.tokenizer.decode(x[row, :n - 1]) == (prompt + completion)[:-1]
        assert (x[row, n - 1:] == 0).all() and (y[row, n - 1:] == -1).all()
        assert (y[row, :len(prompt) - 1] == -1).all()
        assert _counted(data, x, y, row) == completion


def test_the_loss_is_the_mean_over_completion_tokens_of_each_example_read_alone():
    """Padding changes no counted logit (the model is causal), and the prompt's tokens are not
    in the loss: the batch's loss equals the mean cross-entropy of the completion tokens, from
    each example's own forward pass without padding."""
    pairs = [("ab ", "xyz\n"), ("a", "b"), ("xx yy zz: ", "c\n"), ("b: ", "aaaa\n")]
    data = InstructDataset([(n, p, c) for n, (p, c) in enumerate(pairs, 1)],
                           CharTokenizer("\n :abcxyz"), val_fraction=0.25)
    model = GPT(GPTConfig(vocab_size=data.tokenizer.vocab_size, block_size=16, n_layer=2,
                          n_head=2, n_embd=16, dtype="float64"), seed=0)
    x, y = data.get_batch("train", 6, 16, np.random.default_rng(1))
    loss = model(x, y)[1].item()
    terms = []
    for row in range(len(x)):
        n = int(np.flatnonzero(y[row] != -1).max()) + 1  # the example's length less one
        logits = model(x[row:row + 1, :n])[0].data[0]  # (n, V), alone
        logp = logits - logits.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        terms += [-logp[j, y[row, j]] for j in range(n) if y[row, j] != -1]
    assert abs(loss - np.mean(terms)) < FLOAT64_ROUND_OFF
    fused = model(x, y, skip_logits=True)[1].item()  # training's path: no (B, T, V) logits
    assert abs(fused - np.mean(terms)) < FLOAT64_ROUND_OFF
    assert len(terms) == (y != -1).sum() < (x != 0).sum()  # prompts were left out


def test_the_examples_file_loads_with_the_builtin_tokenizer():
    data = load_dataset(EXAMPLES, tokenizer=builtin_tokenizer())
    assert isinstance(data, InstructDataset) and len(data.train) + len(data.val) == 300
    assert data.describe().startswith(f"{EXAMPLES} (270 train / 30 val examples, ")


def test_bytes_and_bpe_encode_prompt_and_completion_apart(tmp_path):
    """The boundary falls between tokens whatever the tokenizer: the counted targets decode to
    the completion (a BPE merge across the boundary would have taken its first letter)."""
    (tokenizers,) = need("tokenizers")
    from minilora.data import BPETokenizer, load_builtin

    bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False)
    bpe.train_from_iterator([load_builtin("world").text[:50_000]], trainer)
    path = _write(tmp_path / "d.jsonl", [{"prompt": "the ca", "completion": "t sat\n"},
                                         {"prompt": "é", "completion": "ü"}])
    for tokenizer in (ByteTokenizer(), BPETokenizer.from_json(bpe.to_str())):
        data = InstructDataset.from_file(path, tokenizer, val_fraction=0.5)
        x, y = data.get_batch("train", 1, 32, np.random.default_rng(0))
        assert _counted(data, x, y, 0) == "t sat\n", tokenizer


# ---- bad lines -----------------------------------------------------------------------------------
GOOD = {"prompt": "ab: ", "completion": "c\n"}
BAD_LINES = {  # id -> (the bad line, a part of the message after "FILE: line 2: ")
    "not-json": ('{"prompt": "a", "completion": ', "not valid JSON: Expecting value at column"),
    "trailing-comma": ('{"prompt": "a", "completion": "b",}', "not valid JSON"),
    "not-an-object": ('["a", "b"]', 'expected a JSON object {"prompt": ..., "completion": ...}, '
                                    "got list"),
    "missing-completion": ({"prompt": "a", "answer": "b"},
                           "missing 'completion' (the keys found: 'prompt', 'answer')"),
    "missing-both": ({}, "missing 'prompt' and 'completion' (the keys found: none)"),
    "number-prompt": ({"prompt": 3, "completion": "b"}, "'prompt' must be a string, got int"),
    "null-completion": ({"prompt": "a", "completion": None},
                        "'completion' must be a string, got null"),
    "empty-completion": ({"prompt": "a", "completion": ""},
                         "the completion is empty: nothing to learn"),
    "empty-prompt": ({"prompt": "", "completion": "b"}, "the prompt is empty"),
    "repeated-key": ('{"prompt": "a", "completion": "b", "prompt": "c"}',
                     "key 'prompt' appears twice"),
}


@pytest.mark.parametrize("case", list(BAD_LINES))
def test_a_bad_line_is_named_by_file_and_number(case, tmp_path):
    line, message = BAD_LINES[case]
    path = _write(tmp_path / "d.jsonl", [GOOD, line, GOOD])
    with pytest.raises(DataError) as e:
        read_jsonl(path)
    assert str(e.value).startswith(f"{path}: line 2: {message}"), str(e.value)


def test_the_file_as_a_whole_is_checked(tmp_path):
    path = tmp_path / "d.jsonl"
    cases = {b"": "no examples", b"\n  \n": "no examples",
             b'{"prompt": "a", "completion": "b"}\n\xe9\n': "line 2: not UTF-8 text: byte 0xe9"}
    for raw, message in cases.items():
        path.write_bytes(raw)
        with pytest.raises(DataError, match=message):
            read_jsonl(path)
    with pytest.raises(DataError, match="file does not exist"):
        read_jsonl(tmp_path / "none.jsonl")
    with pytest.raises(DataError, match="1 example; at least 2 are needed"):
        InstructDataset.from_file(_write(path, [GOOD]))


def test_blank_lines_are_skipped_and_lines_keep_their_numbers(tmp_path):
    path = _write(tmp_path / "d.jsonl", [GOOD, "", "   ", {**GOOD, "id": 7}, "{"])
    with pytest.raises(DataError, match=r"d.jsonl: line 5: not valid JSON"):
        read_jsonl(path)
    path = _write(path, ["\ufeff" + json.dumps(GOOD), "", {**GOOD, "id": 7}])
    assert [n for n, _, _ in read_jsonl(path)] == [1, 3]  # a BOM and other keys are fine


def test_an_example_too_long_or_unreadable_is_named_by_its_line(tmp_path):
    path = _write(tmp_path / "d.jsonl", [GOOD, GOOD, {"prompt": "dddd", "completion": "bbbbb"}])
    data = InstructDataset.from_file(path)
    data.check_block_size(8)  # 9 tokens: block_size 8 reads them all
    with pytest.raises(DataError, match=r"line 3: the example is 9 tokens \(4 prompt \+ 5 "
                                        r"completion\), more than block_size \+ 1 = 8"):
        data.check_block_size(7)
    with pytest.raises(DataError, match=r"line 3: prompt: CharTokenizer: the text holds a "
                                        r"character not in the vocabulary"):
        InstructDataset.from_file(path, CharTokenizer(": \nabc"))


def _valid_lines(n: int) -> list[str]:
    return [json.dumps({"prompt": f"p{i}: ", "completion": f"c{i}\n"}) for i in range(n)]


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.integers(0, 4), st.data())
def test_a_damaged_line_is_refused_by_its_number_or_still_reads(tmp_path, k, draw):
    """Any damage to one line's bytes (a cut, a replaced run of bytes, an insertion) loads, or
    is a DataError naming the file and that line (or a later one, if a newline went in): never
    another exception, never another line."""
    lines = [s.encode() for s in _valid_lines(5)]
    raw = lines[k]
    i = draw.draw(st.integers(0, len(raw)))
    j = draw.draw(st.integers(i, len(raw)))
    lines[k] = raw[:i] + draw.draw(st.binary(max_size=8)) + raw[j:]
    path = tmp_path / "damaged.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    try:
        examples = read_jsonl(path)
    except DataError as e:
        newlines = lines[k].count(b"\n")
        named = [f"{path}: line {n}:" for n in range(k + 1, k + 2 + newlines)]
        assert any(str(e).startswith(s) for s in named), str(e)
    else:
        assert all(isinstance(p, str) and p and isinstance(c, str) and c
                   for _, p, c in examples)


# ---- the command line ----------------------------------------------------------------------------
TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "40",
        "--batch-size", "4", "--eval-iters", "1", "--eval-interval", "2", "--max-iters", "2",
        "--threads", "1", "--quiet"]


def test_train_reads_jsonl_and_says_how_many_examples(tmp_path, capsys):
    assert cli.main(["train", "--data", str(EXAMPLES), "--out", str(tmp_path / "run"),
                     *TINY, "--grad-accum", "2"]) == 0
    assert "done: iter 2" in capsys.readouterr().out
    capsys.readouterr()
    assert cli.main(["eval", "--model", str(tmp_path / "run"), "--data", str(EXAMPLES),
                     "--eval-iters", "1", "--batch-size", "2"]) == 0
    assert "val loss" in capsys.readouterr().out


def test_a_bad_line_on_the_command_line_is_one_line_exit_code_2(tmp_path, capsys):
    path = _write(tmp_path / "bad.jsonl", [GOOD, GOOD, {"prompt": "a", "completion": 5}])
    assert cli.main(["train", "--data", str(path), "--out", str(tmp_path / "run"), *TINY]) == 2
    err = capsys.readouterr().err
    assert err == f"minilora: error: {path}: line 3: 'completion' must be a string, got int\n"
    assert not (tmp_path / "run").exists()


def test_a_run_on_instruction_data_resumes_bit_for_bit(tmp_path):
    """The data is found again from the run's record (a .jsonl path) and batches continue."""
    from minilora.train import TrainConfig, runs
    from tests.train.conftest import Stop, assert_bit_identical, stop_at, tensors

    config = TrainConfig(batch_size=3, max_iters=4, eval_interval=2, eval_iters=1,
                         warmup_iters=1, seed=0, gradient_accumulation_steps=2)
    model = {"n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 40, "dropout": 0.1}
    runs.pretrain(EXAMPLES, tmp_path / "whole", model, config, quiet=True, threads=1)
    with pytest.raises(Stop):
        runs.pretrain(EXAMPLES, tmp_path / "stopped", model, config, quiet=True, threads=1,
                      on_eval=stop_at(2))
    runs.resume(tmp_path / "stopped", quiet=True, threads=1)
    assert_bit_identical(tensors(tmp_path / "whole"), tensors(tmp_path / "stopped"))
