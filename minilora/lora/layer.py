"""LoRALinear: a frozen Linear plus a trainable low-rank path.

    W: (out, in) frozen      A: (r, in) trainable      B: (out, r) trainable, starts at 0

The forward pass is one op, ``ops.lora_linear`` (its equation and gradients are in
``minilora/ops/lora_linear.py``), which never forms ``B A`` and never computes ``dW``; ``merge``
folds the low-rank path into ``W``. The layer keeps the base layer's parameter names (``weight``,
``bias``), so a base model's state dict loads into an adapted model unchanged, and adds ``lora_A``
and ``lora_B``.
"""

from __future__ import annotations

import warnings

import numpy as np

from minilora import ops
from minilora.configs import choice, flag, positive_int, positive_number, probability
from minilora.errors import ConfigError, TargetModuleError
from minilora.lora.config import INIT_LORA_WEIGHTS, lora_scaling
from minilora.nn import Linear, Module, Parameter, make_rng
from minilora.tensor import Tensor, as_tensor


def init_lora_A(shape: tuple[int, int], method: str, rng: np.random.Generator) -> np.ndarray:
    """A: (r, in), float64, as PEFT initialises it.

    "kaiming": PyTorch's ``kaiming_uniform_(A, a=sqrt(5))``: gain sqrt(2 / (1 + a^2)) = sqrt(1/3),
    bound = gain * sqrt(3 / fan_in) = 1 / sqrt(in), so A ~ U(-1/sqrt(in), 1/sqrt(in)).
    "gaussian": A ~ N(0, (1/r)^2), PEFT's ``normal_(A, std=1/r)``.
    """
    r, in_features = shape
    if method == "kaiming":
        bound = 1.0 / np.sqrt(in_features)
        return rng.uniform(-bound, bound, shape)
    return rng.normal(0.0, 1.0 / r, shape)


class LoRALinear(Module):
    """A Linear adapted by LoRA.   x: (..., in) -> (..., out).

    base: the Linear to adapt. Its ``weight`` (out, in) and ``bias`` (out,) Parameters are taken
        over, not copied, and frozen (``requires_grad=False``, ``grad=None``).
    r, lora_alpha, use_rslora: rank and scaling, ``scaling = lora_alpha / r`` (``/ sqrt(r)``).
    lora_dropout: dropout probability on the adapter's input only; masks come from ``rng``.
    init_lora_weights: "kaiming" or "gaussian" for ``lora_A`` (r, in); ``lora_B`` (out, r) is 0.
    rng: a ``numpy.random.Generator`` or a seed, for A's initial values and the dropout masks.
    """

    def __init__(self, base: Linear, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                 use_rslora: bool = False, init_lora_weights: str = "kaiming",
                 rng: np.random.Generator | int | None = None):
        super().__init__()
        if isinstance(base, LoRALinear):
            raise TargetModuleError(f"LoRALinear: the layer is already adapted (r={base.r}); "
                                    "unload it before adapting it again")
        if not isinstance(base, Linear):
            raise TargetModuleError(f"LoRALinear: base must be a Linear, got {type(base).__name__}")
        owner = "LoRALinear"
        self.r = positive_int(owner, "r", r)
        self.lora_alpha = positive_number(owner, "lora_alpha", lora_alpha)
        self.lora_dropout = probability(owner, "lora_dropout", lora_dropout)
        self.use_rslora = flag(owner, "use_rslora", use_rslora)
        self.init_lora_weights = choice(owner, "init_lora_weights", init_lora_weights,
                                        INIT_LORA_WEIGHTS)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.scaling = lora_scaling(self.r, self.lora_alpha, self.use_rslora)
        self.rng = make_rng(rng)

        dtype = base.weight.dtype
        self.weight = _frozen(base.weight)
        self.bias = None if base.bias is None else _frozen(base.bias)
        self.lora_A = Parameter(init_lora_A((self.r, self.in_features), init_lora_weights, self.rng)
                                .astype(dtype))
        self.lora_B = Parameter(np.zeros((self.out_features, self.r), dtype=dtype))
        self.merged = False
        self._disabled = False

    # ---- forward ---------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        """y = x W^T + b + s (dropout(x) A^T) B^T; merged or disabled: y = x W^T + b."""
        x = as_tensor(x)
        if self.merged or self._disabled:  # merged: W already holds the low-rank path
            return ops.linear(x, self.weight, self.bias)
        mask = None if not self.training or self.lora_dropout == 0.0 else \
            ops.dropout_mask(x.shape, self.lora_dropout, self.rng, x.dtype)
        return ops.lora_linear(x, self.weight, self.bias, self.lora_A, self.lora_B, self.scaling,
                               mask)

    # ---- merging ---------------------------------------------------------------------------
    def delta_weight(self) -> np.ndarray:
        """What training added to W: s (B @ A), (out, in), in the layer's dtype."""
        return self.scaling * (self.lora_B.data @ self.lora_A.data)

    def merge(self) -> None:
        """W <- W + s (B @ A); the forward pass becomes the plain linear. Merging a merged layer
        changes nothing and warns, as PEFT does; a disabled adapter is an error."""
        if self.merged:
            warnings.warn("LoRALinear.merge: the adapter is already merged, nothing to do",
                          stacklevel=2)
            return
        if self._disabled:
            raise ConfigError("LoRALinear.merge: the adapter is disabled; enable it before merging")
        W, A, B, s = self.weight, self.lora_A, self.lora_B, self.scaling
        W.data = W.data + s * (B.data @ A.data)
        self.merged = True

    def unmerge(self) -> None:
        """W <- W - s (B @ A): W back, up to round-off; the adapter path is on again. Idempotent."""
        if not self.merged:
            return
        W, A, B, s = self.weight, self.lora_A, self.lora_B, self.scaling
        W.data = W.data - s * (B.data @ A.data)
        self.merged = False

    # ---- switching the adapter off and on ----------------------------------------------------
    @property
    def disable_adapters(self) -> bool:
        """True while the adapter is switched off (the forward pass is the base layer's)."""
        return self._disabled

    def enable_adapters(self, enabled: bool) -> None:
        """Switch the low-rank path on or off, as PEFT's ``LoraLayer.enable_adapters``.

        A merged layer cannot be switched off exactly (unmerging is exact only up to round-off), so
        it is an error: unmerge first.
        """
        if not enabled and self.merged:
            raise ConfigError("LoRALinear.enable_adapters(False): the adapter is merged into the "
                              "weight; unmerge() before disabling it")
        self._disabled = not enabled

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, r={self.r}, lora_alpha={self.lora_alpha}, "
                f"scaling={self.scaling:g}, lora_dropout={self.lora_dropout}, merged={self.merged}")


def _frozen(p: Parameter) -> Parameter:
    p.requires_grad_(False)
    p.grad = None  # a stale gradient on a frozen parameter would invite an optimizer to use it
    return p
