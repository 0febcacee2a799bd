"""What the LoRA tests share: the tolerance per dtype, layers with a non-zero B, a small model with
GPT-2's module names, Hypothesis strategies, and a snapshot to prove a model was left untouched."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from hypothesis import settings
from hypothesis import strategies as st

from minilora import Tensor, ops
from minilora.lora import LoRALinear
from minilora.nn import Embedding, LayerNorm, Linear, Module, ModuleList

# ---- the tolerance, written once -------------------------------------------------------------
#
# A sum of n products computed in floating point differs from the exact sum by at most
#     gamma_n * M,   gamma_n = n u / (1 - n u),   u = eps / 2,   M = the same sum over |terms|
# whatever the summation order (BLAS blocking, FMA): Higham, "Accuracy and Stability of Numerical
# Algorithms", 2nd ed., section 3.1. Our oracle is float64 NumPy on the same inputs, with its own
# such error, and every formula adds at most two more roundings (a scaling, an addition). So:
#
#     |computed - exact| <= (n + 2) * eps(dtype) * M        elementwise,
#
# eps(float32) = 2**-23 = 1.19e-7 and eps(float64) = 2**-52 = 2.22e-16: the bound is rigorous, not
# tuned, and a real mistake (a flipped sign, a missing s = alpha / r) is O(M), 1 / ((n + 2) eps)
# times the bound: about 8e4 for a float32 sum of 100 terms.
EPS = {np.dtype(np.float32): float(np.finfo(np.float32).eps),
       np.dtype(np.float64): float(np.finfo(np.float64).eps)}
DTYPES = (np.float32, np.float64)


def assert_within_rounding(actual, expected, magnitude, n_terms: int, dtype) -> None:
    """|actual - expected| <= (n_terms + 2) eps(dtype) magnitude, elementwise (see above)."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    bound = (n_terms + 2) * EPS[np.dtype(dtype)] * np.asarray(magnitude, np.float64)
    excess = np.abs(actual - expected) - bound
    worst = np.unravel_index(np.argmax(excess), excess.shape) if excess.size else ()
    assert np.all(excess <= 0), (
        f"off by {np.abs(actual - expected)[worst]:.3g} at {worst}, "
        f"allowed {bound[worst] if bound.ndim else bound:.3g} ({np.dtype(dtype)})")


PROPERTY = settings(max_examples=40, deadline=None)  # the nine properties, each over 40 draws


# ---- layers ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class LayerSpec:
    """A LoRALinear to build: shapes, rank, alpha, dtype, seed; B drawn non-zero ("trained")."""

    in_features: int
    out_features: int
    r: int
    lora_alpha: float
    dtype: type
    seed: int
    use_rslora: bool = False
    bias: bool = True

    @property
    def scaling(self) -> float:
        """s, computed here from the spec, not read from the layer: lora_alpha / r (or / sqrt r)."""
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def build(self, lora_dropout: float = 0.0) -> LoRALinear:
        rng = np.random.default_rng(self.seed)
        base = Linear(self.in_features, self.out_features, self.bias, self.dtype, rng)
        layer = LoRALinear(base, self.r, self.lora_alpha, lora_dropout, self.use_rslora, rng=rng)
        layer.lora_B.data = rng.normal(0.0, 1.0, layer.lora_B.shape).astype(self.dtype)
        return layer

    def inputs(self, rows: int = 5) -> np.ndarray:
        """x: (2, rows, in), leading axes like (B, T) in a transformer."""
        rng = np.random.default_rng(self.seed + 1)
        return rng.normal(0.0, 1.0, (2, rows, self.in_features)).astype(self.dtype)


@st.composite
def layer_specs(draw, max_features: int = 12, max_r: int = 8) -> LayerSpec:
    return LayerSpec(
        in_features=draw(st.integers(1, max_features)),
        out_features=draw(st.integers(1, max_features)),
        r=draw(st.integers(1, max_r)),
        lora_alpha=draw(st.one_of(st.integers(1, 64), st.floats(0.25, 64.0))),
        dtype=draw(st.sampled_from(DTYPES)),
        seed=draw(st.integers(0, 2**31 - 1)),
        use_rslora=draw(st.booleans()),
        bias=draw(st.booleans()),
    )


def oracle_output(layer: LoRALinear, x: np.ndarray, s: float) -> tuple[np.ndarray, np.ndarray]:
    """(y, M) in float64 from the layer's own arrays: y = x W^T + b + s (x A^T) B^T, and M the
    same expression over absolute values (the magnitude in the rounding bound)."""
    W, A, B = (np.asarray(a, np.float64) for a in (layer.weight.data, layer.lora_A.data,
                                                   layer.lora_B.data))
    b = np.zeros(W.shape[0]) if layer.bias is None else layer.bias.data.astype(np.float64)
    x = x.astype(np.float64)
    y = x @ W.T + b + s * (x @ A.T) @ B.T
    M = np.abs(x) @ np.abs(W).T + np.abs(b) + s * (np.abs(x) @ np.abs(A).T) @ np.abs(B).T
    return y, M


