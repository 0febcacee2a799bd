"""The kinds of adapter a LoRA layer holds by name, each beside its equation.

    W: (out, in) frozen      A: (r, in) trainable      B: (out, r) trainable, starts at 0

An adapter here is its settings and four short answers: the shapes and first values of its
parameters, its forward pass with the base layer (one op where it can), its path alone (what it
adds when several adapters are active), and the weight it leaves when merged. The arrays
themselves are Parameters of the layer (``lora/layer.py``), named after the adapter.

- ``LinearAdapter``: ΔW = s B A on a Linear; alone, the fused ``ops.lora_linear``.
- ``SlicedAdapter``: k adapters of rank r on k row slices of a fused projection (q and v of
  GPT-2's ``c_attn``); ΔW is s B_i A_i on slice i and 0 elsewhere (``ops.lora_slices``).
- ``EmbeddingAdapter``: PEFT's ``lora_embedding_A`` (r, vocab) = 0 and ``lora_embedding_B``
  (dim, r) random; ΔW = s (B A)^T on W: (vocab, dim) (``ops.lora_embedding``).

- ``DoraAdapter``: DoRA on a Linear, PEFT's ``use_dora``: A, B and the magnitude m (out,);
  W' = m / ||W + s B A||_row * (W + s B A) (``ops.dora_linear``).

A variant is one more class here, beside its own op: its parameters (``PARAMETERS``), its
forward, its path and its merged weight; unmerging needs nothing of it (the layer keeps the
weight each merge replaced). ``base`` is the layer's weight before any merge, for a variant whose
numbers depend on W (DoRA's norm).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from minilora import ops
from minilora.configs import choice, flag, positive_int, positive_number, probability
from minilora.errors import ConfigError
from minilora.lora.config import INIT_LORA_WEIGHTS, lora_scaling
from minilora.lora.residual_init import RESIDUAL_INITS, residual_init
from minilora.ops.dora import dora_weight_norm
from minilora.tensor import Tensor


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


@dataclass(frozen=True)
class LinearAdapter:
    """One adapter on a Linear: y = x W^T + b + s (d(x) A^T) B^T, ΔW = s B A.

    ``owner`` names the layer in error messages (``LoRALinear.r must be ...``).
    """

    r: int
    lora_alpha: float
    lora_dropout: float = 0.0
    use_rslora: bool = False
    init_lora_weights: str = "kaiming"
    owner: str = "LoRALinear"

    PARAMETERS: ClassVar[tuple[str, ...]] = ("lora_A", "lora_B")

    def __post_init__(self) -> None:
        owner = self.owner
        checked = {"r": positive_int(owner, "r", self.r),
                   "lora_alpha": positive_number(owner, "lora_alpha", self.lora_alpha),
                   "lora_dropout": probability(owner, "lora_dropout", self.lora_dropout),
                   "use_rslora": flag(owner, "use_rslora", self.use_rslora),
                   "init_lora_weights": choice(owner, "init_lora_weights", self.init_lora_weights,
                                               INIT_LORA_WEIGHTS)}
        for name, value in checked.items():
            object.__setattr__(self, name, value)

    @property
    def scaling(self) -> float:
        """s = lora_alpha / r (rsLoRA: / sqrt(r)), a Python float: float32 stays float32."""
        return lora_scaling(self.r, self.lora_alpha, self.use_rslora)

    def shapes(self, in_features: int, out_features: int) -> tuple[tuple[int, int], ...]:
        """A: (r, in), B: (out, r)."""
        return (self.r, in_features), (out_features, self.r)

    def initial(self, in_features: int, out_features: int, rng,
                base: np.ndarray | None = None) -> tuple[np.ndarray, ...]:
        """A drawn (``init_lora_A``), B = 0: a fresh adapter changes nothing."""
        a_shape, b_shape = self.shapes(in_features, out_features)
        return init_lora_A(a_shape, self.init_lora_weights, rng), np.zeros(b_shape)

    def residual(self, weight: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """PiSSA or OLoRA: (A, B, W_res) from W (``lora/residual_init.py``); None otherwise."""
        if self.init_lora_weights not in RESIDUAL_INITS:
            return None
        return residual_init(self.init_lora_weights, weight, self.r, self.scaling, self.owner)

    def forward(self, layer, x: Tensor, A: Tensor, B: Tensor) -> Tensor:
        """The base and this adapter in one op, the hot path: ``ops.lora_linear``."""
        return ops.lora_linear(x, layer.weight, layer.bias, A, B, self.scaling,
                               layer.dropout_mask(x, self.lora_dropout))

    def path(self, layer, x: Tensor, A: Tensor, B: Tensor) -> Tensor:
        """s (d(x) A^T) B^T alone: one slice covering every output."""
        return ops.lora_slices(x, A, B, self.scaling, ((0, layer.out_features),),
                               layer.out_features, layer.dropout_mask(x, self.lora_dropout))

    def delta_blocks(self, A: np.ndarray, B: np.ndarray,
                     base: np.ndarray | None = None) -> list[tuple[slice, np.ndarray]]:
        """ΔW as (rows of W, block): here every row, s (B @ A)."""
        return [(slice(None), self.scaling * (B @ A))]

    def full_form(self, A: np.ndarray, B: np.ndarray, out_features: int):
        """(A, B) of a plain adapter with the same ΔW and scaling: this one itself."""
        return A, B

    def counted_rows(self, out_features: int) -> tuple[int, ...]:
        """The widths of the output blocks the adapter writes: () means all of W, one block."""
        return ()


@dataclass(frozen=True)
class SlicedAdapter(LinearAdapter):
    """k adapters of rank r on k row slices of a fused projection, loralib's ``MergedLinear``.

    slices: the (lo, hi) rows of each adapted slice, hi - lo = w; names: theirs (``q``, ``v``).
    A: (k r, in) = [A_1; ...; A_k], B: (k w, r) = [B_1; ...; B_k];
    y[..., lo_i:hi_i] += s (d(x) A_i^T) B_i^T, and ΔW[lo_i:hi_i] = s B_i A_i, 0 on other rows.
    """

    slices: tuple[tuple[int, int], ...] = ()
    names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        widths = {hi - lo for lo, hi in self.slices}
        if not self.slices or len(widths) != 1 or min(widths) < 1 or \
                len(self.names) not in (0, len(self.slices)):
            raise ConfigError(f"{self.owner}: slices must be (lo, hi) row ranges of one width, "
                              f"one name each, got {self.slices} named {self.names}")

    def shapes(self, in_features: int, out_features: int) -> tuple[tuple[int, int], ...]:
        k, (lo, hi) = len(self.slices), self.slices[0]
        return (k * self.r, in_features), (k * (hi - lo), self.r)

    def initial(self, in_features: int, out_features: int, rng,
                base: np.ndarray | None = None) -> tuple[np.ndarray, ...]:
        """Each slice's A drawn as a LinearAdapter's, in slice order; B = 0."""
        a = [init_lora_A((self.r, in_features), self.init_lora_weights, rng) for _ in self.slices]
        return np.concatenate(a, axis=0), np.zeros(self.shapes(in_features, out_features)[1])

    def residual(self, weight: np.ndarray) -> None:
        if self.init_lora_weights in RESIDUAL_INITS:
            raise ConfigError(f"{self.owner}: init_lora_weights={self.init_lora_weights!r} "
                              "factors a whole weight; it does not combine with slices")

    def forward(self, layer, x: Tensor, A: Tensor, B: Tensor) -> Tensor:
        return ops.linear(x, layer.weight, layer.bias) + self.path(layer, x, A, B)

    def path(self, layer, x: Tensor, A: Tensor, B: Tensor) -> Tensor:
        return ops.lora_slices(x, A, B, self.scaling, self.slices, layer.out_features,
                               layer.dropout_mask(x, self.lora_dropout))

    def _blocks(self, A: np.ndarray, B: np.ndarray):
        r, w = self.r, self.slices[0][1] - self.slices[0][0]
        for i, (lo, hi) in enumerate(self.slices):
            yield slice(lo, hi), A[i * r:(i + 1) * r], B[i * w:(i + 1) * w]

    def delta_blocks(self, A: np.ndarray, B: np.ndarray,
                     base: np.ndarray | None = None) -> list[tuple[slice, np.ndarray]]:
        return [(rows, self.scaling * (b @ a)) for rows, a, b in self._blocks(A, B)]

    def full_form(self, A: np.ndarray, B: np.ndarray, out_features: int):
        """A full adapter of rank k r with the same ΔW: A as it is, and B (out, k r) holding B_i
        at rows lo_i:hi_i and columns i r:(i+1) r, zero elsewhere (zero rows for k)."""
        full_B = np.zeros((out_features, len(self.slices) * self.r), dtype=B.dtype)
        for i, (rows, _, b) in enumerate(self._blocks(A, B)):
            full_B[rows, i * self.r:(i + 1) * self.r] = b
        return A, full_B

    def counted_rows(self, out_features: int) -> tuple[int, ...]:
        return tuple(hi - lo for lo, hi in self.slices)


@dataclass(frozen=True)
class EmbeddingAdapter(LinearAdapter):
    """One adapter on an Embedding, PEFT's: y = W[idx] + s A[:, idx]^T B^T, ΔW = s (B A)^T.

    A: (r, vocab) starts at 0, B: (dim, r) ~ N(0, 1) (PEFT's and loralib's choice, the other way
    round from a Linear's). No dropout on the path: PEFT makes the layer but never applies it.
    """

    owner: str = "LoRAEmbedding"

    PARAMETERS: ClassVar[tuple[str, ...]] = ("lora_embedding_A", "lora_embedding_B")

    def initial(self, in_features: int, out_features: int, rng,
                base: np.ndarray | None = None) -> tuple[np.ndarray, ...]:
        a_shape, b_shape = self.shapes(in_features, out_features)
        return np.zeros(a_shape), rng.standard_normal(b_shape)

    def residual(self, weight: np.ndarray) -> None:
        """None: PEFT gives an Embedding its plain initialisation under PiSSA and OLoRA too."""
        return None

    def forward(self, layer, idx: np.ndarray, A: Tensor, B: Tensor) -> Tensor:
        return ops.getitem(layer.weight, idx) + self.path(layer, idx, A, B)

    def path(self, layer, idx: np.ndarray, A: Tensor, B: Tensor) -> Tensor:
        return ops.lora_embedding(idx, A, B, self.scaling)

    def delta_blocks(self, A: np.ndarray, B: np.ndarray,
                     base: np.ndarray | None = None) -> list[tuple[slice, np.ndarray]]:
        return [(slice(None), self.scaling * (B @ A).T)]  # W is (vocab, dim)


@dataclass(frozen=True)
class DoraAdapter(LinearAdapter):
    """DoRA on a Linear (Liu et al., 2024), PEFT's ``use_dora=True``: A and B as LoRA's, and the
    magnitude m: (out,), PEFT's ``lora_magnitude_vector``, trained beside them.

        c = m / ||W + s B A||_row (detached)      y = c * (x W^T + s (x A^T) B^T) + b
        W' = c * (W + s B A)                      ΔW = W' - W

    W is the base weight before any merge (``base``). m starts at ||W + s B A||_row = ||W||_row
    (B = 0), so a fresh adapter changes nothing. Several adapters on a layer add their paths,
    ``(c - 1) * d(x) W^T + c * s (d(x) A^T) B^T`` each, so merging any of them adds its ΔW.
    """

    PARAMETERS: ClassVar[tuple[str, ...]] = ("lora_A", "lora_B", "lora_magnitude_vector")

    def initial(self, in_features: int, out_features: int, rng,
                base: np.ndarray | None = None) -> tuple[np.ndarray, ...]:
        """A and B as LoRA's; m = ||W + s B A||_row, PEFT's ``DoraLinearLayer.update_layer``."""
        A, B = super().initial(in_features, out_features, rng)
        if base is None or base.shape != (out_features, in_features):
            raise ConfigError(f"{self.owner}: DoRA's magnitude starts at the row norms of the "
                              f"base weight ({out_features}, {in_features}), which was not given")
        A, B = A.astype(base.dtype), B.astype(base.dtype)  # the norm in W's dtype, as PEFT's
        return A, B, dora_weight_norm(base, A, B, self.scaling)

    def forward(self, layer, x: Tensor, A: Tensor, B: Tensor, m: Tensor) -> Tensor:
        """``ops.dora_linear`` on W; once another adapter is merged into W, the base output of
        the merged W plus this adapter's path, which holds on to W before the merges."""
        if layer.merged:
            return layer.base_forward(x) + self.path(layer, x, A, B, m)
        return ops.dora_linear(x, layer.weight, layer.bias, A, B, m, self.scaling,
                               layer.dropout_mask(x, self.lora_dropout))

    def path(self, layer, x: Tensor, A: Tensor, B: Tensor, m: Tensor) -> Tensor:
        """(c - 1) * d(x) W^T + c * s (d(x) A^T) B^T alone, on W before any merge."""
        weight = Tensor(layer.base_weight) if layer.merged else layer.weight
        return ops.dora_linear(x, weight, None, A, B, m, self.scaling,
                               layer.dropout_mask(x, self.lora_dropout), with_base=False)

    def delta_blocks(self, A: np.ndarray, B: np.ndarray, m: np.ndarray,
                     base: np.ndarray | None = None) -> list[tuple[slice, np.ndarray]]:
        """ΔW = c * (W + s B A) - W = (c - 1) * W + c * s B A, c = m / ||W + s B A||_row."""
        if base is None:
            raise ConfigError(f"{self.owner}: DoRA's ΔW depends on the base weight, which was "
                              "not given")
        c = (m / dora_weight_norm(base, A, B, self.scaling))[:, None]  # the forward's own n
        return [(slice(None), c * (base + self.scaling * (B @ A)) - base)]

    def full_form(self, A: np.ndarray, B: np.ndarray, m: np.ndarray, out_features: int):
        """PEFT's file holds A, B and m as they are."""
        return A, B, m
