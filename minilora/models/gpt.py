"""A GPT-2 language model as nanoGPT writes it, on minilora's engine.

Module and parameter names are GPT-2's (``transformer.wte``, ``transformer.h.N.attn.c_attn``,
``mlp.c_fc``, ``lm_head``, ...), so a LoRA target such as ``c_attn`` means here what it means in
PEFT on GPT-2. One difference from Hugging Face: GPT-2's ``Conv1D`` stores weights as (in, out); our
``Linear.weight`` is (out, in), the transpose.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from minilora import nn, ops
from minilora.configs import config_from_dict
from minilora.errors import ConfigError, ShapeError
from minilora.models import generation
from minilora.tensor import Tensor


@dataclass
class GPTConfig:
    """Hyper-parameters of the model. ``n_embd`` must be divisible by ``n_head``.

    n_inner: the MLP's hidden width; None means ``4 * n_embd`` (GPT-2's ``n_inner``).
    layer_norm_epsilon: the ``eps`` of every LayerNorm (GPT-2's ``layer_norm_epsilon``).
    """

    vocab_size: int = 65
    block_size: int = 64
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = True
    dtype: str = "float32"
    n_inner: int | None = None
    layer_norm_epsilon: float = 1e-5

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ConfigError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
            setattr(self, name, int(value))
        if self.n_embd % self.n_head:
            raise ConfigError(
                f"GPTConfig.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})"
            )
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) \
                or not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"GPTConfig.dropout must be a number in [0, 1), got {self.dropout!r}")
        self.dropout = float(self.dropout)
        if not isinstance(self.bias, bool):
            raise ConfigError(f"GPTConfig.bias must be true or false, got {self.bias!r}")
        if self.dtype not in ("float32", "float64"):
            raise ConfigError(f"GPTConfig.dtype must be 'float32' or 'float64', got {self.dtype!r}")
        if self.n_inner is not None:
            if isinstance(self.n_inner, bool) or not isinstance(self.n_inner, (int, np.integer)) \
                    or self.n_inner < 1:
                raise ConfigError(f"GPTConfig.n_inner must be a positive integer or None, got "
                                  f"{self.n_inner!r}")
            self.n_inner = int(self.n_inner)
        eps = self.layer_norm_epsilon
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) \
                or not (math.isfinite(eps) and eps > 0):
            raise ConfigError(f"GPTConfig.layer_norm_epsilon must be a finite number > 0, got "
                              f"{eps!r}")
        self.layer_norm_epsilon = float(eps)

    @property
    def mlp_size(self) -> int:
        """The MLP's hidden width: ``n_inner``, or ``4 * n_embd`` when that is None."""
        return 4 * self.n_embd if self.n_inner is None else self.n_inner

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d) -> GPTConfig:
        """A config from a JSON object; unknown or missing fields are a ConfigError naming them."""
        return config_from_dict(cls, d, required=("vocab_size", "block_size", "n_layer", "n_head",
                                                  "n_embd"))


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention.   x: (B, T, C) -> (B, T, C)."""

    def __init__(self, config: GPTConfig, rng: np.random.Generator):
        super().__init__()
        c, dtype = config.n_embd, config.dtype
        self.n_head = config.n_head
        self.c_attn = nn.Linear(c, 3 * c, bias=config.bias, dtype=dtype, rng=rng)
        self.c_proj = nn.Linear(c, c, bias=config.bias, dtype=dtype, rng=rng)
        self.attn_dropout = nn.Dropout(config.dropout, rng)
        self.resid_dropout = nn.Dropout(config.dropout, rng)
        self.fused = True  # the fused kernel; False runs the composed reference path

    def forward(self, x: Tensor) -> Tensor:
        qkv = self.c_attn(x)  # (B, T, 3C)
        dropping = self.training and self.attn_dropout.p > 0
        if self.fused and not dropping:
            y = ops.causal_self_attention(qkv, self.n_head)  # (B, T, C)
        else:
            y = self._composed(qkv)
        return self.resid_dropout(self.c_proj(y))

    def _composed(self, qkv: Tensor) -> Tensor:
        """The same attention from primitives, with dropout on the attention weights."""
        b, t, c3 = qkv.shape
        c = c3 // 3
        hd = c // self.n_head
        q, k, v = (ops.transpose(ops.reshape(z, (b, t, self.n_head, hd)), (0, 2, 1, 3))
                   for z in ops.split(qkv, 3, axis=2))  # each (B, H, T, hd)
        att = ops.matmul(q, ops.swapaxes(k, -1, -2)) * (1.0 / math.sqrt(hd))  # (B, H, T, T)
        att = ops.masked_fill(att, np.triu(np.ones((t, t), bool), 1), -np.inf)
        att = self.attn_dropout(ops.softmax(att, axis=-1))
        y = ops.matmul(att, v)  # (B, H, T, hd)
        return ops.reshape(ops.transpose(y, (0, 2, 1, 3)), (b, t, c))


class MLP(nn.Module):
    """x: (B, T, C) -> c_fc (C -> H) -> GELU -> c_proj (H -> C); H = 4C unless ``n_inner``."""

    def __init__(self, config: GPTConfig, rng: np.random.Generator):
        super().__init__()
        c, h, dtype = config.n_embd, config.mlp_size, config.dtype
        self.c_fc = nn.Linear(c, h, bias=config.bias, dtype=dtype, rng=rng)
        self.c_proj = nn.Linear(h, c, bias=config.bias, dtype=dtype, rng=rng)
        self.dropout = nn.Dropout(config.dropout, rng)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(ops.gelu(self.c_fc(x))))


class Block(nn.Module):
    """A pre-LayerNorm transformer block: x + attn(ln_1(x)), then + mlp(ln_2(x))."""

    def __init__(self, config: GPTConfig, rng: np.random.Generator):
        super().__init__()
        eps = config.layer_norm_epsilon
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=eps, bias=config.bias, dtype=config.dtype)
        self.attn = CausalSelfAttention(config, rng)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=eps, bias=config.bias, dtype=config.dtype)
        self.mlp = MLP(config, rng)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """The body: embeddings, the blocks ``h``, and the final LayerNorm ``ln_f``."""

    def __init__(self, config: GPTConfig, rng: np.random.Generator):
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.n_embd, dtype=config.dtype, rng=rng)
        self.wpe = nn.Embedding(config.block_size, config.n_embd, dtype=config.dtype, rng=rng)
        self.drop = nn.Dropout(config.dropout, rng)
        self.h = nn.ModuleList(Block(config, rng) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias,
                                 dtype=config.dtype)


class GPT(nn.Module):
    """GPT-2: ``model(idx)`` -> logits (B, T, V); ``model(idx, targets)`` -> (logits, mean loss).

    seed: fixes the initial weights and the dropout masks (one Generator, ``model.rng``).
    """

    def __init__(self, config: GPTConfig, seed: int | np.random.Generator | None = 0):
        super().__init__()
        self.config = config
        self.rng = nn.make_rng(seed)
        self.transformer = Transformer(config, self.rng)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False, dtype=config.dtype,
                                 rng=self.rng)
        self.lm_head.weight = self.transformer.wte.weight  # weight tying, as GPT-2
        self._init_weights(self.rng)

    @classmethod
    def from_pretrained(cls, path, dtype: str = "float32", dropout: float | None = None) -> GPT:
        """A GPT-2 directory as Hugging Face ``transformers`` writes it (``config.json`` and
        ``model.safetensors``, or shards), in eval mode; see :func:`minilora.hf.from_pretrained`."""
        from minilora.hf import from_pretrained  # the file formats sit above the models

        return from_pretrained(path, dtype=dtype, dropout=dropout, model_type="gpt2")

    def save_pretrained(self, path) -> None:
        """Write ``config.json`` and ``model.safetensors`` that ``GPT2LMHeadModel.from_pretrained``
        loads; see :func:`minilora.hf.save_pretrained`."""
        from minilora.hf import save_pretrained

        save_pretrained(self, path)

    def get_output_embeddings(self) -> nn.Linear:
        """The output layer (``lm_head``), as ``transformers`` names it: what PEFT's
        ``target_modules="all-linear"`` leaves out."""
        return self.lm_head

    def _init_weights(self, rng: np.random.Generator) -> None:
        """nanoGPT's init: N(0, 0.02) for weights and embeddings, zero biases, and
        N(0, 0.02/sqrt(2L)) for the projections that write into the residual stream."""
        dtype = np.dtype(self.config.dtype)
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                p.data = rng.normal(0.0, residual_std, p.shape).astype(dtype)
            elif name.endswith(".weight") and ".ln_" not in name:
                p.data = rng.normal(0.0, 0.02, p.shape).astype(dtype)
            elif name.endswith(".bias") and ".ln_" not in name:
                p.data = np.zeros(p.shape, dtype)

    def forward(self, idx, targets=None):
        """idx: (B, T) integers with T <= block_size; targets: (B, T) integers (-1 is ignored)."""
        idx = np.asarray(idx.data if isinstance(idx, Tensor) else idx)
        if idx.ndim != 2:
            raise ShapeError(f"GPT: idx must have shape (B, T), got {idx.shape}")
        t = idx.shape[1]
        if t > self.config.block_size:
            raise ShapeError(f"GPT: sequence length {t} exceeds block_size "
                             f"{self.config.block_size}")
        tr = self.transformer
        x = tr.drop(tr.wte(idx) + tr.wpe(np.arange(t)))  # (B, T, C)
        for block in tr.h:
            x = block(x)
        logits = self.lm_head(tr.ln_f(x))  # (B, T, V)
        if targets is None:
            return logits
        return logits, ops.cross_entropy(logits, targets, ignore_index=-1)

    def generate(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 rng: np.random.Generator | int | None = None) -> np.ndarray:
        """Extend idx (B, T) by ``max_new_tokens`` sampled tokens -> (B, T + max_new_tokens).

        temperature 0 picks the most likely token (greedy); top_k keeps the k most likely.
        Each step sees the last ``block_size`` tokens. Runs in eval mode and restores the
        previous mode after.
        """
        def next_logits(idx: np.ndarray) -> np.ndarray:
            return self(idx[:, -self.config.block_size:]).data[:, -1, :]

        return generation.generate(self, idx, max_new_tokens, temperature, top_k, rng,
                                   next_logits)
