"""minilora: LoRA from first principles, on a small NumPy autograd engine."""

from minilora.errors import (
    ConfigError,
    DataError,
    FileFormatError,
    GradError,
    MiniLoRAError,
    NonFiniteError,
    RunLockedError,
    ShapeError,
    StateDictError,
    TargetModuleError,
)
from minilora.tensor import Tensor, is_grad_enabled, no_grad

__version__ = "0.1.0"

__all__ = [
    "ConfigError", "DataError", "FileFormatError", "GradError", "MiniLoRAError", "NonFiniteError",
    "RunLockedError", "ShapeError", "StateDictError", "TargetModuleError", "Tensor",
    "is_grad_enabled", "no_grad",
]
