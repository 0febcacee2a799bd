"""LoRA on a whole model: adapters by name, as PEFT's ``LoraModel`` keeps them, and undoing them.

``apply_lora`` adds the first adapter (``"default"``), ``add_adapter`` another beside it; both
check everything first (``plan.py``), so a mistake leaves the model as it was. The model keeps

- ``model.peft_config``: adapter name -> its ``LoRAConfig``, in the order they were added;
- ``model.active_adapters``: the names whose paths the forward pass adds (``set_adapter``);
- ``model.lora_config``: the first active adapter's config, for single-adapter code (the run
  checkpoint, ``save_adapter``): it says what that adapter owns (``lora_A``, ``lora_B``, trained
  biases, ``modules_to_save``), which ``lora_state_dict`` saves (``state.py``).

Several active adapters add their paths. Merging folds a chosen set into the weights (the layers
keep the arrays they replaced, so unmerging restores W bit for bit); ``merge_and_unload`` merges
the active ones and puts plain layers back.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import numpy as np

from minilora.configs import choice
from minilora.errors import ConfigError, TargetModuleError
from minilora.lora.config import BIAS_MODES, LoRAConfig
from minilora.lora.layer import DEFAULT, LoRAEmbedding, LoRALayer, LoRALinear
from minilora.lora.plan import Target, named_lora_layers, names_text, plan, weight_owners
from minilora.nn import Embedding, Linear, Module, Parameter, make_rng

__all__ = [
    "active_adapters", "add_adapter", "apply_lora", "delete_adapter", "disable_adapter",
    "disable_adapters", "mark_only_lora_as_trainable", "merge_adapter", "merge_and_unload",
    "named_lora_layers", "plan_lora", "set_adapter", "tied_lora_layers", "unload",
    "unmerge_adapter",
]


def plan_lora(model: Module, config: LoRAConfig) -> tuple[list[str], list[str]]:
    """(names of the layers ``apply_lora(model, config)`` would adapt, names of the modules it
    would train in full), in model order, changing nothing; the same errors as ``apply_lora``."""
    targets, saved = plan(model, config)
    return [t.name for t in targets], saved


def apply_lora(model: Module, config: LoRAConfig, rng: np.random.Generator | int | None = None,
               adapter_name: str = DEFAULT) -> Module:
    """Adapt each Linear or Embedding that ``config.target_modules`` names, freeze the rest.

    Trainable afterwards: the adapter's ``lora_A``/``lora_B`` (``lora_embedding_A``/``_B``), the
    biases ``config.bias`` names and the ``modules_to_save``. ``rng`` (a Generator or seed) draws
    the adapter's values in module order and, shared by all adapted layers, their dropout masks.
    adapter_name: the adapter's name (PEFT's ``get_peft_model(..., adapter_name=)``), active.
    Returns ``model``, changed in place.
    """
    name = _adapter_name(adapter_name, "apply_lora")
    targets, saved = plan(model, config)  # raises before anything changes
    rng = make_rng(rng)
    for target in targets:
        _adapt(model, target, config, name, rng, [name])
    model.peft_config = {name: config}
    model.active_adapters = [name]
    mark_only_lora_as_trainable(model, config.bias)
    for module_name in saved:
        model.get_submodule(module_name).requires_grad_(True)
    _sync_lora_config(model)
    return model


def add_adapter(model: Module, adapter_name: str, config: LoRAConfig,
                rng: np.random.Generator | int | None = None) -> Module:
    """Add an untrained adapter from ``config`` beside the model's others, as PEFT's
    ``add_adapter``: inactive and frozen until ``set_adapter`` (on a model without adapters, it is
    ``apply_lora``). Its targets may be layers that already hold adapters. Only one adapter of a
    model may train biases or ``modules_to_save`` (minilora trains them in place)."""
    name = _adapter_name(adapter_name, "add_adapter")
    configs = _configs(model)
    if not configs:
        return apply_lora(model, config, rng, name)
    if name in configs:
        raise ConfigError(f"add_adapter: the model already has an adapter named {name!r} "
                          f"(its adapters: {list(configs)})")
    if isinstance(config, LoRAConfig) and (config.bias != "none" or config.modules_to_save):
        raise ConfigError(f"add_adapter: {name!r} would train biases (bias={config.bias!r}) or "
                          f"modules_to_save ({config.modules_to_save}); minilora trains those "
                          "in place, so only the first adapter (apply_lora) may")
    _refuse_merged(model, "add_adapter")
    targets, _ = plan(model, config, adding=name)
    residual = [n for n, c in {**configs, name: config}.items()
                if c.init_lora_weights in ("pissa", "olora")]
    if residual:  # as PEFT warns: the others now run on the residual weights
        warnings.warn(f"add_adapter: {residual} changed the base weights (PiSSA/OLoRA), so other "
                      "adapters run on the residual; convert it to a plain adapter "
                      "(save_adapter's path_initial_model_for_weight_conversion)", UserWarning,
                      stacklevel=2)
    rng = make_rng(rng)
    active = model.active_adapters
    for target in targets:
        _adapt(model, target, config, name, rng, active)
    model.peft_config = {**configs, name: config}
    return model


def _adapt(model: Module, target: Target, config: LoRAConfig, adapter_name: str, rng,
           active: list[str]) -> None:
    """Give ``target`` the adapter ``config`` describes: a new LoRA layer around a plain module,
    or one more adapter of a LoRA layer; its adapters' flags then follow ``active``."""
    r, alpha = config.rank_and_alpha(target.name)
    settings = dict(r=r, lora_alpha=alpha, lora_dropout=config.lora_dropout,
                    use_rslora=config.use_rslora, init_lora_weights=config.init_lora_weights)
    if target.slices is not None:
        settings.update(slices=target.slices, slice_names=target.slice_names)
    if config.use_dora:
        settings.update(use_dora=True)
    module = target.module
    if isinstance(module, LoRALayer):
        module.add_adapter(adapter_name, module.make_adapter(**settings), rng=rng)
        layer = module
    else:
        cls = LoRAEmbedding if isinstance(module, Embedding) else LoRALinear
        layer = cls(module, **settings, rng=rng, adapter_name=adapter_name)
        layer.train(module.training)  # an eval model stays in eval: no dropout on the adapter
        model.set_submodule(target.name, layer)
    layer.set_adapter(active)


