"""The layers a GPT is made of: Linear, Embedding, LayerNorm, Dropout.

Shapes and initialisations follow PyTorch: ``Linear.weight`` is ``(out_features, in_features)`` and
starts Kaiming-uniform, so ``U(-1/sqrt(in), 1/sqrt(in))``, as does its bias.
"""

from __future__ import annotations

import math

import numpy as np

from minilora import ops
from minilora.configs import positive_int, probability
from minilora.errors import ShapeError
from minilora.nn.module import Module, Parameter
from minilora.tensor import Tensor, as_tensor


def make_rng(rng: np.random.Generator | int | None) -> np.random.Generator:
    """A Generator from a Generator (used as is), a seed, or None (fresh, not reproducible)."""
    if isinstance(rng, np.random.Generator):
        return rng
    return np.random.default_rng(rng)


class Linear(Module):
    """y = x W^T + b.   x: (..., in) -> (..., out); weight W: (out, in), bias b: (out,)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, dtype=np.float32,
                 rng: np.random.Generator | int | None = None):
        super().__init__()
        self.in_features = positive_int("Linear", "in_features", in_features)
        self.out_features = positive_int("Linear", "out_features", out_features)
        rng = make_rng(rng)
        bound = 1.0 / math.sqrt(in_features)
        weight = rng.uniform(-bound, bound, (out_features, in_features))
        self.weight = Parameter(weight.astype(dtype))
        self.bias = None
        if bias:
            self.bias = Parameter(rng.uniform(-bound, bound, out_features).astype(dtype))

    @classmethod
    def from_weights(cls, weight: Tensor | np.ndarray,
                     bias: Tensor | np.ndarray | None = None) -> Linear:
        """A Linear around existing Parameters (shared, not copied) or arrays (wrapped).

        weight: (out, in); bias: (out,) or None.
        No random initialisation runs; this is how ``merge_and_unload`` turns a LoRALinear back
        into a plain Linear that owns the same (merged) parameters.
        """
        weight = weight if isinstance(weight, Parameter) else Parameter(weight)
        if bias is not None:
            bias = bias if isinstance(bias, Parameter) else Parameter(bias)
        if weight.ndim != 2 or (bias is not None and bias.shape != weight.shape[:1]):
            raise ShapeError(f"Linear.from_weights: weight {weight.shape} must be (out, in) and "
                             f"bias {None if bias is None else bias.shape} must be (out,)")
        layer = cls.__new__(cls)
        Module.__init__(layer)
        layer.out_features, layer.in_features = weight.shape
        layer.weight, layer.bias = weight, bias
        return layer

    def forward(self, x: Tensor) -> Tensor:
        return ops.linear(as_tensor(x), self.weight, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}")


class Embedding(Module):
    """A lookup table: idx (...) of integers in [0, num_embeddings) -> (..., embedding_dim)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, dtype=np.float32,
                 rng: np.random.Generator | int | None = None):
        super().__init__()
        self.num_embeddings = positive_int("Embedding", "num_embeddings", num_embeddings)
        self.embedding_dim = positive_int("Embedding", "embedding_dim", embedding_dim)
        weight = make_rng(rng).standard_normal((num_embeddings, embedding_dim))
        self.weight = Parameter(weight.astype(dtype))

    @classmethod
    def from_weight(cls, weight: Parameter) -> Embedding:
        """An Embedding around an existing (vocab, dim) Parameter, shared, not copied: how
        unloading a LoRA embedding puts the plain layer back. No random initialisation runs."""
        if not isinstance(weight, Parameter) or weight.ndim != 2:
            raise ShapeError("Embedding.from_weight: expected a (vocab, dim) Parameter")
        layer = cls.__new__(cls)
        Module.__init__(layer)
        layer.num_embeddings, layer.embedding_dim = weight.shape
        layer.weight = weight
        return layer

    def forward(self, idx) -> Tensor:
        idx = np.asarray(idx.data if isinstance(idx, Tensor) else idx)
        check_indices(idx, self.num_embeddings, self.embedding_dim)
        return ops.getitem(self.weight, idx)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}"


def check_indices(idx: np.ndarray, num_embeddings: int, embedding_dim: int) -> None:
    """A ShapeError unless ``idx`` holds integers in [0, num_embeddings)."""
    if not np.issubdtype(idx.dtype, np.integer):
        raise ShapeError(f"Embedding: indices must be integers, got dtype {idx.dtype}")
    if idx.size and (idx.min() < 0 or idx.max() >= num_embeddings):
        bad = idx.min() if idx.min() < 0 else idx.max()
        raise ShapeError(f"Embedding({num_embeddings}, {embedding_dim}): index {bad} "
                         f"is outside [0, {num_embeddings})")


class LayerNorm(Module):
    """Normalise the last axis to zero mean and unit variance, then scale and shift. x: (..., C)."""

    def __init__(self, normalized_shape: int, eps: float = 1e-5, bias: bool = True,
                 dtype=np.float32):
        super().__init__()
        self.normalized_shape = positive_int("LayerNorm", "normalized_shape", normalized_shape)
        self.eps = float(eps)
        self.weight = Parameter(np.ones(normalized_shape, dtype=dtype))
        self.bias = Parameter(np.zeros(normalized_shape, dtype=dtype)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        return ops.layer_norm(x, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"({self.normalized_shape},), eps={self.eps}"


class Dropout(Module):
    """Inverted dropout with probability ``p`` while training; identity in eval mode.

    The mask is drawn from ``rng``; modules of one model usually share the model's generator, so
    one seed (and one saved generator state) fixes every mask.
    """

    def __init__(self, p: float = 0.0, rng: np.random.Generator | int | None = None):
        super().__init__()
        self.p = probability("Dropout", "p", p)
        self.rng = make_rng(rng)

    def forward(self, x: Tensor) -> Tensor:
        return ops.dropout(x, self.p, self.rng, self.training)

    def mask(self, shape: tuple[int, ...], dtype) -> np.ndarray | None:
        """The mask ``forward`` would multiply an input of ``shape`` by, or None when it is off
        (eval mode, or p = 0): for an op that applies dropout inside, such as attention."""
        if not self.training or self.p == 0.0:
            return None
        return ops.dropout_mask(shape, self.p, self.rng, dtype)

    def extra_repr(self) -> str:
        return f"p={self.p}"
