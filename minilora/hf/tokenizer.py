"""The tokenizer of a Hugging Face directory: ``tokenizer.json`` (GPT-2's, Llama's, Qwen2's: any
the ``tokenizers`` package reads), or ``vocab.json`` plus ``merges.txt`` (GPT-2's original pair),
read through minilora's safe files and run by ``tokenizers`` (see
[`minilora.data.BPETokenizer`][]).
"""

from __future__ import annotations

from pathlib import Path

from minilora import io
from minilora.data.bpe import BPETokenizer
from minilora.errors import ConfigError, FileFormatError
from minilora.hf import files

TOKENIZER_JSON = "tokenizer.json"
VOCAB = "vocab.json"
MERGES = "merges.txt"


def has_tokenizer(path) -> bool:
    """Whether the directory holds ``tokenizer.json`` or ``vocab.json`` and ``merges.txt``."""
    path = Path(path)
    return (path / TOKENIZER_JSON).is_file() or \
        ((path / VOCAB).is_file() and (path / MERGES).is_file())


def load_tokenizer(path, vocab_size: int | None = None) -> BPETokenizer:
    """The tokenizer in the directory ``path`` (``tokenizer.json`` preferred, as
    ``transformers`` prefers it). vocab_size: the model's; a tokenizer with more ids is refused."""
    directory = files.directory_of(path, "tokenizer")
    try:
        if (directory / TOKENIZER_JSON).exists():
            source = directory / TOKENIZER_JSON
            tokenizer = BPETokenizer.from_json(_text(directory, TOKENIZER_JSON))
        elif (directory / VOCAB).exists() and (directory / MERGES).exists():
            source = directory / VOCAB
            vocab = files.read_json(directory, VOCAB, "vocabulary", {})
            tokenizer = BPETokenizer.from_vocab_merges(_vocab(vocab), _merges(directory))
        else:
            raise FileFormatError(f"{directory}: no {TOKENIZER_JSON}, nor {VOCAB} and {MERGES}")
    except ConfigError as e:
        raise FileFormatError(f"{source}: {e}") from None
    if vocab_size is not None and tokenizer.vocab_size > vocab_size:
        raise FileFormatError(f"{source}: the tokenizer has {tokenizer.vocab_size} tokens, the "
                              f"model's vocabulary {vocab_size}")
    return tokenizer


def _text(directory: Path, name: str) -> str:
    path = files.member(directory, name, "tokenizer file")
    raw = io.read_bytes(path, "tokenizer", io.jsonio.MAX_JSON_BYTES)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise FileFormatError(f"{path}: not UTF-8 at byte {e.start}") from None


def _vocab(vocab) -> dict[str, int]:
    """vocab.json: token -> id, the ids distinct non-negative integers."""
    ids = list(vocab.values())
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids) \
            or len(set(ids)) != len(ids):
        raise ConfigError("vocab.json must map each token to a distinct integer id >= 0")
    return vocab


def _merges(directory: Path) -> list[tuple[str, str]]:
    """merges.txt: a ``#version`` line, then one merge per line, two symbols and one space."""
    merges = []
    for i, line in enumerate(_text(directory, MERGES).split("\n"), 1):
        if not line or (i == 1 and line.startswith("#version")):
            continue
        parts = line.split(" ")
        if len(parts) != 2 or not all(parts):
            raise ConfigError(f"merges.txt line {i}: expected two symbols and one space, got "
                              f"{line[:60]!r}")
        merges.append((parts[0], parts[1]))
    return merges
