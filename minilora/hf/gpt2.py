"""GPT-2 as Hugging Face ``transformers`` stores it: the config map and the tensor map.

An architecture is this much and no more (``pretrained.py`` reads and writes the model files for
all of them, ``peft.py`` the adapters; another architecture is another module like this one,
registered in ``pretrained.ARCHITECTURES``, as ``llama.py`` and ``qwen2.py`` are):

- ``MODEL_TYPE`` (``config.json``'s ``model_type``), ``MODEL_CLASS`` (minilora's model), ``NAME``
  (for messages), ``ARCHITECTURES`` (the ``transformers`` classes whose files it reads),
  ``TRANSPOSED`` (the parameter-name suffixes stored transposed in the files: data a caller can
  use), ``INPUT_EMBEDDING`` (its module name);
- ``tied(config)``: output key -> the key it is tied to (empty if untied), absent from the file;
- ``config_from_hf(d, dtype, dropout)`` / ``config_to_hf(config)``: ``config.json`` <-> the config;
- ``tensor_shapes(config)``: every tensor the file must hold, (key, shape in the file), computed
  from the config alone and one at a time (so sizes are checked against the files before anything
  is allocated, even a dict of names);
  the keys are minilora's parameter names (its models use Hugging Face's module names);
- ``canonical_key(key)``: a file's key as ``tensor_shapes`` names it (None: a buffer to skip);
- ``to_file(name, array)`` / ``from_file(key, array)``: between minilora's layout and the file's;
- ``is_conv1d(module_name)``: whether PEFT sees the layer as ``fan_in_fan_out``.

GPT-2's ``Conv1D`` (``c_attn``, ``c_proj``, ``c_fc``) stores its weight as (in, out), the transpose
of minilora's ``Linear.weight`` (out, in): transposed by layer name, never guessed from a shape
(``attn.c_proj`` is square). ``lm_head`` is ``transformer.wte`` (tied) and absent from the file.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import numpy as np

from minilora.errors import ConfigError
from minilora.models import GPT, GPTConfig

MODEL_TYPE = "gpt2"
MODEL_CLASS = GPT
NAME = "GPT-2"
ARCHITECTURES = ("GPT2LMHeadModel", "GPT2Model")
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
TRANSPOSED = CONV1D
TIED = {"lm_head.weight": "transformer.wte.weight"}  # the output layer is the input embedding
INPUT_EMBEDDING = "transformer.wte"
_BUFFER = re.compile(r"(?:transformer\.)?h\.\d+\.attn\.(?:bias|masked_bias)")  # older files

# GPT2Config fields minilora maps, with transformers' defaults (a config.json may leave them out)
MAPPED = {"vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12,
          "n_inner": None, "layer_norm_epsilon": 1e-5, "resid_pdrop": 0.1, "embd_pdrop": 0.1,
          "attn_pdrop": 0.1}
# variants minilora does not implement: field -> (transformers' default, the values minilora runs)
FIXED = {
    "activation_function": ("gelu_new", ("gelu_new", "gelu_pytorch_tanh")),  # both tanh-GELU
    "scale_attn_weights": (True, (True,)),
    "scale_attn_by_inverse_layer_idx": (False, (False,)),
    "reorder_and_upcast_attn": (False, (False,)),
    "add_cross_attention": (False, (False,)),
    "tie_word_embeddings": (True, (True,)),
    "quantization_config": (None, (None,)),
}
# fields that change no logit of the language model (the multiple-choice head, generation, init)
IGNORED = ("initializer_range", "summary_type", "summary_use_proj", "summary_activation",
           "summary_proj_to_labels", "summary_first_dropout", "use_cache", "bos_token_id",
           "eos_token_id", "pad_token_id")
_EOS = 50256  # GPT-2's <|endoftext|>, its bos and eos token


def tied(config: GPTConfig) -> dict[str, str]:
    """GPT-2 is always tied: lm_head is transformer.wte."""
    return TIED


def config_from_hf(d: dict, dtype: str, dropout: float | None) -> GPTConfig:
    """The GPTConfig of a GPT-2 ``config.json``; a variant minilora does not run is a ConfigError
    naming the field. ``dropout`` (training only) replaces the file's three rates."""
    for name, (default, allowed) in FIXED.items():
        value = d.get(name, default)
        if value not in allowed or isinstance(value, bool) != isinstance(allowed[0], bool):
            raise ConfigError(f"{name} is {value!r:.60}: minilora's GPT-2 runs only "
                              f"{' or '.join(map(repr, allowed))}")
    archs = d.get("architectures") or list(ARCHITECTURES[:1])
    if not isinstance(archs, list) or any(a not in ARCHITECTURES for a in archs):
        raise ConfigError(f"architectures is {archs!r:.80}: minilora reads "
                          f"{' and '.join(ARCHITECTURES)}")
    v = {name: d.get(name, default) for name, default in MAPPED.items()}
    for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
        if isinstance(v[name], bool) or not isinstance(v[name], int) or v[name] < 1:
            raise ConfigError(f"{name} must be a positive integer, got {v[name]!r:.40}")
    for name in ("resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if isinstance(v[name], bool) or not isinstance(v[name], (int, float)) \
                or not 0 <= v[name] < 1:
            raise ConfigError(f"{name} must be a number in [0, 1), got {v[name]!r:.40}")
    rates = {v["resid_pdrop"], v["embd_pdrop"], v["attn_pdrop"]}
    if dropout is None and len(rates) > 1:
        raise ConfigError(f"resid_pdrop, embd_pdrop and attn_pdrop differ ({sorted(rates)}); "
                          "minilora's GPT has one dropout rate: pass dropout=")
    try:
        return GPTConfig(vocab_size=v["vocab_size"], block_size=v["n_positions"],
                         n_layer=v["n_layer"], n_head=v["n_head"], n_embd=v["n_embd"],
                         dropout=rates.pop() if dropout is None else dropout, bias=True,
                         dtype=dtype, n_inner=v["n_inner"],
                         layer_norm_epsilon=v["layer_norm_epsilon"])
    except ConfigError as e:  # name the field as config.json spells it
        raise ConfigError(str(e).replace("GPTConfig.block_size", "n_positions")
                          .replace("GPTConfig.", "")) from None


def config_to_hf(config: GPTConfig) -> dict:
    """``config.json`` for ``GPT2LMHeadModel``: each GPT2Config field, as transformers writes it."""
    if not config.bias:
        raise ConfigError("save_pretrained: GPT-2 has biases in every layer; a GPTConfig with "
                          "bias=False has no Hugging Face GPT-2 counterpart")
    eos = _EOS if config.vocab_size > _EOS else None  # only a GPT-2 vocabulary has <|endoftext|>
    d = {"architectures": ["GPT2LMHeadModel"], "model_type": MODEL_TYPE, "dtype": config.dtype,
         "vocab_size": config.vocab_size, "n_positions": config.block_size,
         "n_embd": config.n_embd, "n_layer": config.n_layer, "n_head": config.n_head,
         "n_inner": config.n_inner, "layer_norm_epsilon": config.layer_norm_epsilon,
         "resid_pdrop": config.dropout, "embd_pdrop": config.dropout,
         "attn_pdrop": config.dropout, "initializer_range": 0.02, "summary_type": "cls_index",
         "summary_use_proj": True, "summary_activation": None, "summary_proj_to_labels": True,
         "summary_first_dropout": 0.1, "use_cache": True, "bos_token_id": eos,
         "eos_token_id": eos, "pad_token_id": None}
    d.update({name: default for name, (default, _) in FIXED.items()
              if name != "quantization_config"})
    return dict(sorted(d.items()))


def tensor_shapes(config: GPTConfig) -> Iterator[tuple[str, tuple[int, ...]]]:
    """(key, shape in the file) for every tensor of ``GPT2LMHeadModel`` but the tied lm_head, one
    at a time: a reader takes only as many as the files hold (a config may claim 10^9 layers)."""
    c, h, v, p = config.n_embd, config.mlp_size, config.vocab_size, config.block_size
    yield from {"transformer.wte.weight": (v, c), "transformer.wpe.weight": (p, c),
                "transformer.ln_f.weight": (c,), "transformer.ln_f.bias": (c,)}.items()
    layer = {"ln_1.weight": (c,), "ln_1.bias": (c,), "attn.c_attn.weight": (c, 3 * c),
             "attn.c_attn.bias": (3 * c,), "attn.c_proj.weight": (c, c), "attn.c_proj.bias": (c,),
             "ln_2.weight": (c,), "ln_2.bias": (c,), "mlp.c_fc.weight": (c, h),
             "mlp.c_fc.bias": (h,), "mlp.c_proj.weight": (h, c), "mlp.c_proj.bias": (c,)}
    for i in range(config.n_layer):
        for key, shape in layer.items():
            yield f"transformer.h.{i}.{key}", shape


def canonical_key(key: str) -> str | None:
    """``h.0.ln_1.weight`` (the hub's original files) -> ``transformer.h.0.ln_1.weight``, as
    ``save_pretrained`` writes it; None for the attention-mask buffers older files hold."""
    if _BUFFER.fullmatch(key):
        return None
    return key if key.startswith("transformer.") or key in TIED else "transformer." + key


def to_file(name: str, array: np.ndarray) -> np.ndarray:
    """minilora's parameter ``name`` in the file's layout (a Conv1D weight transposed)."""
    return np.ascontiguousarray(array.T if name.endswith(CONV1D) else array)


def from_file(key: str, array: np.ndarray) -> np.ndarray:
    """The file's tensor ``key`` in minilora's layout; the same transposition (its own inverse)."""
    return to_file(key, array)


def is_conv1d(module_name: str) -> bool:
    """Whether Hugging Face stores the layer ``module_name`` as a Conv1D (PEFT's fan_in_fan_out)."""
    return (module_name + ".weight").endswith(CONV1D)

