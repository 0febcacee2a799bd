"""Hugging Face formats: model directories (``transformers``: GPT-2, Llama, Qwen2) and LoRA
adapters (PEFT), read and written so that each side opens the other's files; the tokenizer from
the same directory.

A package above ``models`` and ``lora`` (it builds a model and applies an adapter) and beside
``train``; it reads and writes through ``minilora.io``. One function per job:

- [`from_pretrained`][] / [`save_pretrained`][]: a model directory
  (``minilora.from_pretrained``, ``GPT.from_pretrained``, ``LlamaForCausalLM.from_pretrained``
  and ``model.save_pretrained`` call these); ``ARCHITECTURES``: ``model_type`` -> the module
  with its config map and tensor map;
- [`load_adapter`][] / [`save_adapter`][]: a PEFT adapter directory;
- [`load_tokenizer`][]: the directory's BPE tokenizer (needs ``tokenizers``);
- [`is_pretrained_dir`][]: whether a directory is a Hugging Face model (not a minilora run);
- [`stored_tensors`][]: every tensor of a model directory as stored, by minilora's names,
  without building a model (``minilora check`` compares them with what they should be);
- [`model_file_map`][] / [`adapter_file_map`][]: for each parameter of a model, its key in
  the model's or the adapter's file and whether the file holds it transposed, as data.
"""

from minilora.hf.peft import adapter_file_map, load_adapter, save_adapter
from minilora.hf.pretrained import (
    ARCHITECTURES,
    FileTensor,
    StoredTensor,
    from_pretrained,
    is_pretrained_dir,
    model_file_map,
    save_pretrained,
    stored_tensors,
)
from minilora.hf.tokenizer import has_tokenizer, load_tokenizer

__all__ = ["ARCHITECTURES", "FileTensor", "StoredTensor", "adapter_file_map", "from_pretrained",
           "has_tokenizer", "is_pretrained_dir", "load_adapter", "load_tokenizer",
           "model_file_map", "save_adapter", "save_pretrained", "stored_tensors"]
