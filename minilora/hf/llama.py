"""Llama as Hugging Face ``transformers`` stores it: the config map and the tensor map.

The same interface as ``gpt2.py`` (its docstring lists it); ``qwen2.py`` is this module with
Qwen2's config. minilora's Llama uses transformers' module names and stores every ``Linear``
weight (out, in) as ``torch.nn.Linear`` does, so the file's keys are the parameter names and no
tensor is transposed. ``lm_head.weight`` is in the file unless ``tie_word_embeddings``; then it is
``model.embed_tokens.weight``, and transformers leaves it out.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import numpy as np

from minilora.errors import ConfigError
from minilora.models import LlamaConfig, LlamaForCausalLM

MODEL_TYPE = "llama"
MODEL_CLASS = LlamaForCausalLM
NAME = "Llama"
ARCHITECTURES = ("LlamaForCausalLM", "LlamaModel")
TRANSPOSED = ()  # parameter-name suffixes stored transposed in the files: none
TIED_KEYS = {"lm_head.weight": "model.embed_tokens.weight"}
INPUT_EMBEDDING = "model.embed_tokens"
# transformers' LlamaConfig defaults where minilora's LlamaConfig has none (they change no number)
TOKEN_DEFAULTS = {"bos_token_id": 1, "eos_token_id": 2}
_BUFFER = re.compile(r"(?:model\.)?layers\.\d+\.self_attn\.rotary_emb\.inv_freq")  # older files


def tied(config: LlamaConfig) -> dict[str, str]:
    """Output key -> the key it is tied to: lm_head -> the embedding when tie_word_embeddings."""
    return TIED_KEYS if config.tie_word_embeddings else {}


def config_from_hf(d: dict, dtype: str, dropout: float | None) -> LlamaConfig:
    """The LlamaConfig of a ``config.json``; a field minilora does not implement is a ConfigError
    naming it (see [`LlamaConfig`][minilora.models.LlamaConfig])."""
    return read_config(d, dtype, dropout, NAME, ARCHITECTURES, TOKEN_DEFAULTS)


def config_to_hf(config: LlamaConfig) -> dict:
    """``config.json`` as transformers writes it for the same ``LlamaForCausalLM``."""
    return write_config(config, ARCHITECTURES[0], {
        "attention_bias": config.attention_bias, "mlp_bias": config.mlp_bias,
        "pretraining_tp": 1})


def read_config(d: dict, dtype: str, dropout: float | None, name: str,
                architectures: tuple[str, ...], defaults: dict) -> LlamaConfig:
    """``config_from_hf`` for Llama and Qwen2: ``defaults`` are transformers' values for the
    fields that minilora's LlamaConfig leaves None (the special tokens)."""
    archs = d.get("architectures") or list(architectures[:1])
    if not isinstance(archs, list) or any(a not in architectures for a in archs):
        raise ConfigError(f"architectures is {archs!r:.80}: minilora reads "
                          f"{' and '.join(architectures)}")
    if dropout not in (None, 0, 0.0):
        raise ConfigError(f"dropout={dropout!r}: minilora's {name} has no dropout")
    return LlamaConfig.from_dict({**defaults, **d}, dtype=dtype)


def write_config(config: LlamaConfig, architecture: str, extra: dict) -> dict:
    """``config_to_hf`` for Llama and Qwen2: the fields both configs have, and ``extra``."""
    d = {"architectures": [architecture], "model_type": config.model_type,
         "dtype": config.dtype, "vocab_size": config.vocab_size,
         "hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
         "num_hidden_layers": config.num_hidden_layers,
         "num_attention_heads": config.num_attention_heads,
         "num_key_value_heads": config.num_key_value_heads, "head_dim": config.head_dim,
         "hidden_act": config.hidden_act, "max_position_embeddings": config.max_position_embeddings,
         "initializer_range": config.initializer_range, "rms_norm_eps": config.rms_norm_eps,
         "rope_parameters": {"rope_theta": config.rope_theta, "rope_type": "default"},
         "tie_word_embeddings": config.tie_word_embeddings,
         "attention_dropout": config.attention_dropout, "pad_token_id": config.pad_token_id,
         "bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
         "use_cache": True, **extra}
    return dict(sorted(d.items()))


def tensor_shapes(config: LlamaConfig) -> Iterator[tuple[str, tuple[int, ...]]]:
    """(key, shape) for every tensor of ``LlamaForCausalLM`` but a tied lm_head, one at a time:
    a reader takes only as many as the files hold (a config may claim 10^9 layers)."""
    c, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
    q, kv = config.num_attention_heads * config.head_dim, \
        config.num_key_value_heads * config.head_dim
    yield "model.embed_tokens.weight", (v, c)
    layer = {"self_attn.q_proj": (q, c), "self_attn.k_proj": (kv, c), "self_attn.v_proj": (kv, c),
             "self_attn.o_proj": (c, q), "mlp.gate_proj": (i, c), "mlp.up_proj": (i, c),
             "mlp.down_proj": (c, i)}
    biased = {"self_attn.q_proj": config.qkv_bias, "self_attn.k_proj": config.qkv_bias,
              "self_attn.v_proj": config.qkv_bias, "self_attn.o_proj": config.attention_bias,
              "mlp.gate_proj": config.mlp_bias, "mlp.up_proj": config.mlp_bias,
              "mlp.down_proj": config.mlp_bias}
    for n in range(config.num_hidden_layers):
        prefix = f"model.layers.{n}."
        for name, shape in layer.items():
            yield prefix + name + ".weight", shape
            if biased[name]:
                yield prefix + name + ".bias", shape[:1]
        yield prefix + "input_layernorm.weight", (c,)
        yield prefix + "post_attention_layernorm.weight", (c,)
    yield "model.norm.weight", (c,)
    if not config.tie_word_embeddings:
        yield "lm_head.weight", (v, c)


def canonical_key(key: str) -> str | None:
    """``layers.0.mlp.up_proj.weight`` (a ``LlamaModel`` file) -> ``model.layers.0...``, as
    ``save_pretrained`` writes it; None for the ``inv_freq`` buffer older files hold."""
    if _BUFFER.fullmatch(key):
        return None
    return key if key.startswith("model.") or key == "lm_head.weight" else "model." + key


def to_file(name: str, array: np.ndarray) -> np.ndarray:
    """minilora's parameter ``name`` in the file's layout: the same, (out, in)."""
    return np.ascontiguousarray(array)


def from_file(key: str, array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array)


def is_conv1d(module_name: str) -> bool:
    """No Conv1D in Llama: PEFT's ``fan_in_fan_out`` is false for every layer."""
    return False
