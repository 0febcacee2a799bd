"""LoRA on a whole model: adapt the Linear layers a config names, and undo it.

``apply_lora`` checks everything first (every target matches a Linear, no layer is adapted twice,
every pattern matches) and only then changes the model, so a mistake leaves the model as it was.
The config is kept on the model as ``model.lora_config``: it says which parameters the adapter owns
(``lora_A``, ``lora_B``, plus trained biases and ``modules_to_save``), which is what
``lora_state_dict`` saves and ``load_lora_state_dict`` loads back (see ``state.py``).
"""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Iterator

import numpy as np

from minilora.configs import choice
from minilora.errors import ConfigError, TargetModuleError
from minilora.lora.config import ALL_LINEAR, BIAS_MODES, LoRAConfig, matches_pattern, matches_target
from minilora.lora.layer import LoRALinear
from minilora.nn import Linear, Module, Parameter, make_rng


def named_lora_layers(model: Module) -> Iterator[tuple[str, LoRALinear]]:
    """(dotted name, layer) for every LoRALinear in ``model``, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def _names(names: list[str], limit: int = 24) -> str:
    """A readable list: the distinct last parts, then the full names (cut after ``limit``)."""
    if not names:
        return "none"
    leaves = sorted({n.rpartition(".")[2] for n in names})
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    shown = ", ".join(names[:limit]) + more
    return f"{', '.join(leaves)} (full names: {shown})"


def _matching(names: list[str], target: str, regex: bool) -> list[str]:
    return [n for n in names if (re.fullmatch(target, n) if regex else matches_target(n, target))]


def _plan(model: Module, config: LoRAConfig) -> tuple[list[tuple[str, Linear]], list[str]]:
    """Check ``config`` against ``model``, changing nothing: (targets to adapt, modules to save)."""
    if not isinstance(config, LoRAConfig):
        raise ConfigError(f"apply_lora: config must be a LoRAConfig, got {type(config).__name__}")
    if not isinstance(model, Module):
        raise ConfigError(f"apply_lora: model must be a Module, got {type(model).__name__}")
    modules = {n: m for n, m in model.named_modules() if n}
    matched = _targets(model, modules, config)
    adapted = [n for n, _ in named_lora_layers(model)]
    if adapted:
        raise TargetModuleError(f"apply_lora: the model already has LoRA layers "
                                f"({_names(adapted)}); minilora keeps one adapter per model: "
                                "unload() or merge_and_unload() first")
    _check_not_tied(modules, matched)
    for field in ("rank_pattern", "alpha_pattern"):
        for key in getattr(config, field) or {}:
            if not any(matches_pattern(n, key) for n in matched):
                raise TargetModuleError(f"apply_lora: {field} key {key!r} matches none of the "
                                        f"adapted modules: {_names(matched)}")
    return [(n, modules[n]) for n in matched], _modules_to_save(modules, config, matched)


def _targets(model: Module, modules: dict[str, Module], config: LoRAConfig) -> list[str]:
    """The names of the Linear modules ``config.target_modules`` matches, in model order; every
    entry must match, and only Linear modules that are not adapted yet."""
    names = list(modules)
    linears = [n for n, m in modules.items() if isinstance(m, (Linear, LoRALinear))]
    regex = isinstance(config.target_modules, str)
    matched: list[str] = []
    for target in [config.target_modules] if regex else list(config.target_modules):
        hits = _all_linear(model, modules) if target == ALL_LINEAR else \
            _matching(names, target, regex)
        if not hits:
            raise TargetModuleError(f"apply_lora: target_modules entry {target!r} matches no "
                                    f"module; the model's Linear modules are {_names(linears)}")
        for name in hits:
            module = modules[name]
            if isinstance(module, LoRALinear):
                raise TargetModuleError(f"apply_lora: {name!r} (matched by {target!r}) is already "
                                        f"a LoRALinear (r={module.r}); unload() or "
                                        "merge_and_unload() it first")
            if not isinstance(module, Linear):
                raise TargetModuleError(f"apply_lora: {name!r} (matched by {target!r}) is a "
                                        f"{type(module).__name__}, not a Linear; LoRA adapts "
                                        f"Linear modules: {_names(linears)}")
            if name not in matched:
                matched.append(name)
    return sorted(matched, key=names.index)  # model order: a seed gives the same A in any order


def _check_not_tied(modules: dict[str, Module], matched: list[str]) -> None:
    """A TargetModuleError if a target's weight is shared with another module: merging would
    change both."""
    owners = _owners(modules)
    for name in matched:
        tied = [o for o in owners[id(modules[name].weight)] if o != name]
        if tied:
            raise TargetModuleError(f"apply_lora: the weight of {name!r} is shared with {tied} "
                                    "(tied weights); merging would change both, so LoRA does not "
                                    "adapt it")


def _owners(modules: dict[str, Module]) -> dict[int, list[str]]:
    """Parameter id -> the name of every module that holds it (more than one: tied)."""
    owners: dict[int, list[str]] = {}
    for name, module in modules.items():
        for p in module._parameters.values():
            owners.setdefault(id(p), []).append(name)
    return owners


def _modules_to_save(modules: dict[str, Module], config: LoRAConfig,
                     matched: list[str]) -> list[str]:
    """The names ``config.modules_to_save`` matches; none of them may be adapted too."""
    saved: list[str] = []
    for entry in config.modules_to_save or ():
        hits = _matching(list(modules), entry, regex=False)
        if not hits:
            raise TargetModuleError(f"apply_lora: modules_to_save entry {entry!r} matches no "
                                    f"module; the model's modules are {_names(list(modules))}")
        for name in hits:
            clash = [t for t in matched
                     if t == name or t.startswith(name + ".") or name.startswith(t + ".")]
            if clash:
                raise TargetModuleError(f"apply_lora: {name!r} is both in modules_to_save and "
                                        f"adapted ({clash}); a module is either trained in full "
                                        "or adapted")
            saved.append(name)
    if saved and not config.ensure_weight_tying:
        _refuse_untying(modules, saved, _owners(modules))
    return saved


def _all_linear(model: Module, modules: dict[str, Module]) -> list[str]:
    """PEFT's ``"all-linear"``: every Linear but the output layer (``get_output_embeddings()``)."""
    get_output = getattr(model, "get_output_embeddings", None)
    output = get_output() if callable(get_output) else None
    return [n for n, m in modules.items() if isinstance(m, Linear) and m is not output]