def _adapter_name(name, what: str) -> str:
    """A name usable in a parameter name and a directory: letters, digits, ``_`` and ``-``."""
    if not isinstance(name, str) or not name or not name.replace("_", "").replace("-", "") \
            .isalnum() or not name.isascii():
        raise ConfigError(f"{what}: adapter_name must be a non-empty string of letters, digits, "
                          f"'_' and '-' (it names parameters and a folder), got {name!r}")
    return name


def _configs(model: Module) -> dict[str, LoRAConfig]:
    return model.__dict__.get("peft_config") or {}


def active_adapters(model: Module) -> list[str]:
    """The names of the active adapters, in the order ``set_adapter`` gave them."""
    return list(model.__dict__.get("active_adapters") or [])


def _sync_lora_config(model: Module) -> None:
    """``model.lora_config``: the first active adapter's config (or the first adapter's)."""
    configs = _configs(model)
    if not configs:
        for attr in ("lora_config", "peft_config", "active_adapters"):
            model.__dict__.pop(attr, None)
        return
    first = next((n for n in active_adapters(model) if n in configs), next(iter(configs)))
    model.lora_config = configs[first]


def _adapter_names(model: Module, names, what: str) -> list[str]:
    """``names`` (one name or a list) checked against the model's adapters."""
    configs = _configs(model)
    names = [names] if isinstance(names, str) else names
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"{what}: expected an adapter name or a list of them, got {names!r}")
    unknown = [n for n in names if n not in configs]
    if unknown:
        raise ConfigError(f"{what}: no adapter named {unknown} (the model's adapters: "
                          f"{list(configs)})")
    return list(names)


def set_adapter(model: Module, adapter_name: str | list[str]) -> Module:
    """Make one adapter, or several, the active ones (their paths add), as PEFT's
    ``set_adapter``: they become trainable and every other adapter frozen, the biases and
    ``modules_to_save`` an adapter trains with it."""
    names = _adapter_names(model, adapter_name, "set_adapter")
    _lora_layers_or_raise(model, "set_adapter")
    for _, layer in named_lora_layers(model):
        layer.set_adapter(names)
    model.active_adapters = names
    owners = {n: c for n, c in _configs(model).items() if c.bias != "none" or c.modules_to_save}
    if owners:
        from minilora.lora.state import extra_parameters  # the state's rule for what it owns

        for owner, config in owners.items():
            for p in extra_parameters(model, owner, config).values():
                p.requires_grad_(owner in names)
    _sync_lora_config(model)
    return model


