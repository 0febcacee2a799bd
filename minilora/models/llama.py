"""Llama-family causal language models (Llama, Qwen2) with Hugging Face's names.

Module and parameter names are transformers' (``model.embed_tokens``,
``model.layers.N.self_attn.{q,k,v,o}_proj``, ``model.layers.N.mlp.{gate,up,down}_proj``,
``input_layernorm``, ``post_attention_layernorm``, ``model.norm``, ``lm_head``), and every
``Linear.weight`` is stored (out, in) as in ``torch.nn.Linear``: a checkpoint's arrays load by name,
untransposed, and LoRA's ``target_modules=["q_proj", "v_proj"]`` means what it means in PEFT.

    x = embed_tokens(idx)                                                      (B, T, C)
    for each layer:
        n = input_layernorm(x);           x = x + o_proj(GQA(RoPE(q_proj(n)), RoPE(k_proj(n)),
                                                             v_proj(n)))
        m = post_attention_layernorm(x);  x = x + down_proj(silu(gate_proj(m)) * up_proj(m))
    logits = lm_head(norm(x))                                                  (B, T, V)

Qwen2 (``model_type="qwen2"``) is the same network with biases on q_proj, k_proj and v_proj.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from minilora import nn, ops
from minilora.errors import ConfigError, ShapeError
from minilora.models.generation import KVCache, LayerCache, generate
from minilora.ops.rotary import rope_tables
from minilora.tensor import Tensor, no_grad

MODEL_TYPES = ("llama", "qwen2")

# Keys of a transformers config.json that change no number minilora computes: bookkeeping,
# generation defaults. ``from_dict`` drops them; any other key it does not know is refused by name.
# (The bos and eos token ids change no number either, but are kept for ``save_pretrained``.)
IGNORED_KEYS = frozenset({
    "_name_or_path", "architectures", "transformers_version", "torch_dtype", "use_cache",
    "sep_token_id", "decoder_start_token_id", "id2label",
    "label2id", "output_attentions", "output_hidden_states", "return_dict", "problem_type",
    "chunk_size_feed_forward", "is_encoder_decoder", "tie_encoder_decoder", "tokenizer_class",
    "prefix", "task_specific_params", "finetuning_task", "torchscript", "pruned_heads",
    "max_length", "min_length", "do_sample", "num_beams", "temperature", "top_k", "top_p",
    "pretraining_tp",  # transformers 5 ignores it; earlier versions computed the same sums in parts
    "sliding_window", "max_window_layers",  # no effect while use_sliding_window is false (checked)
})


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ConfigError(f"LlamaConfig.{name} must be a positive integer, got {value!r}")
    return int(value)


def _number(name: str, value, low: float = 0.0, strict: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not (value > low if strict else value >= low):
        raise ConfigError(f"LlamaConfig.{name} must be a number {'>' if strict else '>='} {low}, "
                          f"got {value!r}")
    return float(value)


def _rope_theta(name: str, rope, theta: float | None) -> float | None:
    """The theta of a ``rope_parameters`` / ``rope_scaling`` dict, refusing what minilora lacks."""
    if rope is None:
        return theta
    if not isinstance(rope, Mapping):
        raise ConfigError(f"LlamaConfig.{name} must be a dict or None, got {rope!r}")
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind != "default":
        raise ConfigError(f"LlamaConfig.{name}: rope type {kind!r} is not implemented; minilora "
                          "implements the default rotary embedding (rope_theta) only")
    extra = sorted(set(rope) - {"rope_type", "type", "rope_theta"})
    if extra:
        raise ConfigError(f"LlamaConfig.{name}: {extra} are not implemented; minilora implements "
                          "the default rotary embedding (rope_type, rope_theta) only")
    return rope.get("rope_theta", theta)


@dataclass
class LlamaConfig:
    """Hyper-parameters under transformers' names (``LlamaConfig``, ``Qwen2Config``).

    The five sizes have no defaults: a model's shape is never guessed. ``num_key_value_heads``
    defaults to ``num_attention_heads`` and ``head_dim`` to ``hidden_size // num_attention_heads``.
    ``rope_parameters`` (transformers 5) and ``rope_scaling`` (earlier) are read into
    ``rope_theta``; any rope type but "default" is refused by name, as are sliding windows,
    attention dropout, an activation other than SiLU, and biases Qwen2 does not have.
    ``bos_token_id`` and ``eos_token_id`` change no number; they are kept for ``save_pretrained``.
    ``dtype`` is minilora's: the dtype the model computes in ("float32" or "float64").
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_parameters: dict | None = None
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    attention_dropout: float = 0.0
    mlp_bias: bool = False
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    use_sliding_window: bool = False
    layer_types: list[str] | None = None
    model_type: str = "llama"
    dtype: str = "float32"

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "max_position_embeddings"):
            setattr(self, name, _positive_int(name, getattr(self, name)))
        if self.model_type not in MODEL_TYPES:
            raise ConfigError(f"LlamaConfig.model_type must be one of {MODEL_TYPES}, got "
                              f"{self.model_type!r}")
        self._check_heads()
        self._check_unimplemented()
        self.rms_norm_eps = _number("rms_norm_eps", self.rms_norm_eps)
        self.initializer_range = _number("initializer_range", self.initializer_range)
        theta = _rope_theta("rope_scaling", self.rope_scaling,
                            _rope_theta("rope_parameters", self.rope_parameters, self.rope_theta))
        self.rope_theta = _number("rope_theta", theta, strict=True)
        self.rope_parameters = self.rope_scaling = None  # folded into rope_theta
        for name in ("tie_word_embeddings", "attention_bias", "mlp_bias"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"LlamaConfig.{name} must be true or false, got "
                                  f"{getattr(self, name)!r}")
        pad = self.pad_token_id
        if pad is not None and (isinstance(pad, bool) or not isinstance(pad, (int, np.integer))
                                or not 0 <= pad < self.vocab_size):
            raise ConfigError(f"LlamaConfig.pad_token_id must be None or in [0, "
                              f"{self.vocab_size}), got {pad!r}")
        for name in ("bos_token_id", "eos_token_id"):  # Llama 3's eos is a list of ids
            value = getattr(self, name)
            ids = value if isinstance(value, list) and name == "eos_token_id" else [value]
            if value is not None and not all(
                    isinstance(i, (int, np.integer)) and not isinstance(i, bool) and i >= 0
                    for i in ids):
                raise ConfigError(f"LlamaConfig.{name} must be None or a token id >= 0"
                                  f"{' (or a list of them)' if name == 'eos_token_id' else ''}, "
                                  f"got {value!r:.60}")
        if self.dtype not in ("float32", "float64"):
            raise ConfigError(f"LlamaConfig.dtype must be 'float32' or 'float64', got "
                              f"{self.dtype!r}")

    def _check_heads(self) -> None:
        h = self.num_attention_heads
        if self.head_dim is None:
            if self.hidden_size % h:
                raise ConfigError(f"LlamaConfig.hidden_size ({self.hidden_size}) must be "
                                  f"divisible by num_attention_heads ({h}) when head_dim is unset")
            self.head_dim = self.hidden_size // h
        self.head_dim = _positive_int("head_dim", self.head_dim)
        if self.head_dim % 2:
            raise ConfigError(f"LlamaConfig.head_dim must be even (RoPE rotates pairs), got "
                              f"{self.head_dim}")
        kv = h if self.num_key_value_heads is None else self.num_key_value_heads
        self.num_key_value_heads = _positive_int("num_key_value_heads", kv)
        if h % self.num_key_value_heads:
            raise ConfigError(f"LlamaConfig.num_attention_heads ({h}) must be a multiple of "
                              f"num_key_value_heads ({self.num_key_value_heads})")

    def _check_unimplemented(self) -> None:
        """Fields minilora does not implement, refused by name rather than computed otherwise."""
        if self.hidden_act != "silu":
            raise ConfigError(f"LlamaConfig.hidden_act {self.hidden_act!r} is not implemented; "
                              "minilora's Llama MLP is SwiGLU with 'silu'")
        if self.attention_dropout != 0:
            raise ConfigError(f"LlamaConfig.attention_dropout {self.attention_dropout!r} is not "
                              "implemented; minilora's Llama attention has no dropout (use 0.0)")
        if self.use_sliding_window is not False:
            raise ConfigError("LlamaConfig.use_sliding_window: sliding-window attention is not "
                              "implemented; minilora attends to every earlier position")
        if self.layer_types is not None and (not isinstance(self.layer_types, list) or any(
                t != "full_attention" for t in self.layer_types)):
            raise ConfigError(f"LlamaConfig.layer_types {self.layer_types!r}: only "
                              "'full_attention' layers are implemented")
        self.layer_types = None  # every layer full attention, what None means
        if self.model_type == "qwen2":
            for name in ("attention_bias", "mlp_bias"):
                if getattr(self, name):
                    raise ConfigError(f"LlamaConfig.{name}: Qwen2 has no such field; its biases "
                                      "are fixed (q_proj, k_proj, v_proj have them, o_proj and "
                                      "the MLP do not)")

    @property
    def qkv_bias(self) -> bool:
        """Whether q_proj, k_proj and v_proj have biases (Qwen2's always do)."""
        return self.attention_bias or self.model_type == "qwen2"

    def to_dict(self) -> dict:
        """The fields as a dict, which [`from_dict`][] reads back."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d, dtype: str | None = None) -> LlamaConfig:
        """A config from a transformers ``config.json`` object (or [`to_dict`][]).

        Keys in ``IGNORED_KEYS`` are dropped, unknown ones refused by name, the five sizes
        required. ``dtype`` picks the dtype to compute in; without it, a ``dtype`` of "float32"
        or "float64" in ``d`` is used, and any other (a checkpoint's "bfloat16") means float32.
        """
        if not isinstance(d, Mapping):
            raise ConfigError(f"LlamaConfig: expected a JSON object of fields, got "
                              f"{type(d).__name__}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in d if k not in fields and k not in IGNORED_KEYS)
        if unknown:
            raise ConfigError(f"LlamaConfig: unknown or unimplemented fields {unknown}; the fields "
                              f"are {sorted(fields)}")
        kwargs = {k: v for k, v in d.items() if k in fields}
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size",
                               "num_hidden_layers", "num_attention_heads") if k not in kwargs]
        if missing:
            raise ConfigError(f"LlamaConfig: missing fields {missing}")
        if kwargs.get("model_type") == "qwen2":  # Qwen2Config's defaults where they differ
            kwargs.setdefault("num_key_value_heads", 32)
            kwargs.setdefault("max_position_embeddings", 32768)
        stored = kwargs.pop("dtype", None)
        kwargs["dtype"] = dtype or (stored if stored in ("float32", "float64") else "float32")
        return cls(**kwargs)


class LlamaAttention(nn.Module):
    """Grouped-query causal self-attention with RoPE.   x: (B, T, C) -> (B, T, C).

    q_proj: C -> H hd, k_proj and v_proj: C -> Hkv hd, o_proj: H hd -> C.
    """

    def __init__(self, config: LlamaConfig, layer_idx: int, rng: np.random.Generator):
        super().__init__()
        c, hd, dtype = config.hidden_size, config.head_dim, config.dtype
        self.layer_idx = layer_idx
        self.num_heads, self.num_key_value_heads = config.num_attention_heads, \
            config.num_key_value_heads
        self.head_dim = hd
        qkv_bias = config.qkv_bias
        self.q_proj = nn.Linear(c, self.num_heads * hd, bias=qkv_bias, dtype=dtype, rng=rng)
        self.k_proj = nn.Linear(c, self.num_key_value_heads * hd, bias=qkv_bias, dtype=dtype,
                                rng=rng)
        self.v_proj = nn.Linear(c, self.num_key_value_heads * hd, bias=qkv_bias, dtype=dtype,
                                rng=rng)
        self.o_proj = nn.Linear(self.num_heads * hd, c, bias=config.attention_bias, dtype=dtype,
                                rng=rng)

    def _heads(self, x: Tensor, n: int) -> Tensor:
        """(B, T, n hd) -> (B, n, T, hd)."""
        b, t, _ = x.shape
        return ops.transpose(ops.reshape(x, (b, t, n, self.head_dim)), (0, 2, 1, 3))

    def forward(self, x: Tensor, cos: np.ndarray, sin: np.ndarray,
                cache: LayerCache | None = None) -> Tensor:
        """cos, sin: (T, hd/2), the rotary tables of these T positions; with ``cache``, x holds
        the positions after those cached, and attends to all of them."""
        b, t, _ = x.shape
        q = ops.rotary_embedding(self._heads(self.q_proj(x), self.num_heads), cos, sin)
        k = ops.rotary_embedding(self._heads(self.k_proj(x), self.num_key_value_heads), cos, sin)
        v = self._heads(self.v_proj(x), self.num_key_value_heads)  # (B, Hkv, T, hd)
        if cache is not None:
            k, v = (Tensor(a) for a in cache.extend(k.data, v.data))  # (B, Hkv, seen + T, hd)
        y = ops.grouped_query_attention(q, k, v)  # (B, H, T, hd)
        return self.o_proj(ops.reshape(ops.transpose(y, (0, 2, 1, 3)),
                                       (b, t, self.num_heads * self.head_dim)))


class LlamaMLP(nn.Module):
    """x: (B, T, C) -> down_proj(silu(gate_proj(x)) * up_proj(x)), through I = intermediate_size."""

    def __init__(self, config: LlamaConfig, rng: np.random.Generator):
        super().__init__()
        c, i, bias, dtype = config.hidden_size, config.intermediate_size, config.mlp_bias, \
            config.dtype
        self.gate_proj = nn.Linear(c, i, bias=bias, dtype=dtype, rng=rng)
        self.up_proj = nn.Linear(c, i, bias=bias, dtype=dtype, rng=rng)
        self.down_proj = nn.Linear(i, c, bias=bias, dtype=dtype, rng=rng)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(ops.swiglu(self.gate_proj(x), self.up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    """A pre-RMSNorm block: x + self_attn(input_layernorm(x)), then
    + mlp(post_attention_layernorm(x))."""

    def __init__(self, config: LlamaConfig, layer_idx: int, rng: np.random.Generator):
        super().__init__()
        c, eps, dtype = config.hidden_size, config.rms_norm_eps, config.dtype
        self.self_attn = LlamaAttention(config, layer_idx, rng)
        self.mlp = LlamaMLP(config, rng)
        self.input_layernorm = nn.RMSNorm(c, eps, dtype=dtype)
        self.post_attention_layernorm = nn.RMSNorm(c, eps, dtype=dtype)

    def forward(self, x: Tensor, cos: np.ndarray, sin: np.ndarray,
                cache: LayerCache | None = None) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaRotaryEmbedding(nn.Module):
    """The rotary tables (no parameters; transformers keeps ``inv_freq`` as a buffer it does not
    save). positions (T,) -> cos, sin: (T, hd/2) in the model's dtype."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.head_dim, self.rope_theta, self.dtype = config.head_dim, config.rope_theta, \
            np.dtype(config.dtype)

    def forward(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return rope_tables(positions, self.head_dim, self.rope_theta, self.dtype)


class LlamaModel(nn.Module):
    """The body: ``embed_tokens``, the decoder ``layers``, the final ``norm``.
    idx: (B, T) -> hidden states (B, T, C)."""

    def __init__(self, config: LlamaConfig, rng: np.random.Generator):
        super().__init__()
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, dtype=config.dtype,
                                         rng=rng)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i, rng)
                                    for i in range(config.num_hidden_layers))
        self.norm = nn.RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=config.dtype)
        self.rotary_emb = LlamaRotaryEmbedding(config)

    def forward(self, idx: np.ndarray, cache: KVCache | None = None) -> Tensor:
        t = idx.shape[1]
        offset = 0 if cache is None else cache.length  # positions continue after the cached ones
        cos, sin = self.rotary_emb(offset + np.arange(t))
        x = self.embed_tokens(idx)  # (B, T, C)
        if self.padding_idx is not None and x.requires_grad:
            # torch's Embedding(padding_idx): lookups of the padding token send no gradient back
            x = ops.where((idx == self.padding_idx)[..., None], x.detach(), x)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, None if cache is None else cache.layers[i])
        if cache is not None:
            cache.length = offset + t
        return self.norm(x)