# ---- a small model with GPT-2's module names -------------------------------------------------

class Attn(Module):
    def __init__(self, c: int, dtype, rng):
        super().__init__()
        self.c_attn = Linear(c, 3 * c, dtype=dtype, rng=rng)
        self.c_proj = Linear(c, c, dtype=dtype, rng=rng)

    def forward(self, x: Tensor) -> Tensor:  # not attention: the two projections, q, k, v used
        q, k, v = ops.split(self.c_attn(x), 3, axis=-1)
        return self.c_proj(ops.tanh(q) * k + v)


class MLP(Module):
    def __init__(self, c: int, dtype, rng):
        super().__init__()
        self.c_fc = Linear(c, 4 * c, dtype=dtype, rng=rng)
        self.c_proj = Linear(4 * c, c, dtype=dtype, rng=rng)

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(ops.gelu(self.c_fc(x)))


class Block(Module):
    def __init__(self, c: int, dtype, rng):
        super().__init__()
        self.ln_1 = LayerNorm(c, dtype=dtype)
        self.attn = Attn(c, dtype, rng)
        self.ln_2 = LayerNorm(c, dtype=dtype)
        self.mlp = MLP(c, dtype, rng)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Transformer(Module):
    def __init__(self, vocab: int, c: int, n_layer: int, dtype, rng):
        super().__init__()
        self.wte = Embedding(vocab, c, dtype=dtype, rng=rng)
        self.h = ModuleList(Block(c, dtype, rng) for _ in range(n_layer))
        self.ln_f = LayerNorm(c, dtype=dtype)


class ToyGPT(Module):
    """transformer.wte, transformer.h.N.{ln_1, attn.c_attn, attn.c_proj, ln_2, mlp.c_fc,
    mlp.c_proj}, transformer.ln_f, lm_head tied to wte: GPT-2's names on a model of a few lines.
    idx: (B, T) integers -> logits (B, T, vocab). c_attn's output is q, k, v, as GPT-2's."""

    fused_projections = {"c_attn": ("q", "k", "v")}  # noqa: RUF012 (read, never changed)

    def __init__(self, vocab: int = 7, c: int = 4, n_layer: int = 2, dtype=np.float64,
                 seed: int = 0):
        super().__init__()
        rng = np.random.default_rng(seed)
        self.transformer = Transformer(vocab, c, n_layer, dtype, rng)
        self.lm_head = Linear(c, vocab, bias=False, dtype=dtype, rng=rng)
        self.lm_head.weight = self.transformer.wte.weight

    def forward(self, idx) -> Tensor:
        x = self.transformer.wte(idx)
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x))


def tokens(seed: int, vocab: int = 7, shape=(2, 5)) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, vocab, shape), rng.integers(0, vocab, shape)


# ---- proving a model was left untouched ------------------------------------------------------

def snapshot(model: Module) -> dict:
    """Everything an error could half-change: module types, every array, every requires_grad."""
    return {
        "modules": [(n, type(m).__name__) for n, m in model.named_modules()],
        "state": model.state_dict(),
        "trainable": [(n, p.requires_grad) for n, p in model.named_parameters()],
        "merged": [(n, getattr(m, "merged", None)) for n, m in model.named_modules()],
        "config": model.__dict__.get("lora_config"),
    }


def assert_unchanged(model: Module, before: dict) -> None:
    after = snapshot(model)
    for key in ("modules", "trainable", "merged", "config"):
        assert after[key] == before[key], key
    assert list(after["state"]) == list(before["state"])
    for name, value in before["state"].items():
        np.testing.assert_array_equal(after["state"][name], value, err_msg=name)
        assert after["state"][name].dtype == value.dtype, name


# ---- several adapters ------------------------------------------------------------------------

# Logits of a whole float64 model computed two ways (merged weights, or paths added): each is a
# few dozen sums of <= 4c products in another order, amplified a little by the LayerNorms; 1e-9
# relative sits far above that round-off (~1e-14) and far below a dropped or doubled adapter.
MODEL_TOL = dict(rtol=1e-9, atol=1e-11)


def train_every_adapter(model: Module, seed: int, scale: float = 0.5) -> Module:
    """Stand in for training: every adapter's zero-initialised factor (a Linear's B, an
    Embedding's A) gets random values, so every adapter changes the output."""
    from minilora.lora import LoRAEmbedding, named_lora_layers

    rng = np.random.default_rng(seed)
    for _, layer in named_lora_layers(model):
        for name in layer.adapters:
            a, b = layer.adapter_parameters(name)
            p = a if isinstance(layer, LoRAEmbedding) else b
            p.data = rng.normal(0.0, scale, p.shape).astype(p.dtype)
    return model


def frozen_arrays(model: Module) -> dict[str, np.ndarray]:
    """A copy of every parameter that does not require a gradient, by name."""
    return {n: p.data.copy() for n, p in model.named_parameters() if not p.requires_grad}