def delete_adapter(model: Module, adapter_name: str) -> Module:
    """Delete an adapter that is not merged, as PEFT's ``delete_adapter``; every other adapter
    stays bit for bit as it was. A layer left without adapters becomes its plain layer again. If
    it was the only active one, the first remaining adapter by name becomes active (a warning)."""
    (name,) = _adapter_names(model, adapter_name, "delete_adapter")
    merged = [n for n, layer in named_lora_layers(model) if name in layer.merged_adapters]
    if merged:
        raise ConfigError(f"delete_adapter: adapter {name!r} is merged in {merged}; "
                          "unmerge_adapter(model) first")
    for layer_name, layer in list(named_lora_layers(model)):
        if name in layer.adapters:
            layer.delete_adapter(name)
            if not layer.adapters:
                model = _put_back_plain_layer(model, layer_name, layer)
    configs = {n: c for n, c in _configs(model).items() if n != name}
    model.peft_config = configs
    active = [n for n in active_adapters(model) if n != name]
    if configs and not active:
        active = [sorted(configs)[0]]
        warnings.warn(f"delete_adapter: adapter {name!r} was active; {active[0]!r} is active now",
                      UserWarning, stacklevel=2)
    model.active_adapters = active
    if configs:
        set_adapter(model, active)
    _sync_lora_config(model)
    return model


def mark_only_lora_as_trainable(model: Module, bias: str = "none") -> Module:
    """Freeze every parameter but the active adapters' (and the biases ``bias`` names), as loralib.

    bias: "none", "all" (every parameter named ``bias``), "lora_only" (biases of LoRA layers).
    Frozen parameters lose any gradient they held, so no optimizer can step them.
    """
    choice("mark_only_lora_as_trainable", "bias", bias, BIAS_MODES)
    layers = [layer for _, layer in named_lora_layers(model)]
    if not layers:
        raise TargetModuleError("mark_only_lora_as_trainable: the model has no LoRA layers")
    train = {id(p) for layer in layers for name in layer.active_adapters
             if name in layer.adapters for p in layer.adapter_parameters(name)}
    if bias == "all":
        train |= {id(m.bias) for m in model.modules()
                  if isinstance(getattr(m, "bias", None), Parameter)}
    elif bias == "lora_only":
        train |= {id(layer.bias) for layer in layers if layer.bias is not None}
    for p in model.parameters():
        p.requires_grad_(id(p) in train)
        if id(p) not in train:
            p.grad = None
    return model


def _lora_layers_or_raise(model: Module, what: str) -> list[tuple[str, LoRALayer]]:
    layers = list(named_lora_layers(model))
    if not layers:
        raise TargetModuleError(f"{what}: the model has no LoRA layers")
    return layers


def _refuse_merged(model: Module, what: str) -> None:
    merged = [name for name, layer in named_lora_layers(model) if layer.merged]
    if merged:
        raise ConfigError(f"{what}: layers {merged} are merged; unmerge_adapter(model) first")


def _mergeable_layers(model: Module, what: str) -> list[tuple[str, LoRALayer]]:
    """The LoRA layers, checked first: ``merge()`` would refuse a disabled one halfway through."""
    layers = _lora_layers_or_raise(model, what)
    disabled = [name for name, layer in layers if layer.disable_adapters]
    if disabled:
        raise ConfigError(f"{what}: the adapters of {disabled} are disabled; enable them first")
    return layers


def tied_lora_layers(model: Module) -> dict[str, list[str]]:
    """LoRA layer name -> the other modules sharing its weight, for every LoRA layer whose weight
    is tied (GPT-2's ``transformer.wte`` and ``lm_head``): merging into it changes them too."""
    owners = weight_owners({n: m for n, m in model.named_modules() if n})
    tied = {name: [o for o in owners.get(id(layer.weight), []) if o != name]
            for name, layer in named_lora_layers(model)}
    return {name: others for name, others in tied.items() if others}


def _warn_if_tied(model: Module, layers: list[tuple[str, LoRALayer]], names, what: str) -> None:
    """Merging into a weight another module shares changes that module too (GPT-2's wte and
    lm_head): warn, naming both. PEFT 0.21 merges the same way; its warning looks for modules
    named ``embed_tokens`` or ``lm_head``, so it is silent for GPT-2's ``wte``."""
    tied_layers = tied_lora_layers(model)
    for name, layer in layers:
        merging = [n for n in (layer.active_adapters if names is None else names)
                   if n in layer.adapters and n not in layer.merged_adapters]
        tied = tied_layers.get(name)
        if merging and tied:
            warnings.warn(f"{what}: the weight of {name!r} is tied to {tied}: merging its adapter "
                          f"changes {tied} too, so the merged model differs from the unmerged one "
                          "there (PEFT does the same)", UserWarning, stacklevel=3)


