"""Data: tokenizers, text datasets with batches, and built-in corpora that need no download."""

from minilora.data.bpe import BPETokenizer
from minilora.data.builtin import (
    ALPHABET,
    BuiltinCorpus,
    ExactMatch,
    Task,
    builtin_tokenizer,
    exact_match,
    list_builtin,
    load_builtin,
)
from minilora.data.dataset import TextDataset, load_dataset, load_text
from minilora.data.tokenizer import ByteTokenizer, CharTokenizer, Tokenizer, tokenizer_from_dict

__all__ = [
    "ALPHABET", "BPETokenizer", "BuiltinCorpus", "ByteTokenizer", "CharTokenizer", "ExactMatch",
    "Task", "TextDataset", "Tokenizer", "builtin_tokenizer", "exact_match", "list_builtin",
    "load_builtin", "load_dataset", "load_text", "tokenizer_from_dict",
]
