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
from typing import ClassVar

import numpy as np

from minilora import nn, ops
from minilora.configs import (
    choice,
    config_from_dict,
    field_name,
    flag,
    other_field,
    positive_int,
    positive_number,
    probability,
)
from minilora.errors import ConfigError, ShapeError
from minilora.models.generation import KVCache, LayerCache, generate
from minilora.ops.attention import merge_heads, split_heads
from minilora.tensor import Tensor, is_grad_enabled, no_grad


@dataclass
class GPTConfig:
    """Hyper-parameters of the model. ``n_embd`` must be divisible by ``n_head``. The defaults are
    nanoGPT's tiny Shakespeare model for a CPU, and a new ``minilora train`` run's.

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
            setattr(self, name, positive_int("GPTConfig", name, getattr(self, name)))
        if self.n_embd % self.n_head:
            raise ConfigError(f"{field_name('GPTConfig', 'n_embd')} ({self.n_embd}) must be "
                              f"divisible by {other_field('GPTConfig', 'n_head')} ({self.n_head})")
        self.dropout = probability("GPTConfig", "dropout", self.dropout)
        self.bias = flag("GPTConfig", "bias", self.bias)
        self.dtype = choice("GPTConfig", "dtype", self.dtype, ("float32", "float64"))
        if self.n_inner is not None:
            self.n_inner = positive_int("GPTConfig", "n_inner", self.n_inner)
        self.layer_norm_epsilon = float(positive_number("GPTConfig", "layer_norm_epsilon",
                                                        self.layer_norm_epsilon))

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

    def forward(self, x: Tensor, cache: LayerCache | None = None) -> Tensor:
        """With ``cache``, x holds the positions after those cached, and attends to all of them."""
        qkv = self.c_attn(x)  # (B, T, 3C)
        if cache is None:
            b, t, _ = x.shape
            weights_dropout = self.attn_dropout.mask((b, self.n_head, t, t), x.dtype)
            y = ops.causal_self_attention(qkv, self.n_head, weights_dropout)  # (B, T, C)
        else:
            q, k, v = (split_heads(z, self.n_head) for z in ops.split(qkv, 3, axis=-1))
            k, v = (Tensor(a) for a in cache.extend(k.data, v.data))  # (B, H, cached + T, hd)
            y = merge_heads(ops.scaled_dot_product_attention(q, k, v, causal=True))
        return self.resid_dropout(self.c_proj(y))


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

    def forward(self, x: Tensor, cache: LayerCache | None = None) -> Tensor:
        x = x + self.attn(self.ln_1(x), cache)
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
    """GPT-2: ``model(idx, targets)`` -> (logits (B, T, V), mean loss); ``model(idx)`` ->
    (logits, None), as nanoGPT.

    seed: fixes the initial weights and the dropout masks (one Generator, ``model.rng``).
    """

    # c_attn's output is the query, key and value, n_embd rows each: the slices a LoRA config's
    # target_slices may name (read by minilora.lora)
    fused_projections: ClassVar[dict[str, tuple[str, ...]]] = {"c_attn": ("q", "k", "v")}
    # the LoRA paper's W_q, W_k, W_v, W_o, and the MLP, as GPT-2's modules (see lora_targets)
    LORA_ROLES: ClassVar[dict[str, str | tuple[str, ...]]] = {
        "q": "c_attn", "k": "c_attn", "v": "c_attn", "o": "attn.c_proj",
        "mlp": ("mlp.c_fc", "mlp.c_proj")}

    gradient_checkpointing = False  # see gradient_checkpointing_enable

    def __init__(self, config: GPTConfig, seed: int | np.random.Generator | None = 0):
        super().__init__()
        self.config = config
        self.rng = nn.make_rng(seed)
        self.transformer = Transformer(config, self.rng)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False, dtype=config.dtype,
                                 rng=self.rng)
        self.lm_head.weight = self.transformer.wte.weight  # weight tying, as GPT-2
        self._init_weights(self.rng)

    def gradient_checkpointing_enable(self) -> None:
        """Recompute each block's activations in the backward pass instead of keeping them
        (``transformers``' name): a block's input is all a training step keeps of it, for the
        cost of a second forward pass of the blocks. The gradients are the same, bit for bit
        (dropout's masks are drawn again from the same generator states)."""
        self.gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        self.gradient_checkpointing = False

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self.gradient_checkpointing

    @classmethod
    def from_pretrained(cls, path, dtype: str = "float32", dropout: float | None = None) -> GPT:
        """A GPT-2 directory as Hugging Face ``transformers`` writes it (``config.json`` and
        ``model.safetensors``, or shards), in eval mode; see [`minilora.hf.from_pretrained`][]."""
        from minilora.hf import from_pretrained  # the file formats sit above the models

        return from_pretrained(path, dtype=dtype, dropout=dropout, model_type="gpt2")

    def save_pretrained(self, path) -> None:
        """Write ``config.json`` and ``model.safetensors`` that ``GPT2LMHeadModel.from_pretrained``
        loads; see [`minilora.hf.save_pretrained`][]."""
        from minilora.hf import save_pretrained

        save_pretrained(self, path)

    @classmethod
    def lora_targets(cls, roles: str) -> dict:
        """The ``LoRAConfig`` fields that adapt the LoRA paper's matrices: ``roles`` is a comma
        list of q, k, v (slices of c_attn, each its own adapter), o (attn.c_proj), mlp (c_fc and
        mlp.c_proj) or all. ``"q,v"`` -> ``target_modules=("c_attn",)``,
        ``target_slices={"c_attn": ("q", "v")}``, the paper's usual choice."""
        names = [r.strip() for r in str(roles).split(",") if r.strip()]
        names = ["q", "k", "v", "o", "mlp"] if names == ["all"] else names
        unknown = [r for r in names if r not in cls.LORA_ROLES]
        if not names or unknown or len(set(names)) < len(names):
            raise ConfigError(f"{field_name('GPT', 'lora_targets')}: expected distinct roles from "
                              f"{', '.join(cls.LORA_ROLES)} or all, got {roles!r}")
        modules = []
        for role in names:
            found = cls.LORA_ROLES[role]
            modules += [m for m in ((found,) if isinstance(found, str) else found)
                        if m not in modules]
        qkv = tuple(r for r in cls.fused_projections["c_attn"] if r in names)
        return {"target_modules": tuple(modules),
                "target_slices": {"c_attn": qkv} if qkv else None}


    def get_num_params(self, non_embedding: bool = True) -> int:
        """The number of parameters, as nanoGPT counts them: every parameter once (the tied
        ``lm_head`` / ``transformer.wte`` weight once), less the position embeddings
        ``transformer.wpe`` (block_size, C) when ``non_embedding`` (the default). The token
        embeddings stay in: through the tie they are the output layer's weights too. LoRA's
        ``A`` and ``B`` count like any parameter; ``num_parameters()`` counts all, wpe included."""
        n = self.num_parameters()
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

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

    def forward(self, idx, targets=None, skip_logits: bool = False):
        """idx: (B, T) integers with T <= block_size; targets: (B, T) integers (-1 is ignored).

        Returns (logits (B, T, V), mean cross-entropy over the targets), as nanoGPT does; the loss
        is None without targets, so ``logits, _ = model(idx)`` always works.

        skip_logits: with targets, return (None, loss) and never form the (B, T, V) logits: the
        final layer norm, ``lm_head`` and the loss run as one op in row chunks
        (``ops.lm_head_cross_entropy``), which is what training calls. Off by default, so that
        ``logits, loss = model(idx, targets)`` gives the logits, as in nanoGPT."""
        x = self._residual(idx)  # (B, T, C)
        tr = self.transformer
        if skip_logits and targets is not None:
            if type(self.lm_head) is nn.Linear and self.lm_head.bias is None \
                    and type(tr.ln_f) is nn.LayerNorm:
                return None, ops.lm_head_cross_entropy(x, tr.ln_f.weight, tr.ln_f.bias,
                                                       self.lm_head.weight, targets,
                                                       tr.ln_f.eps, ignore_index=-1)
            # an adapted lm_head computes its logits its own way: the loss from them, as below
        logits = self.lm_head(tr.ln_f(x))  # (B, T, V)
        loss = None if targets is None else ops.cross_entropy(logits, targets, ignore_index=-1)
        return (None if skip_logits and targets is not None else logits), loss

    def _residual(self, idx, cache: KVCache | None = None) -> Tensor:
        """The residual stream after the last block, (B, T, C), for tokens idx (B, T) at the
        positions that follow the ``cache``'s (from 0 without one); the cache takes their keys
        and values."""
        idx = np.asarray(idx.data if isinstance(idx, Tensor) else idx)
        if idx.ndim != 2:
            raise ShapeError(f"GPT: idx must have shape (B, T), got {idx.shape}")
        start = 0 if cache is None else cache.length
        end = start + idx.shape[1]
        if end > self.config.block_size:
            raise ShapeError(f"GPT: sequence length {end} exceeds block_size "
                             f"{self.config.block_size}")
        tr = self.transformer
        x = tr.drop(tr.wte(idx) + tr.wpe(np.arange(start, end)))  # (B, T, C)
        checkpointed = self.gradient_checkpointing and cache is None and is_grad_enabled()
        for i, block in enumerate(tr.h):
            if checkpointed:
                x = nn.checkpoint_module(block, x)
            else:
                x = block(x, None if cache is None else cache.layers[i])
        if cache is not None:
            cache.length = end
        return x

    def next_logits(self, idx, cache: KVCache | None = None) -> np.ndarray:
        """The logits (B, V) of the token after idx (B, T); with a ``cache``, idx holds only
        the tokens after those it holds. Builds no graph."""
        with no_grad():
            x = self._residual(idx, cache)
            return self.lm_head(self.transformer.ln_f(x[:, -1:])).data[:, -1]

    def new_cache(self) -> KVCache:
        """An empty key/value cache for [`generate`][minilora.models.generation.generate]."""
        return KVCache(self.config.n_layer)

    def generate(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 rng: np.random.Generator | int | None = None,
                 stop_token: int | None = None, streamer=None,
                 vocab_size: int | None = None) -> np.ndarray:
        """Extend idx (B, T) by up to ``max_new_tokens`` tokens -> (B, T + n), n <= max_new_tokens.

        temperature 0 picks the most likely token (greedy); top_k keeps the k most likely.
        stop_token: stop as soon as every row has produced it.
        The prompt is read once; each new token then costs one position, its keys and values
        added to a [`KVCache`][], until the sequence fills ``block_size``. From there the window
        slides and each step reads the last ``block_size`` tokens afresh (their positions moved).
        Builds no graph; runs in eval mode and restores the previous mode after. streamer: as
        ``transformers``' ([`TextStreamer`][minilora.models.generation.TextStreamer] prints as it
        goes). vocab_size: sample only ids below it (a tokenizer smaller than the vocabulary).
        """
        return generate(self, idx, max_new_tokens, temperature, top_k, rng, stop_token,
                        window=self.config.block_size, streamer=streamer, vocab_size=vocab_size)