def _to_merge(layers: list[tuple[str, LoRALayer]], names, what: str) -> list[tuple[str, LoRALayer]]:
    """The layers with something to merge; one warning naming those whose adapters named are all
    merged already (PEFT warns too: "All adapters are already merged, nothing to do")."""
    def pending(layer):
        return [n for n in (layer.active_adapters if names is None else names)
                if n in layer.adapters and n not in layer.merged_adapters]

    done = [n for n, layer in layers if layer.merged and not pending(layer)]
    if done:
        rest = "nothing to do" if len(done) == len(layers) else "merging the rest"
        warnings.warn(f"{what}: the adapters of {names_text(done)} are already merged; {rest}",
                      stacklevel=3)
    return [(n, layer) for n, layer in layers if pending(layer)]


def merge_adapter(model: Module, adapter_names: list[str] | None = None) -> Module:
    """Merge the adapters named (default: the active ones) into every layer that holds them, in
    place, as PEFT's ``merge_adapter``; the layers stay LoRA layers and ``unmerge_adapter``
    undoes it exactly. Layers already merged are left as they are, with a warning naming them."""
    names = None if adapter_names is None else _adapter_names(model, adapter_names,
                                                              "merge_adapter")
    layers = _mergeable_layers(model, "merge_adapter")
    _warn_if_tied(model, layers, names, "merge_adapter")
    for _, layer in _to_merge(layers, names, "merge_adapter"):
        layer.merge(names)
    return model


def unmerge_adapter(model: Module) -> Module:
    """Undo ``merge_adapter``: every layer unmerges, last merged first; W is back bit for bit."""
    for _, layer in _lora_layers_or_raise(model, "unmerge_adapter"):
        layer.unmerge()
    return model


def merge_and_unload(model: Module, adapter_names: list[str] | None = None) -> Module:
    """Merge the adapters named (default: the active ones) into the weights and put plain layers
    back, dropping every adapter: the model costs what the base costs at inference. Parameters
    keep their ``requires_grad``. Layers already merged keep their weights, with a warning naming
    them. Returns the model."""
    names = None if adapter_names is None else _adapter_names(model, adapter_names,
                                                              "merge_and_unload")
    layers = _mergeable_layers(model, "merge_and_unload")
    _warn_if_tied(model, layers, names, "merge_and_unload")
    for _, layer in _to_merge(layers, names, "merge_and_unload"):
        layer.merge(names)
    for name, layer in layers:
        model = _put_back_plain_layer(model, name, layer)
    return _forget_adapters(model)


def unload(model: Module) -> Module:
    """Put plain layers back without merging (a merged layer is unmerged first): the base model
    again, bit for bit. Trained biases keep their trained values."""
    for name, layer in _lora_layers_or_raise(model, "unload"):
        layer.unmerge()
        model = _put_back_plain_layer(model, name, layer)
    return _forget_adapters(model)


def _put_back_plain_layer(model: Module, name: str, layer: LoRALayer) -> Module:
    """Replace the LoRA layer ``name`` by the plain layer that owns its parameters; the model, or
    the new layer if the model was that one layer."""
    if isinstance(layer, LoRAEmbedding):
        plain = Embedding.from_weight(layer.weight)
    else:
        plain = Linear.from_weights(layer.weight, layer.bias)
    plain.train(layer.training)
    if name == "":
        return plain
    model.set_submodule(name, plain)
    return model


def _forget_adapters(model: Module) -> Module:
    for attr in ("lora_config", "peft_config", "active_adapters"):
        model.__dict__.pop(attr, None)
    return model


@contextlib.contextmanager
def disable_adapter(model: Module) -> Iterator[Module]:
    """Inside the block every LoRA layer computes its base output, exactly; after it, as before
    (PEFT's ``model.disable_adapter()``).

    Only the low-rank paths are switched off: biases and ``modules_to_save`` trained in full stay
    as trained. A merged model cannot give its base output exactly, so that is an error.
    """
    layers = _lora_layers_or_raise(model, "disable_adapter")
    merged = [name for name, layer in layers if layer.merged]
    if merged:
        raise ConfigError(f"disable_adapter: layers {merged} are merged; "
                          "unmerge_adapter(model) first")
    before = [layer.disable_adapters for _, layer in layers]
    for _, layer in layers:
        layer.enable_adapters(False)
    try:
        yield model
    finally:
        for (_, layer), was_disabled in zip(layers, before, strict=True):
            layer.enable_adapters(not was_disabled)


def disable_adapters(model: Module):
    """Deprecated name of [`disable_adapter`][], PEFT's name for this context manager (PEFT's
    ``disable_adapters`` is a layer's flag, as ``LoRALinear.disable_adapters`` is here)."""
    warnings.warn("minilora.lora.disable_adapters is deprecated; use disable_adapter",
                  DeprecationWarning, stacklevel=2)
    return disable_adapter(model)