def _refuse_untying(modules: dict[str, Module], saved: list[str],
                    owners: dict[int, list[str]]) -> None:
    """A saved module whose weight another module shares: PEFT (ensure_weight_tying=False) trains
    an untied copy; minilora trains in place and keeps the tie. Different numbers: refuse."""
    inside = [n for n in modules if any(n == s or n.startswith(s + ".") for s in saved)]
    for name in inside:
        for p in modules[name]._parameters.values():
            tied = [o for o in owners.get(id(p), []) if o not in inside]
            if tied:
                raise TargetModuleError(
                    f"apply_lora: modules_to_save {name!r} shares its weight with {tied} (tied "
                    "weights); minilora trains it in place and keeps the tie, which PEFT does "
                    "only with ensure_weight_tying=True: set it")


def plan_lora(model: Module, config: LoRAConfig) -> tuple[list[str], list[str]]:
    """(names of the layers ``apply_lora(model, config)`` would adapt, names of the modules it
    would train in full), in model order, changing nothing; the same errors as ``apply_lora``."""
    targets, saved = _plan(model, config)
    return [name for name, _ in targets], saved


def apply_lora(model: Module, config: LoRAConfig,
               rng: np.random.Generator | int | None = None) -> Module:
    """Replace each Linear that ``config.target_modules`` names by a LoRALinear, freeze the rest.

    Trainable afterwards: every ``lora_A``/``lora_B``, the biases ``config.bias`` names and the
    ``modules_to_save``. ``rng`` (a Generator or seed) draws the ``lora_A`` values in module order
    and, shared by all adapted layers, their dropout masks. Returns ``model``, changed in place.
    """
    targets, saved = _plan(model, config)  # raises before anything changes
    rng = make_rng(rng)
    for name, linear in targets:
        r, alpha = config.rank_and_alpha(name)
        layer = LoRALinear(linear, r, alpha, config.lora_dropout, config.use_rslora,
                           config.init_lora_weights, rng)
        layer.train(linear.training)  # an eval model stays in eval: no dropout on the adapter
        model.set_submodule(name, layer)
    mark_only_lora_as_trainable(model, config.bias)
    for name in saved:
        model.get_submodule(name).requires_grad_(True)
    model.lora_config = config
    return model


def mark_only_lora_as_trainable(model: Module, bias: str = "none") -> Module:
    """Freeze every parameter but ``lora_A``/``lora_B`` (and the biases ``bias`` names), as loralib.

    bias: "none", "all" (every parameter named ``bias``), "lora_only" (biases of LoRA layers).
    Frozen parameters lose any gradient they held, so no optimizer can step them.
    """
    choice("mark_only_lora_as_trainable", "bias", bias, BIAS_MODES)
    layers = [layer for _, layer in named_lora_layers(model)]
    if not layers:
        raise TargetModuleError("mark_only_lora_as_trainable: the model has no LoRA layers")
    train = {id(p) for layer in layers for p in (layer.lora_A, layer.lora_B)}
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


