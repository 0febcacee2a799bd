"""Tokenizers: characters (a vocabulary built from the text) and bytes (all 256 values); GPT-2's
BPE, through the ``tokenizers`` package, is in ``bpe.py``.

Both map text to a 1-D ``int64`` array of token ids and back, and save themselves as a small JSON
object (``to_dict``) that [`tokenizer_from_dict`][] turns back into a tokenizer after checking it
field by field, so a damaged or hostile file gives a clear error and nothing else.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from minilora.data.bpe import BPETokenizer
from minilora.errors import ConfigError, DataError, FileFormatError, VocabularyError


def _ids(ids, vocab_size: int, owner: str) -> np.ndarray:
    """Token ids as a 1-D integer array, each in [0, vocab_size)."""
    arr = np.asarray(ids)
    if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
        raise DataError(f"{owner}.decode: expected a 1-D sequence of integer ids, got "
                        f"shape {arr.shape} dtype {arr.dtype}")
    bad = np.flatnonzero((arr < 0) | (arr >= vocab_size))
    if bad.size:
        raise DataError(f"{owner}.decode: id {int(arr[bad[0]])} at position {int(bad[0])} is "
                        f"outside [0, {vocab_size})")
    return arr.astype(np.int64, copy=False)


class CharTokenizer:
    """One token per character. ``chars[i]`` is the character of id ``i``.

    ``CharTokenizer.from_text(text)`` uses the sorted set of characters in ``text`` (as nanoGPT's
    shakespeare_char); ``CharTokenizer(chars)`` keeps the order given, so saved ids stay valid.
    """

    kind = "char"

    def __init__(self, chars: Iterable[str]):
        chars = tuple(chars)
        if not chars:
            raise ConfigError("CharTokenizer: the vocabulary is empty")
        for c in chars:
            if not isinstance(c, str) or len(c) != 1 or 0xD800 <= ord(c) <= 0xDFFF:
                raise ConfigError(f"CharTokenizer: vocabulary entries must be single characters, "
                                  f"got {c!r}")
        if len(set(chars)) != len(chars):
            dup = next(c for c in chars if chars.count(c) > 1)
            raise ConfigError(f"CharTokenizer: character {dup!r} appears twice in the vocabulary")
        self.chars = chars
        codes = np.fromiter(map(ord, chars), dtype=np.int64, count=len(chars))
        self._table = np.full(int(codes.max()) + 1, -1, dtype=np.int64)  # code point -> id
        self._table[codes] = np.arange(len(chars))

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        """The sorted characters of ``text``."""
        return cls(sorted(set(text)))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> np.ndarray:
        """text (n characters) -> ids (n,) int64. A character outside the vocabulary is a
        DataError naming it and its position."""
        codes = np.frombuffer(text.encode("utf-32-le", errors="surrogatepass"), dtype="<u4")
        codes = codes.astype(np.int64)
        inside = codes < len(self._table)
        ids = np.full(codes.shape, -1, dtype=np.int64)
        ids[inside] = self._table[codes[inside]]
        bad = np.flatnonzero(ids < 0)
        if bad.size:
            raise VocabularyError(self._unknown(codes, bad))
        return ids

    def _unknown(self, codes: np.ndarray, bad: np.ndarray, shown: int = 8) -> str:
        """Every character outside the vocabulary at once (the first ``shown`` with where each
        first appears and how often), and what to do about them."""
        found, first, counts = np.unique(codes[bad], return_index=True, return_counts=True)
        order = np.argsort(first)  # as they appear in the text
        parts = [f"{chr(found[k])!r} (U+{found[k]:04X}, "
                 + (f"first at position {bad[first[k]]}, {counts[k]} times)" if counts[k] > 1
                    else f"at position {bad[first[k]]})") for k in order[:shown]]
        more = f" and {len(found) - shown} more" if len(found) > shown else ""
        which = "a character" if len(found) == 1 else f"{len(found)} characters"
        return (f"CharTokenizer: the text holds {which} not in the vocabulary of "
                f"{self.vocab_size} characters: {', '.join(parts)}{more}; remove or replace "
                f"them, or use a model whose tokenizer reads any text (a ByteTokenizer: "
                f"--tokenizer byte when pretraining)")

    def decode(self, ids) -> str:
        """ids (n,) -> text of n characters."""
        return "".join(self.chars[i] for i in _ids(ids, self.vocab_size, "CharTokenizer").tolist())

    def to_dict(self) -> dict:
        return {"type": self.kind, "chars": "".join(self.chars)}

    def __eq__(self, other) -> bool:
        return isinstance(other, CharTokenizer) and self.chars == other.chars

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"


class ByteTokenizer:
    """One token per UTF-8 byte: any text, vocabulary 256. Decoding replaces a byte sequence that
    is not valid UTF-8 (as a sampled model may produce) by U+FFFD."""

    kind = "byte"
    vocab_size = 256

    def encode(self, text: str) -> np.ndarray:
        """text -> ids (n_bytes,) int64."""
        try:
            raw = text.encode("utf-8")
        except UnicodeEncodeError as e:  # a lone surrogate
            raise DataError(f"ByteTokenizer: character {text[e.start]!r} at position {e.start} "
                            f"cannot be written as UTF-8") from None
        return np.frombuffer(raw, dtype=np.uint8).astype(np.int64)

    def decode(self, ids) -> str:
        arr = _ids(ids, 256, "ByteTokenizer")
        return arr.astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def to_dict(self) -> dict:
        return {"type": self.kind}

    def __eq__(self, other) -> bool:
        return isinstance(other, ByteTokenizer)

    def __repr__(self) -> str:
        return "ByteTokenizer()"


Tokenizer = CharTokenizer | ByteTokenizer | BPETokenizer

TOKENIZERS = {"char": CharTokenizer, "byte": ByteTokenizer, "bpe": BPETokenizer}
_FIELDS = {"char": {"type", "chars"}, "byte": {"type"}, "bpe": {"type", "tokenizer_json"}}


def tokenizer_from_dict(d, source: str | None = None) -> Tokenizer:
    """The tokenizer that ``to_dict`` described, checked: ``{"type": "char", "chars": "..."}``,
    ``{"type": "byte"}`` or ``{"type": "bpe", "tokenizer_json": "..."}``.

    Anything else is a ConfigError, or a FileFormatError naming ``source`` (the file it came from)
    when given.
    """
    try:
        if not isinstance(d, Mapping):
            raise ConfigError(f"tokenizer: expected a JSON object, got {type(d).__name__}")
        kind = d.get("type")
        if not isinstance(kind, str) or kind not in TOKENIZERS:
            raise ConfigError(f"tokenizer: type must be one of {sorted(TOKENIZERS)}, got {kind!r}")
        allowed = _FIELDS[kind]
        if set(d) != allowed:
            raise ConfigError(f"tokenizer: a {kind!r} tokenizer has fields {sorted(allowed)}, "
                              f"got {sorted(map(str, d))}")
        if kind == "byte":
            return ByteTokenizer()
        if kind == "bpe":
            return BPETokenizer.from_json(d["tokenizer_json"])
        if not isinstance(d["chars"], str):
            raise ConfigError(f"tokenizer: chars must be a string, got {type(d['chars']).__name__}")
        return CharTokenizer(d["chars"])
    except ConfigError as e:
        if source is None:
            raise
        raise FileFormatError(f"{source}: {e}") from None
