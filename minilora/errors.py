"""One error hierarchy for the whole package.

Every error minilora raises on purpose is a [`MiniLoRAError`][]. Each subclass also derives from
the matching built-in exception, so ``except ValueError`` keeps working for code that does not know
about minilora. Messages name the module, parameter or file, what was expected and what came.
"""

from __future__ import annotations


class MiniLoRAError(Exception):
    """Base class of every error minilora raises on purpose."""


class ShapeError(MiniLoRAError, ValueError):
    """Operands whose shapes do not fit the operation (matmul, broadcasting, state dicts)."""


class GradError(MiniLoRAError, RuntimeError):
    """Misuse of the autograd engine: backward on a non-scalar without a gradient, a freed graph."""


class ConfigError(MiniLoRAError, ValueError):
    """A configuration value out of range or of the wrong type; names the field."""


class StateDictError(MiniLoRAError, KeyError):
    """A state dict with missing, unexpected or mis-shaped entries."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain
        return str(self.args[0]) if self.args else ""


class TargetModuleError(MiniLoRAError, ValueError):
    """A LoRA target that matches no module, or matches a module LoRA cannot adapt."""


class FileFormatError(MiniLoRAError, ValueError):
    """A file that is missing, damaged, hostile or of the wrong kind; names the file."""


class DataError(MiniLoRAError, ValueError):
    """Training data that cannot be used: empty, not UTF-8, shorter than one block."""


class VocabularyError(DataError):
    """Text holding characters that a character tokenizer's vocabulary does not have."""


class NonFiniteError(MiniLoRAError, FloatingPointError):
    """A NaN or infinity in the loss or the gradients during training."""


class RunLockedError(MiniLoRAError, RuntimeError):
    """A run directory already in use by another live process."""


class BenchmarkError(MiniLoRAError, RuntimeError):
    """The benchmark's PyTorch peer (``benchmarks/torch_peer.py``) stopped before answering."""
