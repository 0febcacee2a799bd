"""Data: tokenizers, text datasets with batches, instruction data (prompt-completion JSON Lines)
and built-in corpora that need no download."""

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
from minilora.data.instruct import InstructDataset, read_jsonl
from minilora.data.tokenizer import ByteTokenizer, CharTokenizer, Tokenizer, tokenizer_from_dict

__all__ = [
    "ALPHABET", "BPETokenizer", "BuiltinCorpus", "ByteTokenizer", "CharTokenizer", "ExactMatch",
    "InstructDataset", "Task", "TextDataset", "Tokenizer", "builtin_tokenizer", "exact_match",
    "list_builtin", "load_builtin", "load_dataset", "load_text", "read_jsonl",
    "tokenizer_from_dict",
]
