"""Checking a LoRA config against a model, changing nothing: which layers it adapts, and how.

Every rule is checked before any module changes, so a mistake leaves the model as it was: every
target matches a Linear or an Embedding, no layer gets the same adapter twice, a tied Linear is not
adapted, every pattern and every ``target_slices`` key matches an adapted module, and each slice
it names is one the model declares (``model.fused_projections``, e.g. GPT-2's
``{"c_attn": ("q", "k", "v")}``: c_attn's output is q, k and v, in equal parts).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

from minilora.errors import ConfigError, TargetModuleError
from minilora.lora.config import ALL_LINEAR, LoRAConfig, matches_pattern, matches_target
from minilora.lora.layer import LoRAEmbedding, LoRALayer, LoRALinear
from minilora.nn import Embedding, Linear, Module


@dataclass(frozen=True)
class Target:
    """A module to adapt: its name, the module (plain or already a LoRA layer), and, for an
    adapter on slices of a fused output, their (lo, hi) rows and names (else None, ())."""

    name: str
    module: Module
    slices: tuple[tuple[int, int], ...] | None = None
    slice_names: tuple[str, ...] = ()


def named_lora_layers(model: Module) -> Iterator[tuple[str, LoRALayer]]:
    """(dotted name, layer) for every LoRA layer (Linear or Embedding) in ``model``, in order."""
    for name, module in model.named_modules():
        if isinstance(module, LoRALayer):
            yield name, module


def names_text(names: list[str], limit: int = 24) -> str:
    """A readable list: the distinct last parts, then the full names (cut after ``limit``)."""
    if not names:
        return "none"
    leaves = sorted({n.rpartition(".")[2] for n in names})
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    shown = ", ".join(names[:limit]) + more
    return f"{', '.join(leaves)} (full names: {shown})"


def matching(names: list[str], target: str, regex: bool) -> list[str]:
    return [n for n in names if (re.fullmatch(target, n) if regex else matches_target(n, target))]


def plan(model: Module, config: LoRAConfig, adding: str | None = None) -> tuple[list[Target],
                                                                                list[str]]:
    """Check ``config`` against ``model``, changing nothing: (targets, modules to save).

    adding: the name of an adapter being added beside others (``add_adapter``): its targets may
    be LoRA layers already, which must not hold that name. Without it the model must have none.
    """
    if not isinstance(config, LoRAConfig):
        raise ConfigError(f"apply_lora: config must be a LoRAConfig, got {type(config).__name__}")
    if not isinstance(model, Module):
        raise ConfigError(f"apply_lora: model must be a Module, got {type(model).__name__}")
    modules = {n: m for n, m in model.named_modules() if n}
    matched = _targets(model, modules, config, adding)
    adapted = [n for n, _ in named_lora_layers(model)]
    if adapted and adding is None:
        raise TargetModuleError(f"apply_lora: the model already has LoRA layers "
                                f"({names_text(adapted)}); add_adapter(model, name, config) adds "
                                "another adapter beside them; unload() or merge_and_unload() "
                                "removes them")
    _check_not_tied(modules, matched)
    for field in ("rank_pattern", "alpha_pattern"):
        for key in getattr(config, field) or {}:
            if not any(matches_pattern(n, key) for n in matched):
                raise TargetModuleError(f"apply_lora: {field} key {key!r} matches none of the "
                                        f"adapted modules: {names_text(matched)}")
    if config.use_dora:
        embeddings = [n for n in matched if isinstance(modules[n], (Embedding, LoRAEmbedding))]
        if embeddings:
            raise TargetModuleError(f"apply_lora: use_dora=True adapts Linear layers; DoRA on an "
                                    f"Embedding is not implemented: {names_text(embeddings)}")
    targets = [_sliced(model, config, name, modules[name]) for name in matched]
    for key in config.target_slices or {}:
        if not any(matches_target(n, key) for n in matched):
            raise TargetModuleError(f"apply_lora: target_slices key {key!r} matches none of the "
                                    f"adapted modules: {names_text(matched)}")
    return targets, modules_to_save(modules, config, matched)


def _targets(model: Module, modules: dict[str, Module], config: LoRAConfig,
             adding: str | None) -> list[str]:
    """The names of the modules ``config.target_modules`` matches, in model order: every entry
    must match, and only Linear or Embedding modules (or, when adding, LoRA layers without
    that adapter)."""
    names = list(modules)
    kinds = (Linear, Embedding, LoRALayer)
    adaptable = [n for n, m in modules.items() if isinstance(m, kinds)]
    regex = isinstance(config.target_modules, str)
    matched: list[str] = []
    for target in [config.target_modules] if regex else list(config.target_modules):
        hits = _all_linear(model, modules) if target == ALL_LINEAR else \
            matching(names, target, regex)
        if not hits:
            raise TargetModuleError(f"apply_lora: target_modules entry {target!r} matches no "
                                    f"module; the model's Linear and Embedding modules are "
                                    f"{names_text(adaptable)}")
        for name in hits:
            _check_adaptable(name, target, modules[name], adding, adaptable)
            if name not in matched:
                matched.append(name)
    return sorted(matched, key=names.index)  # model order: a seed gives the same A in any order


def _check_adaptable(name: str, target: str, module: Module, adding: str | None,
                     adaptable: list[str]) -> None:
    where = f"apply_lora: {name!r} (matched by {target!r})"
    if isinstance(module, LoRALayer):
        held = ", ".join(f"{n}: r={a.r}" for n, a in module.adapters.items())
        if adding is None:
            raise TargetModuleError(f"{where} is already a {type(module).__name__} ({held}); "
                                    "add_adapter adds another adapter to it; unload() or "
                                    "merge_and_unload() removes it")
        if adding in module.adapters:
            raise TargetModuleError(f"{where} already holds an adapter named {adding!r}")
    elif not isinstance(module, (Linear, Embedding)):
        raise TargetModuleError(f"{where} is a {type(module).__name__}, not a Linear or an "
                                f"Embedding; LoRA adapts those: {names_text(adaptable)}")


def _sliced(model: Module, config: LoRAConfig, name: str, module: Module) -> Target:
    """The target, with the rows of the slices ``config.target_slices`` names for it, in the
    order of the model's fused layout."""
    wanted = config.slices_for(name)
    if wanted is None:
        return Target(name, module)
    if isinstance(module, (Embedding, LoRAEmbedding)):
        raise TargetModuleError(f"apply_lora: target_slices names {name!r}, an Embedding; slices "
                                "are parts of a fused Linear's output")
    layouts = getattr(model, "fused_projections", None) or {}
    parts = next((v for k, v in layouts.items() if matches_target(name, k)), None)
    if parts is None:
        raise TargetModuleError(f"apply_lora: target_slices names {name!r}, but the model "
                                f"declares no fused output for it (its fused_projections: "
                                f"{dict(layouts)})")
    unknown = [s for s in wanted if s not in parts]
    if unknown or module.out_features % len(parts):
        raise TargetModuleError(f"apply_lora: target_slices for {name!r} names {list(wanted)}; "
                                f"its output is {list(parts)} in equal parts of "
                                f"{module.out_features} rows")
    width = module.out_features // len(parts)
    names = tuple(p for p in parts if p in wanted)
    rows = tuple((parts.index(p) * width, (parts.index(p) + 1) * width) for p in names)
    return Target(name, module, rows, names)


