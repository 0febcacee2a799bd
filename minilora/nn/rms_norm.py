"""RMSNorm, the normalization of Llama-family models (``LlamaRMSNorm`` in transformers)."""

from __future__ import annotations

import numpy as np

from minilora import ops
from minilora.errors import ConfigError
from minilora.nn.module import Module, Parameter
from minilora.tensor import Tensor


class RMSNorm(Module):
    """y = weight * x / sqrt(mean(x^2) + eps) over the last axis.   x: (..., C), weight: (C,).

    The weight starts at ones, as in transformers; ``eps`` is HF's ``variance_epsilon``.
    """

    def __init__(self, normalized_shape: int, eps: float = 1e-6, dtype=np.float32):
        super().__init__()
        size = normalized_shape
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
            raise ConfigError(f"RMSNorm: normalized_shape must be a positive integer, got "
                              f"{normalized_shape!r}")
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
            raise ConfigError(f"RMSNorm: eps must be a number >= 0, got {eps!r}")
        self.normalized_shape, self.eps = int(normalized_shape), float(eps)
        self.weight = Parameter(np.ones(self.normalized_shape, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        return ops.rms_norm(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"({self.normalized_shape},), eps={self.eps}"
