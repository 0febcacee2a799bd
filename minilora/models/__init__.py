"""Models built from minilora's modules, and how they generate text."""

from minilora.models.generation import KVCache, greedy_completions
from minilora.models.gpt import GPT, GPTConfig

__all__ = ["GPT", "GPTConfig", "KVCache", "greedy_completions"]
