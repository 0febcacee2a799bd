"""The reference a check compares with: the base model and its adapter, read by ``minilora.hf``
in float64 (float16 and bfloat16 widened exactly), and what each tensor should be after a merge.

Nothing here is specific to one architecture: the adapted layers are the ones the adapter's own
config targets in the model (its ``target_modules``, ``rank_pattern``, ``alpha_pattern``,
``use_rslora``, read by minilora's PEFT support), and every name is the model's own parameter
name, which is the Hugging Face module path; how a file lays a tensor out (GPT-2's Conv1D stores
``(in, out)``) is the architecture module's business (``arch.from_file``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from minilora import hf
from minilora.check.rounding import dtype_name
from minilora.errors import ConfigError
from minilora.hf import files, peft
from minilora.lora import named_lora_layers
from minilora.nn import Module


@dataclass
class AdaptedLayer:
    """One layer the adapter changes: W (out, in), A (r, in), B (out, r), float64, and its
    scaling as the adapter's config gives it (``s = lora_alpha / r``, rsLoRA ``/ sqrt(r)``)."""

    name: str
    weight: np.ndarray
    lora_A: np.ndarray
    lora_B: np.ndarray
    r: int
    lora_alpha: float
    use_rslora: bool
    scaling: float
    adapter_dtype: str  # the dtype A and B had in the adapter's file

    @cached_property
    def delta(self) -> np.ndarray:
        """s B A: (out, in)."""
        return self.scaling * (self.lora_B @ self.lora_A)

    @cached_property
    def delta_abs(self) -> np.ndarray:
        """s |B| |A|: (out, in), what each element of ``delta`` is a sum of, in absolute value."""
        return abs(self.scaling) * (np.abs(self.lora_B) @ np.abs(self.lora_A))


@dataclass
class Reference:
    """The base with its adapter applied (float64, eval mode), and per parameter name: the value
    the base holds, the value a merged model must hold (``expected``; for an adapted layer's
    weight ``W + s B A``), and the dtype the base's file stored it in."""

    model: Module
    arch: object
    model_type: str
    config: object  # the adapter's LoRAConfig
    layers: dict[str, AdaptedLayer]  # by weight name: "transformer.h.0.attn.c_attn.weight"
    base: dict[str, np.ndarray]
    expected: dict[str, np.ndarray] = field(default_factory=dict)
    base_dtypes: dict[str, str] = field(default_factory=dict)


def load_reference(base, adapter) -> Reference:
    """Read ``base`` (a Hugging Face model directory) and ``adapter`` (a PEFT adapter directory)
    as the reference. Any fault in either is a MiniLoRAError naming the file (``minilora.hf``)."""
    arch, hf_config, stored = hf.stored_tensors(base)
    model = hf.from_pretrained(base, dtype="float64", dropout=0.0)
    before = {name: p.data for name, p in model.named_parameters()}  # not copies: never mutated
    hf.load_adapter(model, adapter)
    if model.lora_config.use_dora:  # its merge is c (W + s B A), not the W + s B A checked here
        raise ConfigError(f"{adapter}: a DoRA adapter (use_dora=True); the check compares plain "
                          "LoRA merges, W + s B A, and does not check DoRA's yet")
    adapter_dtypes, keys = _adapter_dtypes(adapter), hf.adapter_file_map(model)
    layers = {}
    for name, layer in named_lora_layers(model):
        layers[f"{name}.weight"] = AdaptedLayer(
            name, layer.weight.data, layer.lora_A.data, layer.lora_B.data, layer.r,
            layer.lora_alpha, layer.use_rslora, layer.scaling,
            adapter_dtypes[keys[f"{name}.lora_A"].key])
    ref = Reference(model, arch, hf_config["model_type"], model.lora_config, layers, before)
    for name, p in model.named_parameters():
        if name.rpartition(".")[2] in ("lora_A", "lora_B"):
            continue
        ref.expected[name] = layers[name].weight + layers[name].delta if name in layers \
            else p.data
        if name in stored:
            ref.base_dtypes[name] = dtype_name(stored[name].info.dtype)
    return ref


def _adapter_dtypes(adapter) -> dict[str, str]:
    """The file's key -> dtype of every tensor of the adapter (headers only)."""
    directory = Path(adapter)
    headers = files.tensor_headers(directory, peft.ADAPTER_WEIGHTS, None, "adapter")
    return {key: dtype_name(info.dtype) for key, (_, info) in headers.items()}