def _lora_layers_or_raise(model: Module, what: str) -> list[tuple[str, LoRALinear]]:
    layers = list(named_lora_layers(model))
    if not layers:
        raise TargetModuleError(f"{what}: the model has no LoRA layers")
    return layers


def _mergeable_layers(model: Module, what: str) -> list[tuple[str, LoRALinear]]:
    """The LoRA layers, checked first: ``merge()`` would refuse a disabled one halfway through."""
    layers = _lora_layers_or_raise(model, what)
    disabled = [name for name, layer in layers if layer.disable_adapters]
    if disabled:
        raise ConfigError(f"{what}: the adapters of {disabled} are disabled; enable them first")
    return layers


def _unmerged(layers: list[tuple[str, LoRALinear]], what: str) -> list[tuple[str, LoRALinear]]:
    """The layers not merged yet; one warning naming those that are (PEFT warns too: "All
    adapters are already merged, nothing to do"), whose weights already hold ``s B A``."""
    merged = [name for name, layer in layers if layer.merged]
    if merged:
        warnings.warn(f"{what}: the adapters of {_names(merged)} are already merged; "
                      f"{'nothing to do' if len(merged) == len(layers) else 'merging the rest'}",
                      stacklevel=3)
    return [(name, layer) for name, layer in layers if not layer.merged]


def merge_adapter(model: Module) -> Module:
    """``LoRALinear.merge`` on every LoRA layer, in place; the layers stay LoRALinear. Layers
    already merged are left as they are, with a warning naming them."""
    for _, layer in _unmerged(_mergeable_layers(model, "merge_adapter"), "merge_adapter"):
        layer.merge()
    return model


def unmerge_adapter(model: Module) -> Module:
    """Undo ``merge_adapter``: ``LoRALinear.unmerge`` on every LoRA layer."""
    for _, layer in _lora_layers_or_raise(model, "unmerge_adapter"):
        layer.unmerge()
    return model


def merge_and_unload(model: Module) -> Module:
    """Merge every adapter into its weight and put plain Linear layers back: the model costs what
    the base costs at inference. Parameters keep their ``requires_grad``. Layers already merged
    keep their weights (which hold ``s B A``), with a warning naming them. Returns the model."""
    layers = _mergeable_layers(model, "merge_and_unload")
    for _, layer in _unmerged(layers, "merge_and_unload"):
        layer.merge()
    for name, layer in layers:
        model = _put_back_plain_linear(model, name, layer)
    return _forget_lora_config(model)


def unload(model: Module) -> Module:
    """Put plain Linear layers back without merging (a merged layer is unmerged first): the base
    model again, up to round-off in unmerged weights. Trained biases keep their trained values."""
    for name, layer in _lora_layers_or_raise(model, "unload"):
        layer.unmerge()  # nothing to do unless merged
        model = _put_back_plain_linear(model, name, layer)
    return _forget_lora_config(model)


def _put_back_plain_linear(model: Module, name: str, layer: LoRALinear) -> Module:
    """Replace the LoRA layer ``name`` by a Linear that owns its weight and bias; the model, or the
    new Linear if the model was that one layer."""
    plain = Linear.from_weights(layer.weight, layer.bias)
    plain.train(layer.training)
    if name == "":
        return plain
    model.set_submodule(name, plain)
    return model


def _forget_lora_config(model: Module) -> Module:
    if "lora_config" in model.__dict__:
        del model.lora_config
    return model


@contextlib.contextmanager
def disable_adapter(model: Module) -> Iterator[Module]:
    """Inside the block every LoRA layer computes its base output, exactly; after it, as before
    (PEFT's ``model.disable_adapter()``).

    Only the low-rank path is switched off: biases and ``modules_to_save`` trained in full stay as
    trained. A merged model cannot give its base output exactly, so that is an error.
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
    """Deprecated name of :func:`disable_adapter`, PEFT's name for this context manager (PEFT's
    ``disable_adapters`` is a layer's flag, as ``LoRALinear.disable_adapters`` is here)."""
    warnings.warn("minilora.lora.disable_adapters is deprecated; use disable_adapter",
                  DeprecationWarning, stacklevel=2)
    return disable_adapter(model)
