"""What the Hugging Face tests share: small models, hand-written safetensors files (bfloat16, which
NumPy cannot write), and the relative error with its bound per dtype."""

from __future__ import annotations

import copy
import json
import struct
from collections import defaultdict
from pathlib import Path

import numpy as np

from minilora.lora import LoRAConfig, apply_lora, named_lora_layers
from minilora.models import GPT, GPTConfig, LlamaConfig, LlamaForCausalLM

# Relative error max|ours - theirs| / max|theirs| allowed per dtype (the targets): the two
# sides compute the same sums in different orders, a few hundred eps apart at most.
TOLERANCE = {"float64": 1e-10, "float32": 1e-5}
WORST: dict[tuple[str, str], float] = defaultdict(float)  # (direction, dtype) -> worst seen


def relative_error(ours, theirs) -> float:
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    scale = float(np.max(np.abs(theirs)))  # an all-zero tensor (a bias at its init): absolute
    return float(np.max(np.abs(ours - theirs))) / (scale if scale > 0 else 1.0)


def assert_close(ours, theirs, dtype: str, direction: str) -> float:
    """ours within TOLERANCE[dtype] of theirs (relative); the error is kept for the summary."""
    err = relative_error(ours, theirs)
    WORST[(direction, dtype)] = max(WORST[(direction, dtype)], err)
    assert err <= TOLERANCE[dtype], f"{direction} {dtype}: relative error {err:.3g}"
    return err


def tiny_config(dtype="float32", **kw) -> GPTConfig:
    fields = {"vocab_size": 23, "block_size": 16, "n_layer": 2, "n_head": 4, "n_embd": 16,
              "dtype": dtype, **kw}
    return GPTConfig(**fields)


def random_gpt(dtype="float32", seed=0, **kw) -> GPT:
    """A tiny GPT with every weight and bias random (LayerNorms too), so no tensor is trivial."""
    return randomized(GPT(tiny_config(dtype, **kw), seed=seed), seed)


def randomized(model, seed: int):
    """``model`` with every parameter drawn afresh: weights about 0, norms and biases about 1."""
    rng = np.random.default_rng(seed + 1)
    for _, p in model.named_parameters():
        p.data = (rng.standard_normal(p.shape) * 0.3 + (1.0 if p.ndim == 1 else 0.0)
                  ).astype(p.dtype)
    return model


# Llama-family variants the Hugging Face tests run: fewer key/value heads than query heads, tied
# and untied, Qwen2's q/k/v biases; vocab 23, as the GPT-2 tests.
LLAMA_SIZES = {"vocab_size": 23, "hidden_size": 16, "intermediate_size": 24,
               "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}
LLAMAS = {"llama": {}, "llama-tied": {"tie_word_embeddings": True},
          "qwen2": {"model_type": "qwen2"},
          "qwen2-tied": {"model_type": "qwen2", "tie_word_embeddings": True}}


def random_llama(variant: str = "llama", dtype="float32", seed=0, **kw) -> LlamaForCausalLM:
    """A tiny Llama or Qwen2 with every weight and bias random (RMSNorms about 1)."""
    config = LlamaConfig(**{**LLAMA_SIZES, **LLAMAS[variant], "dtype": dtype, **kw})
    return randomized(LlamaForCausalLM(config, seed=seed), seed)


def adapted(model: GPT, config: LoRAConfig, seed=0) -> GPT:
    """``model`` with ``config`` applied and every trainable parameter moved off its start, so a
    dropped B, bias or saved module changes the logits."""
    apply_lora(model, config, rng=seed)
    rng = np.random.default_rng(seed + 7)
    for _, layer in named_lora_layers(model):  # the factor that starts at 0 (an Embedding's A)
        zero = layer.lora_B if hasattr(layer, "lora_B") else layer.lora_embedding_A
        zero.data = (rng.standard_normal(zero.shape) * 0.2).astype(model.config.dtype)
    for _, p in model.named_parameters():
        if p.requires_grad:
            p.data = (p.data + rng.standard_normal(p.shape) * 0.05).astype(p.dtype)
    return model


def tokens(n=2, t=16, vocab=23, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, (n, t))


def write_safetensors(path: Path, tensors: dict[str, tuple[str, tuple, bytes]],
                      metadata: dict | None = None) -> Path:
    """A safetensors file written by hand: name -> (dtype name, shape, raw little-endian bytes)."""
    header, offset, blobs = {}, 0, []
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": list(shape),
                        "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
        blobs.append(raw)
    if metadata is not None:
        header["__metadata__"] = metadata
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs))
    return path


def bfloat16_bits(x: np.ndarray) -> np.ndarray:
    """The top 16 bits of float32 ``x`` (x rounded toward zero to bfloat16), as uint16."""
    return (np.asarray(x, np.float32).view(np.uint32) >> 16).astype(np.uint16)


# ---- PEFT itself (the parity tests; torch and peft imported by the caller's need()) -----------

def random_peft_model(base, config: dict, seed=0):
    """PEFT's ``get_peft_model`` on the transformers model ``base``, every trainable tensor moved
    off its start (random non-zero A, B, biases and saved modules), in eval mode."""
    import peft
    import torch

    config = copy.deepcopy(config)  # PEFT rewrites the modules_to_save list it is given
    model = peft.get_peft_model(base, peft.LoraConfig(task_type="CAUSAL_LM", **config))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * 0.2)
    return model.eval()


def peft_parameter_counts(model) -> tuple[int, int]:
    """(trainable, total) as minilora counts them for the same adapter: PEFT counts its copies of
    each saved module in its total, minilora trains the module in place."""
    trainable, total = model.get_nb_trainable_parameters()
    copies = sum(p.numel() for n, p in model.named_parameters() if "modules_to_save." in n)
    return trainable, total - copies


def assert_same_adapter_files(ours: Path, theirs: Path, base_model_name_or_path: str,
                              bias_copies: bool = False) -> None:
    """The adapter directories hold the same tensors (keys, shapes, dtypes) and the same config
    fields, PEFT's lists compared as sets. ``bias_copies``: leave out PEFT's copies of saved
    biases (``bias="all"`` with ``modules_to_save``), which minilora does not write."""
    import safetensors.numpy

    mine, peft_state = (safetensors.numpy.load((d / "adapter_model.safetensors").read_bytes())
                        for d in (ours, theirs))
    if bias_copies:
        peft_state = {k: v for k, v in peft_state.items()
                      if not any(c in k for c in (".original_module.", ".modules_to_save."))}
    assert {k: (v.shape, v.dtype) for k, v in mine.items()} == \
        {k: (v.shape, v.dtype) for k, v in peft_state.items()}
    mine_json, peft_json = (json.loads((d / "adapter_config.json").read_text())
                            for d in (ours, theirs))
    for field in ("target_modules", "modules_to_save"):  # PEFT writes some from a set
        for d in (mine_json, peft_json):
            d[field] = sorted(d[field]) if isinstance(d[field], list) else d[field]
    assert mine_json == {**peft_json, "base_model_name_or_path": base_model_name_or_path}
