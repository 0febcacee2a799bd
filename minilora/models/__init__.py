"""Models built from minilora's modules: GPT-2, and the Llama family (Llama, Qwen2)."""

from minilora.models.gpt import GPT, GPTConfig
from minilora.models.llama import KVCache, LlamaConfig, LlamaForCausalLM

__all__ = ["GPT", "GPTConfig", "KVCache", "LlamaConfig", "LlamaForCausalLM"]