class LlamaForCausalLM(nn.Module):
    """A Llama (or Qwen2) language model: ``model(idx, targets)`` -> (logits (B, T, V), mean
    cross-entropy, targets of -1 ignored); ``model(idx)`` -> (logits, None), as GPT.

    seed: fixes the initial weights (one Generator, ``model.rng``), drawn as transformers draws
    them: N(0, initializer_range) for Linear and Embedding weights, zero biases (and the padding
    token's row), ones for the norms. ``lm_head`` shares ``model.embed_tokens.weight`` when
    ``tie_word_embeddings``. Positions past ``max_position_embeddings`` are not refused: the
    rotary embedding is defined at every position, as in transformers.
    """

    def __init__(self, config: LlamaConfig, seed: int | np.random.Generator | None = 0):
        super().__init__()
        if not isinstance(config, LlamaConfig):
            raise ConfigError(f"LlamaForCausalLM: config must be a LlamaConfig, got "
                              f"{type(config).__name__}")
        self.config = config
        self.rng = nn.make_rng(seed)
        self.model = LlamaModel(config, self.rng)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False,
                                 dtype=config.dtype, rng=self.rng)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self._init_weights(self.rng)

    @classmethod
    def from_pretrained(cls, path, dtype: str = "float32") -> LlamaForCausalLM:
        """A Llama or Qwen2 directory as Hugging Face ``transformers`` writes it (``config.json``
        and ``model.safetensors``, or shards), in eval mode; see
        [`minilora.hf.from_pretrained`][]."""
        from minilora.hf import from_pretrained  # the file formats sit above the models

        return from_pretrained(path, dtype=dtype, model_type=MODEL_TYPES)

    def save_pretrained(self, path) -> None:
        """Write ``config.json`` and ``model.safetensors`` that ``LlamaForCausalLM`` (or
        ``Qwen2ForCausalLM``) ``.from_pretrained`` loads; see
        [`minilora.hf.save_pretrained`][]."""
        from minilora.hf import save_pretrained

        save_pretrained(self, path)

    def get_output_embeddings(self) -> nn.Linear:
        """The output layer (``lm_head``), as ``transformers`` names it: what PEFT's
        ``target_modules="all-linear"`` leaves out."""
        return self.lm_head

    def _init_weights(self, rng: np.random.Generator) -> None:
        dtype, std = np.dtype(self.config.dtype), self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.data = rng.normal(0.0, std, module.weight.shape).astype(dtype)
            if isinstance(module, nn.Linear) and module.bias is not None:
                module.bias.data = np.zeros(module.bias.shape, dtype)
        if self.config.pad_token_id is not None:
            self.model.embed_tokens.weight.data[self.config.pad_token_id] = 0

    def forward(self, idx, targets=None, cache: KVCache | None = None, *,
                skip_logits: bool = False):
        """idx: (B, T) integers; targets: (B, T) integers (-1 is ignored); cache: a
        [`KVCache`][] that holds the earlier positions and takes these. skip_logits: with
        targets, return (None, loss), as ``GPT.forward`` (here the logits are still formed)."""
        idx = np.asarray(idx.data if isinstance(idx, Tensor) else idx)
        if idx.ndim != 2:
            raise ShapeError(f"LlamaForCausalLM: idx must have shape (B, T), got {idx.shape}")
        logits = self.lm_head(self.model(idx, cache))  # (B, T, V)
        loss = None if targets is None else ops.cross_entropy(logits, targets, ignore_index=-1)
        return (None if skip_logits and targets is not None else logits), loss

    def generate(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 rng: np.random.Generator | int | None = None,
                 stop_token: int | None = None, streamer=None,
                 vocab_size: int | None = None) -> np.ndarray:
        """Extend idx (B, T) by up to ``max_new_tokens`` tokens -> (B, T + n); ``stop_token``:
        stop once every row has produced it; ``streamer``: as ``transformers``'; ``vocab_size``:
        sample only ids below it (a tokenizer smaller than the vocabulary).

        temperature 0 picks the most likely token (greedy); top_k keeps the k most likely.
        Keys and values are cached, so each new token costs one position's forward pass.
        Runs in eval mode and restores the previous mode after.
        """
        return generate(self, idx, max_new_tokens, temperature, top_k, rng, stop_token,
                        streamer=streamer, vocab_size=vocab_size)

    def new_cache(self) -> KVCache:
        """An empty key/value cache for [`generate`][minilora.models.generation.generate]."""
        return KVCache(len(self.model.layers))

    def next_logits(self, idx, cache: KVCache | None = None) -> np.ndarray:
        """The logits (B, V) of the token after idx (B, T); with a ``cache``, idx holds only
        the tokens after those it holds. Builds no graph."""
        with no_grad():
            return self.lm_head(self.model(np.asarray(idx), cache)[:, -1:]).data[:, -1]
