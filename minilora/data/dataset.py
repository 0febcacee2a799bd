"""Text datasets: a UTF-8 file (or any string) as token ids, a train/val split, random batches.

As nanoGPT: the ids are split 90/10 into train and val by position, and a batch is ``B`` windows of
``T + 1`` consecutive ids at random offsets, ``x`` the first ``T`` and ``y`` the last ``T`` (the
next token at every position). The offsets come from an explicit ``numpy.random.Generator``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from minilora.configs import positive_int, probability
from minilora.data.builtin import Task, builtin_tokenizer, load_builtin
from minilora.data.instruct import InstructDataset, is_instruct_file
from minilora.data.tokenizer import CharTokenizer, Tokenizer
from minilora.errors import ConfigError, DataError

SPLITS = ("train", "val")


def load_text(path: str | os.PathLike) -> str:
    """The text of a UTF-8 file (a leading byte-order mark dropped).

    Missing, a directory, empty, or not UTF-8 is a DataError naming the file (and, for bad UTF-8,
    the byte offset).
    """
    path = Path(path)
    try:
        if not path.exists():
            raise DataError(f"{path}: file does not exist")
        if path.is_dir():
            raise DataError(f"{path}: is a directory, expected a UTF-8 text file")
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror}") from None
    if not raw:
        raise DataError(f"{path}: file is empty")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text: byte 0x{raw[e.start]:02x} at byte offset "
                        f"{e.start}") from None
    return text.removeprefix("\ufeff")


class TextDataset:
    """Token ids of a text, split into ``train`` and ``val``.

    text: the corpus; tokenizer: how to encode it (default: a CharTokenizer of its characters);
    val_fraction: the share of ids, from the end, held out for validation (nanoGPT's 0.1);
    name: what error messages call it (a file name, ``builtin:NAME``); task: the generated task
    a built-in corpus carries (None otherwise).
    """

    def __init__(self, text: str, tokenizer: Tokenizer | None = None, val_fraction: float = 0.1,
                 name: str = "<text>", task: Task | None = None):
        val_fraction = probability("TextDataset", "val_fraction", val_fraction)  # a share in [0, 1)
        if not text:
            raise DataError(f"{name}: the text is empty")
        self.name = name
        self.task = task
        self.tokenizer = tokenizer if tokenizer is not None else CharTokenizer.from_text(text)
        try:
            data = self.tokenizer.encode(text)
        except DataError as e:
            raise type(e)(f"{name}: {e}") from None  # the same kind, now naming the text
        n_train = int(len(data) * (1.0 - val_fraction))
        self.train, self.val = data[:n_train], data[n_train:]  # (N_train,), (N_val,) int64

    @classmethod
    def from_file(cls, path: str | os.PathLike, tokenizer: Tokenizer | None = None,
                  val_fraction: float = 0.1) -> TextDataset:
        """A dataset of the UTF-8 file at ``path`` (see [`load_text`][])."""
        return cls(load_text(path), tokenizer, val_fraction, name=str(path))

    def split(self, split: str) -> np.ndarray:
        if split not in SPLITS:
            raise ConfigError(f"{self.name}: split must be one of {SPLITS}, got {split!r}")
        return self.train if split == "train" else self.val

    def check_block_size(self, block_size: int) -> None:
        """A DataError unless both splits hold at least ``block_size + 1`` tokens."""
        for split in SPLITS:
            n = len(self.split(split))
            if n < block_size + 1:
                raise DataError(f"{self.name}: the {split} split has {n} tokens, fewer than "
                                f"block_size + 1 = {block_size + 1}; use a longer text or a "
                                f"smaller block_size")

    def get_batch(self, split: str, batch_size: int, block_size: int,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """x, y: (batch_size, block_size) int64, ``y[:, t] == x[:, t + 1]`` for t < T - 1.

        Offsets are drawn as ``rng.integers(len - block_size, size=batch_size)``.
        """
        data = self.split(split)
        b = positive_int("get_batch", "batch_size", batch_size)
        t = positive_int("get_batch", "block_size", block_size)
        if not isinstance(rng, np.random.Generator):
            raise ConfigError(f"get_batch: rng must be a numpy.random.Generator, got "
                              f"{type(rng).__name__}")
        if len(data) < t + 1:
            raise DataError(f"{self.name}: the {split} split has {len(data)} tokens, fewer than "
                            f"block_size + 1 = {t + 1}; use a longer text or a smaller block_size")
        starts = rng.integers(len(data) - t, size=b)
        windows = data[starts[:, None] + np.arange(t + 1)]  # (B, T + 1)
        return np.ascontiguousarray(windows[:, :-1]), np.ascontiguousarray(windows[:, 1:])

    def __repr__(self) -> str:
        return (f"TextDataset({self.name!r}, train={len(self.train)}, val={len(self.val)}, "
                f"vocab_size={self.tokenizer.vocab_size})")


def load_dataset(source: str | os.PathLike, tokenizer: Tokenizer | None = None, seed: int = 0,
                 val_fraction: float = 0.1) -> TextDataset | InstructDataset:
    """What ``--data`` names: ``builtin:NAME`` (generated from ``seed``), a JSON Lines file of
    prompt-completion examples (a name ending in ``.jsonl``: [`minilora.data.instruct`][]) or a
    UTF-8 text file.

    A built-in corpus is encoded with the built-in alphabet unless a tokenizer is given (a base
    model's, when fine-tuning); a file, with a CharTokenizer of its own characters unless given.
    """
    if is_instruct_file(source):
        return InstructDataset.from_file(source, tokenizer, val_fraction)
    if isinstance(source, str) and source.startswith("builtin:"):
        corpus = load_builtin(source, seed)
        return TextDataset(corpus.text, tokenizer if tokenizer is not None else builtin_tokenizer(),
                           val_fraction, name=source, task=corpus.task)
    return TextDataset.from_file(source, tokenizer, val_fraction)
