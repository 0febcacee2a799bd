"""GPT-2's byte-level BPE, run by the ``tokenizers`` package (an optional extra:
``pip install "minilora[hf]"``), with the ids ``transformers``' GPT-2 tokenizer gives; and any
other ``tokenizer.json`` (Llama's SentencePiece-style BPE with byte fallback, Qwen2's byte-level
BPE), with the ids of ``transformers``' ``AutoTokenizer`` on the same file.

Text is split by GPT-2's pattern into words (a word keeps the space before it), each word's UTF-8
bytes become 256 printable symbols, and the merges, applied in rank order, join symbols into
tokens. ``tokenizers`` does the work; this class gives it minilora's tokenizer interface
(``encode``, ``decode``, ``vocab_size``, ``to_dict``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from minilora.errors import ConfigError, DataError

EOS = "<|endoftext|>"  # GPT-2's one special token: its bos, eos and unk


def tokenizers_module():
    """The ``tokenizers`` package, or a ConfigError saying how to install it."""
    try:
        import tokenizers
    except ImportError:
        raise ConfigError('the GPT-2 BPE tokenizer needs the tokenizers package: '
                          'pip install "minilora[hf]"') from None
    return tokenizers


class BPETokenizer:
    """A byte-level BPE tokenizer.   encode: text -> ids (n,) int64;  decode: ids -> text.

    Made from a ``tokenizer.json`` ([`from_json`][]) or from GPT-2's ``vocab.json`` and
    ``merges.txt`` contents ([`from_vocab_merges`][]); files are read by
    [`minilora.hf.load_tokenizer`][].
    """

    kind = "bpe"

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer  # a tokenizers.Tokenizer

    @classmethod
    def from_json(cls, text: str) -> BPETokenizer:
        """The tokenizer a ``tokenizer.json`` describes (any model ``tokenizers`` reads)."""
        tk = tokenizers_module()
        if not isinstance(text, str):
            raise ConfigError(f"BPETokenizer: tokenizer JSON must be a string, got "
                              f"{type(text).__name__}")
        try:
            return cls(tk.Tokenizer.from_str(text))
        except Exception as e:  # tokenizers raises its own Exception subclasses
            raise ConfigError(f"BPETokenizer: tokenizers refused the tokenizer JSON: "
                              f"{str(e)[:200]}") from None

    @classmethod
    def from_vocab_merges(cls, vocab: Mapping[str, int],
                          merges: Sequence[tuple[str, str]]) -> BPETokenizer:
        """GPT-2's tokenizer as ``transformers``' ``GPT2Tokenizer`` builds it from its two files:
        byte-level words without a prefix space, no BPE dropout, ``<|endoftext|>`` special."""
        tk = tokenizers_module()
        try:
            tokenizer = tk.Tokenizer(tk.models.BPE(vocab=dict(vocab), merges=list(merges),
                                                   dropout=None, continuing_subword_prefix="",
                                                   end_of_word_suffix="", fuse_unk=False))
        except Exception as e:
            raise ConfigError(f"BPETokenizer: tokenizers refused the vocabulary or merges: "
                              f"{str(e)[:200]}") from None
        tokenizer.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = tk.decoders.ByteLevel()
        tokenizer.add_special_tokens([tk.AddedToken(EOS, special=True, normalized=False)])
        return cls(tokenizer)

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = False) -> np.ndarray:
        """text -> ids (n,) int64, with no special token added around them unless
        ``add_special_tokens`` (then as the file's post-processor says: Llama's ``<s>`` first,
        which ``transformers``' tokenizers add by default)."""
        if not isinstance(text, str):
            raise DataError(f"BPETokenizer.encode: expected a str, got {type(text).__name__}")
        if not isinstance(add_special_tokens, bool):
            raise DataError(f"BPETokenizer.encode: add_special_tokens must be True or False, got "
                            f"{add_special_tokens!r}")
        try:
            ids = self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids
        except Exception as e:  # e.g. a lone surrogate, which has no UTF-8 bytes
            raise DataError(f"BPETokenizer.encode: cannot encode the text: {str(e)[:200]}") \
                from None
        return np.asarray(ids, dtype=np.int64)

    def decode(self, ids) -> str:
        """ids (n,) -> text; byte sequences that are not UTF-8 become U+FFFD, as in GPT-2."""
        arr = np.asarray(ids)
        if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
            raise DataError(f"BPETokenizer.decode: expected a 1-D sequence of integer ids, got "
                            f"shape {arr.shape} dtype {arr.dtype}")
        bad = np.flatnonzero((arr < 0) | (arr >= self.vocab_size))
        if bad.size:
            raise DataError(f"BPETokenizer.decode: id {int(arr[bad[0]])} at position "
                            f"{int(bad[0])} is outside [0, {self.vocab_size})")
        return self._tokenizer.decode(arr.tolist(), skip_special_tokens=False)

    def to_dict(self) -> dict:
        return {"type": self.kind, "tokenizer_json": self._tokenizer.to_str()}

    def __eq__(self, other) -> bool:
        return isinstance(other, BPETokenizer) and \
            self._tokenizer.to_str() == other._tokenizer.to_str()

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self.vocab_size})"
