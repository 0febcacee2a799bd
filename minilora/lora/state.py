"""The adapter's own state: what a LoRA run saves, and loading it back into an adapted model.

The adapter is every ``lora_A`` and ``lora_B`` plus, per the config ``apply_lora`` kept on the model
(``model.lora_config``), the biases it trains (``bias="all"`` or ``"lora_only"``) and the
``modules_to_save``. Names are the model's own parameter names
(``transformer.h.0.attn.c_attn.lora_A``), so an adapter is small and reads like the model.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from minilora.errors import ConfigError, ShapeError, StateDictError
from minilora.lora.layer import LoRALinear
from minilora.lora.model import _lora_layers_or_raise, _matching
from minilora.nn import Module, Parameter


def _adapter_parameters(model: Module) -> dict[str, Parameter]:
    """name -> Parameter for what the adapter owns: every lora_A, lora_B and, per the config kept
    by ``apply_lora``, the trained biases and ``modules_to_save``; each once, in module order."""
    config = model.__dict__.get("lora_config")
    bias = config.bias if config is not None else "none"
    saved = []
    all_names = [n for n, _ in model.named_modules() if n]
    for entry in (config.modules_to_save or ()) if config is not None else ():
        saved += _matching(all_names, entry, regex=False)

    out: dict[str, Parameter] = {}
    seen: set[int] = set()
    for mod_name, module in model.named_modules():
        in_saved = any(mod_name == s or mod_name.startswith(s + ".") for s in saved)
        for pname, p in module._parameters.items():
            is_lora = isinstance(module, LoRALinear)
            wanted = (
                in_saved
                or (is_lora and pname in ("lora_A", "lora_B"))
                or (pname == "bias" and (bias == "all" or (bias == "lora_only" and is_lora)))
            )
            if wanted and id(p) not in seen:
                seen.add(id(p))
                out[f"{mod_name}.{pname}" if mod_name else pname] = p
    return out


def lora_state_dict(model: Module) -> dict[str, np.ndarray]:
    """name -> a copy of each adapter array (see ``_adapter_parameters``): all a LoRA run needs to
    save beside a reference to its base model. Names are the model's own parameter names."""
    _lora_layers_or_raise(model, "lora_state_dict")
    return {name: p.data.copy() for name, p in _adapter_parameters(model).items()}


def load_lora_state_dict(model: Module, state: Mapping[str, np.ndarray]) -> None:
    """Copy an adapter saved by ``lora_state_dict`` into an adapted ``model`` (same config).

    Strict: a missing or unexpected name, a shape (or rank) that differs, a non-numeric dtype or a
    NaN/inf is an error naming it, raised before any parameter changes. Arrays take the model's
    dtype.
    """
    layers = dict(_lora_layers_or_raise(model, "load_lora_state_dict"))
    merged = [name for name, layer in layers.items() if layer.merged]
    if merged:
        raise ConfigError(f"load_lora_state_dict: layers {merged} are merged; "
                          "unmerge_adapter(model) first")
    if not isinstance(state, Mapping):
        raise StateDictError("load_lora_state_dict: expected a mapping name -> array, "
                             f"got {type(state).__name__}")
    expected = _adapter_parameters(model)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise StateDictError(f"load_lora_state_dict: missing keys {missing}; "
                             f"unexpected keys {unexpected}")
    updates = []
    for name, p in expected.items():
        value = np.asarray(state[name])
        if not (np.issubdtype(value.dtype, np.floating) or np.issubdtype(value.dtype, np.integer)):
            raise StateDictError(f"load_lora_state_dict: {name!r} has non-numeric dtype "
                                 f"{value.dtype}")
        if value.shape != p.shape:
            raise ShapeError(f"load_lora_state_dict: {name!r} has shape {value.shape}, the model "
                             f"expects {p.shape}{_layer_facts(name, value.shape, layers)}")
        if not np.all(np.isfinite(value)):
            raise StateDictError(f"load_lora_state_dict: {name!r} contains NaN or infinity")
        updates.append((p, value))
    for p, value in updates:  # all checked: now change the model
        p.data = np.array(value, dtype=p.dtype)


def _layer_facts(name: str, got: tuple[int, ...], layers: dict[str, LoRALinear]) -> str:
    layer_name, _, pname = name.rpartition(".")
    layer = layers.get(layer_name)
    if layer is None or pname not in ("lora_A", "lora_B"):
        return ""
    facts = f" (layer r={layer.r}, in={layer.in_features}, out={layer.out_features})"
    rank_axis = 0 if pname == "lora_A" else 1
    if len(got) == 2:
        fixed_axis = 1 - rank_axis
        if got[fixed_axis] == getattr(layer, pname).shape[fixed_axis]:
            facts += f": an adapter of rank {got[rank_axis]}, not {layer.r}"
    return facts
