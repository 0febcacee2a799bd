"""Instruction data: a JSON Lines file of ``{"prompt": ..., "completion": ...}`` examples, the loss
on the completion's tokens only (the prompt's targets are ignored, -1), as TRL's SFT trainer does
with such a dataset (``completion_only_loss``).

One example is one row of a batch, padded after its end to the longest row of the batch:

    ids  = encode(prompt) + encode(completion)          (n_p + n_c ids)
    x    = ids[:-1], then pad ids                       (T = the batch's longest n_p + n_c - 1)
    y[j] = ids[j + 1] if j + 1 >= n_p, else -1          (-1 also after the end)

so ``y`` counts exactly the ``n_c`` completion tokens, each predicted from the prompt and the
completion before it. Rows are padded, not packed: the attention has no mask between documents,
so in a packed row an example would attend to the unrelated ones before it, and its positions
would not start at 0 as they do when the model later reads the prompt alone. A causal model never
looks right, so padding after the end changes no counted logit. The prompt and the completion are
encoded apart, so the boundary falls between two tokens as it does when ``generate`` reads the
prompt (a BPE merge across it would otherwise hide the completion's first token).

Lines that are empty or hold only white space are skipped; keys other than the two are ignored
(as TRL drops other columns). Anything else wrong is a [`DataError`][] naming the file and the
line (1-based).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from minilora.configs import positive_int, probability
from minilora.data.tokenizer import CharTokenizer, Tokenizer
from minilora.errors import ConfigError, DataError

IGNORE_INDEX = -1  # the GPT's cross-entropy ignores these targets
PAD_ID = 0  # x after an example's end: any id will do, no counted position reads it
KEYS = ("prompt", "completion")
SPLITS = ("train", "val")


def is_instruct_file(source) -> bool:
    """Whether ``--data`` names instruction data: a file whose name ends in ``.jsonl``."""
    return str(source).lower().endswith(".jsonl")


def read_jsonl(path: str | os.PathLike) -> list[tuple[int, str, str]]:
    """(line number, prompt, completion) of every example in the JSON Lines file ``path``.

    A DataError names the file and the line of the first mistake: not UTF-8, not JSON, not an
    object, a key missing or repeated, a value not a string, an empty prompt or completion; or
    the file missing, empty or without a single example.
    """
    path = Path(path)
    try:
        if path.is_dir():
            raise DataError(f"{path}: is a directory, expected a JSON Lines file")
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file does not exist") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror}") from None
    try:
        text = raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DataError(f"{path}: line {line}: not UTF-8 text: byte 0x{raw[e.start]:02x} at byte "
                        f"offset {e.start}") from None
    examples = [(n, *_example(path, n, line))
                for n, line in enumerate(text.split("\n"), start=1) if line.strip()]
    if not examples:
        raise DataError(f"{path}: no examples: expected one JSON object per line, "
                        '{"prompt": "...", "completion": "..."}')
    return examples


class _RepeatedKey(Exception):
    pass


def _no_repeated_keys(pairs: list[tuple[str, object]]) -> dict:
    """A JSON object, unless a key appears twice in it (json would keep the last silently)."""
    obj = dict(pairs)
    if len(obj) < len(pairs):
        seen = set()
        raise _RepeatedKey(next(k for k, _ in pairs if k in seen or seen.add(k)))
    return obj


def _example(path: Path, n: int, line: str) -> tuple[str, str]:
    where = f"{path}: line {n}"
    try:
        obj = json.loads(line, object_pairs_hook=_no_repeated_keys)
    except _RepeatedKey as e:
        raise DataError(f"{where}: key {e.args[0]!r} appears twice") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not valid JSON: {e.msg} at column {e.colno}") from None
    except RecursionError:
        raise DataError(f"{where}: not valid JSON: nested too deeply") from None
    if not isinstance(obj, dict):
        raise DataError(f'{where}: expected a JSON object {{"prompt": ..., "completion": ...}}, '
                        f"got {type(obj).__name__}")
    missing = [k for k in KEYS if k not in obj]
    if missing:
        found = ", ".join(repr(k) for k in obj) or "none"
        raise DataError(f"{where}: missing {' and '.join(repr(k) for k in missing)} (the keys "
                        f"found: {found})")
    for key in KEYS:
        if not isinstance(obj[key], str):
            raise DataError(f"{where}: {key!r} must be a string, got "
                            f"{'null' if obj[key] is None else type(obj[key]).__name__}")
        if not obj[key]:
            why = "nothing to learn" if key == "completion" else \
                "the completion's first token needs a token before it to be predicted from"
            raise DataError(f"{where}: the {key} is empty: {why}")
    return obj["prompt"], obj["completion"]


class InstructDataset:
    """Prompt-completion examples as token ids, split into ``train`` and ``val`` by position (the
    last ``val_fraction`` of the examples, at least one, held out), batches padded to their
    longest row with the prompts' targets ignored.

    examples: (line number, prompt, completion) as [`read_jsonl`][] gives them;
    tokenizer: default a CharTokenizer of every character of the examples; name: the file.
    """

    task = None  # no built-in task scores it

    def __init__(self, examples, tokenizer: Tokenizer | None = None, val_fraction: float = 0.1,
                 name: str = "<examples>"):
        val_fraction = probability("InstructDataset", "val_fraction", val_fraction)
        examples = list(examples)
        if len(examples) < 2:
            raise DataError(f"{name}: {len(examples)} example{'s' if len(examples) != 1 else ''}; "
                            "at least 2 are needed, one to train on and one to validate with")
        self.name = name
        self.tokenizer = tokenizer if tokenizer is not None else CharTokenizer.from_text(
            "".join(p + c for _, p, c in examples))
        self.lines = [n for n, _, _ in examples]
        self.ids, self.prompt_lengths = [], []
        for n, prompt, completion in examples:
            parts = [self._encode(n, "prompt", prompt), self._encode(n, "completion", completion)]
            self.ids.append(np.concatenate(parts))  # (n_p + n_c,) int64
            self.prompt_lengths.append(len(parts[0]))
        n_train = min(max(int(len(examples) * (1.0 - val_fraction)), 1), len(examples) - 1)
        self.train, self.val = np.arange(n_train), np.arange(n_train, len(examples))

    def _encode(self, n: int, key: str, text: str) -> np.ndarray:
        try:
            return self.tokenizer.encode(text)
        except DataError as e:
            raise type(e)(f"{self.name}: line {n}: {key}: {e}") from None

    @classmethod
    def from_file(cls, path: str | os.PathLike, tokenizer: Tokenizer | None = None,
                  val_fraction: float = 0.1) -> InstructDataset:
        """The examples of the JSON Lines file ``path`` (see [`read_jsonl`][])."""
        return cls(read_jsonl(path), tokenizer, val_fraction, name=str(path))

    def split(self, split: str) -> np.ndarray:
        """The indices of the examples of ``split``."""
        if split not in SPLITS:
            raise ConfigError(f"{self.name}: split must be one of {SPLITS}, got {split!r}")
        return self.train if split == "train" else self.val

    def check_block_size(self, block_size: int) -> None:
        """A DataError naming the first example longer than ``block_size + 1`` tokens (the
        model reads ``block_size`` of them and predicts from each the next)."""
        for i, ids in enumerate(self.ids):
            if len(ids) > block_size + 1:
                n_p = self.prompt_lengths[i]
                raise DataError(f"{self.name}: line {self.lines[i]}: the example is {len(ids)} "
                                f"tokens ({n_p} prompt + {len(ids) - n_p} completion), more than "
                                f"block_size + 1 = {block_size + 1}; shorten it or use a model "
                                "with a longer block_size")

    def get_batch(self, split: str, batch_size: int, block_size: int,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """x, y: (batch_size, T) int64 with T the longest example drawn less one (<= block_size);
        examples drawn as ``rng.integers(len(split), size=batch_size)``."""
        chosen = self.split(split)
        b = positive_int("get_batch", "batch_size", batch_size)
        block_size = positive_int("get_batch", "block_size", block_size)
        if not isinstance(rng, np.random.Generator):
            raise ConfigError(f"get_batch: rng must be a numpy.random.Generator, got "
                              f"{type(rng).__name__}")
        rows = chosen[rng.integers(len(chosen), size=b)]
        t = max(len(self.ids[i]) for i in rows) - 1
        if t > block_size:
            self.check_block_size(block_size)
        x = np.full((b, t), PAD_ID, dtype=np.int64)
        y = np.full((b, t), IGNORE_INDEX, dtype=np.int64)
        for row, i in enumerate(rows):
            ids, n_p = self.ids[i], self.prompt_lengths[i]
            x[row, :len(ids) - 1] = ids[:-1]
            y[row, n_p - 1:len(ids) - 1] = ids[n_p:]  # the completion's tokens only
        return x, y

    def describe(self) -> str:
        """``FILE (90 train / 10 val examples, 1,234 completion tokens, vocabulary 46)``."""
        counted = sum(len(ids) - n_p for ids, n_p in zip(self.ids, self.prompt_lengths,
                                                          strict=True))
        return (f"{self.name} ({len(self.train):,} train / {len(self.val):,} val examples, "
                f"{counted:,} completion tokens, vocabulary {self.tokenizer.vocab_size})")

    def __repr__(self) -> str:
        return (f"InstructDataset({self.name!r}, train={len(self.train)}, val={len(self.val)}, "
                f"vocab_size={self.tokenizer.vocab_size})")
