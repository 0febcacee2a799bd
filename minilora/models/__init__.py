"""Models built from minilora's modules."""

from minilora.models.gpt import GPT, GPTConfig

__all__ = ["GPT", "GPTConfig"]
