"""Models built from minilora's modules: GPT-2 and the Llama family (Llama, Qwen2), and how they
generate text."""

from minilora.models.generation import KVCache, TextStreamer, greedy_completions
from minilora.models.gpt import GPT, GPTConfig
from minilora.models.llama import LlamaConfig, LlamaForCausalLM

__all__ = ["GPT", "GPTConfig", "KVCache", "LlamaConfig", "LlamaForCausalLM", "TextStreamer",
           "greedy_completions"]
