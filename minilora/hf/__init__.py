"""Hugging Face formats: GPT-2 model directories (``transformers``) and LoRA adapters (PEFT),
read and written so that each side opens the other's files; the GPT-2 tokenizer from the same
directory.

A package above ``models`` and ``lora`` (it builds a GPT and applies an adapter) and beside
``train``; it reads and writes through ``minilora.io``. One function per job:

- :func:`from_pretrained` / :func:`save_pretrained`: a model directory (``GPT.from_pretrained``
  and ``model.save_pretrained`` call these);
- :func:`load_adapter` / :func:`save_adapter`: a PEFT adapter directory;
- :func:`load_tokenizer`: the directory's BPE tokenizer (needs ``tokenizers``);
- :func:`is_pretrained_dir`: whether a directory is a Hugging Face model (not a minilora run);
- :func:`stored_tensors`: every tensor of a model directory as stored, by minilora's names,
  without building a model (``minilora check`` compares them with what they should be).
"""

from minilora.hf.peft import load_adapter, save_adapter
from minilora.hf.pretrained import (
    ARCHITECTURES,
    StoredTensor,
    from_pretrained,
    is_pretrained_dir,
    save_pretrained,
    stored_tensors,
)
from minilora.hf.tokenizer import has_tokenizer, load_tokenizer

__all__ = ["ARCHITECTURES", "StoredTensor", "from_pretrained", "has_tokenizer",
           "is_pretrained_dir", "load_adapter", "load_tokenizer", "save_adapter", "save_pretrained",
           "stored_tensors"]
