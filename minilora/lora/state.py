"""An adapter's own state: what a LoRA run saves, and loading it back into an adapted model.

An adapter is its layers' parameters (``lora_A`` and ``lora_B``, or ``lora_embedding_A`` and
``lora_embedding_B``) plus, per its config (``model.peft_config[name]``), the biases it trains
(``bias="all"`` or ``"lora_only"``) and its ``modules_to_save``. Names are the model's own
parameter names: ``transformer.h.0.attn.c_attn.lora_A`` for the default adapter and
``transformer.h.0.attn.c_attn.lora_A.<adapter>`` for another, so a state dict says which adapter
each array belongs to and is a part of ``model.state_dict()``.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from minilora.errors import ConfigError, ShapeError, StateDictError
from minilora.lora.config import LoRAConfig
from minilora.lora.layer import LoRALayer
from minilora.lora.model import _lora_layers_or_raise
from minilora.lora.plan import matching, named_lora_layers
from minilora.nn import Module, Parameter


def extra_parameters(model: Module, adapter_name: str, config: LoRAConfig) -> dict[str, Parameter]:
    """name -> Parameter for what the adapter trains besides its layers: the biases ``bias``
    names (``"lora_only"``: those of the layers holding it) and every parameter of its
    ``modules_to_save``, each once, in module order."""
    all_names = [n for n, _ in model.named_modules() if n]
    saved = [m for entry in config.modules_to_save or () for m in
             matching(all_names, entry, regex=False)]
    out: dict[str, Parameter] = {}
    seen: set[int] = set()
    for mod_name, module in model.named_modules():
        in_saved = any(mod_name == s or mod_name.startswith(s + ".") for s in saved)
        holds = isinstance(module, LoRALayer) and adapter_name in module.adapters
        for pname, p in module._parameters.items():
            bias = pname == "bias" and (config.bias == "all" or (config.bias == "lora_only"
                                                                 and holds))
            if (in_saved or bias) and id(p) not in seen:
                seen.add(id(p))
                out[f"{mod_name}.{pname}" if mod_name else pname] = p
    return out


def adapter_names(model: Module, adapter_name=None) -> list[str]:
    """``adapter_name`` as a list (one name or several), or, for None, the active adapters."""
    if adapter_name is None:
        active = model.__dict__.get("active_adapters")
        if active is not None:
            return list(active)
        return list(dict.fromkeys(n for _, layer in named_lora_layers(model)
                                  for n in layer.active_adapters))
    names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
    held = {n for _, layer in named_lora_layers(model) for n in layer.adapters}
    unknown = [n for n in names if n not in held]
    if unknown:
        raise ConfigError(f"lora_state_dict: no adapter named {unknown} (the model's adapters: "
                          f"{sorted(held)})")
    return names


def _adapter_parameters(model: Module, names: list[str]) -> dict[str, Parameter]:
    """name -> Parameter for what the adapters ``names`` own (see the module docstring), each
    once, in module order."""
    configs = model.__dict__.get("peft_config") or {}
    extras = {id(p) for n in names if n in configs
              for p in extra_parameters(model, n, configs[n]).values()}
    out: dict[str, Parameter] = {}
    seen: set[int] = set()
    for mod_name, module in model.named_modules():
        owned = {id(p) for n in names if n in module.adapters
                 for p in module.adapter_parameters(n)} if isinstance(module, LoRALayer) else set()
        for pname, p in module._parameters.items():
            if (id(p) in owned or id(p) in extras) and id(p) not in seen:
                seen.add(id(p))
                out[f"{mod_name}.{pname}" if mod_name else pname] = p
    return out


def lora_state_dict(model: Module, adapter_name: str | list[str] | None = None
                    ) -> dict[str, np.ndarray]:
    """name -> a copy of each array of the adapter(s) named (default: the active ones): all a
    LoRA run needs to save beside a reference to its base model. Names are the model's own
    parameter names (``...c_attn.lora_A``; ``...c_attn.lora_A.<adapter>`` for another adapter)."""
    _lora_layers_or_raise(model, "lora_state_dict")
    names = adapter_names(model, adapter_name)
    return {name: p.data.copy() for name, p in _adapter_parameters(model, names).items()}


def load_lora_state_dict(model: Module, state: Mapping[str, np.ndarray],
                         adapter_name: str | list[str] | None = None) -> None:
    """Copy an adapter saved by ``lora_state_dict`` into an adapted ``model`` (same config): the
    arrays of the adapter(s) named (default: the active ones).

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
    expected = _adapter_parameters(model, adapter_names(model, adapter_name))
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


def _layer_facts(name: str, got: tuple[int, ...], layers: dict[str, LoRALayer]) -> str:
    layer_name, _, pname = name.rpartition(".")
    layer = layers.get(layer_name)
    if layer is None or pname not in ("lora_A", "lora_B") or "default" not in layer.adapters:
        return ""
    facts = f" (layer r={layer.r}, in={layer.in_features}, out={layer.out_features})"
    rank_axis = 0 if pname == "lora_A" else 1
    if len(got) == 2:
        fixed_axis = 1 - rank_axis
        if got[fixed_axis] == getattr(layer, pname).shape[fixed_axis]:
            facts += f": an adapter of rank {got[rank_axis]}, not {layer.r}"
    return facts