def _check_not_tied(modules: dict[str, Module], matched: list[str]) -> None:
    """A TargetModuleError if a Linear target's weight is shared with another module: its merge
    would change both. An Embedding may be tied (GPT-2's wte, lm_head): merging warns."""
    owners = weight_owners(modules)
    for name in matched:
        if isinstance(modules[name], (Embedding, LoRAEmbedding, LoRALinear)):
            continue  # a LoRA layer was checked when it was made
        tied = [o for o in owners[id(modules[name].weight)] if o != name]
        if tied:
            raise TargetModuleError(f"apply_lora: the weight of {name!r} is shared with {tied} "
                                    "(tied weights); merging would change both, so LoRA does not "
                                    "adapt it")


def weight_owners(modules: dict[str, Module]) -> dict[int, list[str]]:
    """Parameter id -> the name of every module that holds it (more than one: tied)."""
    owners: dict[int, list[str]] = {}
    for name, module in modules.items():
        for p in module._parameters.values():
            owners.setdefault(id(p), []).append(name)
    return owners


def modules_to_save(modules: dict[str, Module], config: LoRAConfig,
                    matched: list[str]) -> list[str]:
    """The names ``config.modules_to_save`` matches; none of them may be adapted too."""
    saved: list[str] = []
    for entry in config.modules_to_save or ():
        hits = matching(list(modules), entry, regex=False)
        if not hits:
            raise TargetModuleError(f"apply_lora: modules_to_save entry {entry!r} matches no "
                                    f"module; the model's modules are {names_text(list(modules))}")
        for name in hits:
            clash = [t for t in matched
                     if t == name or t.startswith(name + ".") or name.startswith(t + ".")]
            if clash:
                raise TargetModuleError(f"apply_lora: {name!r} is both in modules_to_save and "
                                        f"adapted ({clash}); a module is either trained in full "
                                        "or adapted")
            saved.append(name)
    if saved and not config.ensure_weight_tying:
        _refuse_untying(modules, saved, weight_owners(modules))
    return saved


def _all_linear(model: Module, modules: dict[str, Module]) -> list[str]:
    """PEFT's ``"all-linear"``: every Linear but the output layer (``get_output_embeddings()``)."""
    get_output = getattr(model, "get_output_embeddings", None)
    output = get_output() if callable(get_output) else None
    return [n for n, m in modules.items() if isinstance(m, (Linear, LoRALinear))
            and m is not output]


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
