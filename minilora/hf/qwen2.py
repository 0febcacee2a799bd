"""Qwen2 as Hugging Face ``transformers`` stores it: Llama's tensor map (``llama.py``), with biases
on q_proj, k_proj and v_proj, and Qwen2's config.

Qwen2Config has no ``attention_bias``, ``mlp_bias`` or ``pretraining_tp``; it has sliding-window
fields, which minilora reads only with the window off (``use_sliding_window: false``), and writes
as transformers writes them then.
"""

from __future__ import annotations

from minilora.hf.llama import (  # noqa: F401  (the architecture's interface: see gpt2.py)
    INPUT_EMBEDDING,
    MODEL_CLASS,
    TIED_KEYS,
    TRANSPOSED,
    canonical_key,
    from_file,
    is_conv1d,
    read_config,
    tensor_shapes,
    tied,
    to_file,
    write_config,
)
from minilora.models import LlamaConfig

MODEL_TYPE = "qwen2"
NAME = "Qwen2"
ARCHITECTURES = ("Qwen2ForCausalLM", "Qwen2Model")
MAX_WINDOW_LAYERS = 28  # Qwen2Config's default; no effect while the window is off


def config_from_hf(d: dict, dtype: str, dropout: float | None) -> LlamaConfig:
    """The LlamaConfig (``model_type="qwen2"``) of a ``config.json``; fields minilora does not
    implement (a sliding window that is on) are refused by name."""
    return read_config(d, dtype, dropout, NAME, ARCHITECTURES, {})


def config_to_hf(config: LlamaConfig) -> dict:
    """``config.json`` as transformers writes it for the same ``Qwen2ForCausalLM`` (``head_dim``
    only where it is not hidden_size / num_attention_heads, which Qwen2 reads then)."""
    d = write_config(config, ARCHITECTURES[0], {
        "use_sliding_window": False, "sliding_window": None,
        "max_window_layers": MAX_WINDOW_LAYERS,
        "layer_types": ["full_attention"] * config.num_hidden_layers})
    if config.head_dim * config.num_attention_heads == config.hidden_size:
        del d["head_dim"]
    return d
