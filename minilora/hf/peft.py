"""PEFT LoRA adapters, both ways: ``adapter_config.json`` plus ``adapter_model.safetensors``, the
files ``PeftModel.save_pretrained`` writes and ``PeftModel.from_pretrained`` reads.

PEFT names a tensor by the module path inside ``PeftModel`` (``base_model.model.`` + the base
model's name) with the adapter name taken out: ``...c_attn.lora_A.weight`` (r, in),
``...c_attn.lora_B.weight`` (out, r), DoRA's magnitude ``...c_attn.lora_magnitude_vector`` (out,)
(PEFT's parameter ``lora_magnitude_vector.<adapter>.weight``, saved without either part), an
adapted layer's trained bias ``...c_attn.base_layer.bias``,
any other trained bias or ``modules_to_save`` parameter under its base-model name, in the base
file's layout (GPT-2's Conv1D weights as (in, out)). Where PEFT and minilora differ:

- ``modules_to_save``: PEFT trains a copy of each module and matches names with a plain suffix
  (``"1"`` matches ``h.1`` and ``h.11``); minilora trains the module in place and matches dotted
  suffixes (``h.1`` alone). A file is read with PEFT's rule (the names it matches become the
  config's) and written with full names wherever the two rules would differ.
- A tied ``lm_head`` and input embedding (GPT-2's ``transformer.wte``, a tied Llama's or Qwen2's
  ``model.embed_tokens``): PEFT keeps them tied only with ``ensure_weight_tying=True`` and
  ``lm_head`` in ``modules_to_save``, and then writes both tensors and the embedding in
  ``modules_to_save``; minilora always keeps the tie and writes that. A file
  that trains one of the two without the other (untied in PEFT) is refused.
- With ``bias="all"`` PEFT also saves the biases of its own two copies of each saved module
  (``M.original_module.*.bias``, ``M.modules_to_save.*.bias``); minilora reads past them (the
  trained values are the ``M.*`` tensors) and does not write them.

Several adapters are saved as PEFT saves them: the ``"default"`` adapter at the root of the
directory, every other in a folder named after it; each file holds one adapter, its keys without
the adapter's name. An adapter on slices of a fused projection (``target_slices``) is written as
the full adapter PEFT can hold: rank k r, B zero outside the slices, its rank and alpha in
``rank_pattern`` and ``alpha_pattern`` (docs/adapters.md derives why that is exact).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np

from minilora import io
from minilora.errors import ConfigError, FileFormatError, MiniLoRAError, TargetModuleError
from minilora.hf import conversion, files
from minilora.hf.pretrained import FileTensor, architecture_of
from minilora.lora import (
    DEFAULT,
    LoRAConfig,
    LoRALinear,
    SlicedAdapter,
    add_adapter,
    apply_lora,
    delete_adapter,
    load_lora_state_dict,
    lora_state_dict,
    named_lora_layers,
    parameter_name,
)
from minilora.lora.config import ALL_LINEAR, matches_target, slow_patterns
from minilora.lora.peft_config import lora_config_from_peft, peft_dict
from minilora.lora.plan import plan
from minilora.lora.state import extra_parameters
from minilora.nn import Embedding, Module

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
_COPIES = re.compile(r"(?P<module>.+)\.(?:original_module|modules_to_save(?:\.default)?)\..*bias")


# ---- names: PEFT's rule for modules_to_save, and the key of each adapter tensor ---------------

def peft_saved_modules(model: Module, entries) -> list[str]:
    """The modules PEFT wraps for ``modules_to_save`` ``entries``: every module whose dotted name
    ends with an entry, as a plain string suffix; inner ones of a matched module left out."""
    matched: list[str] = []
    for name, _ in model.named_modules():
        if name and any(name.endswith(e) for e in entries or ()) \
                and not any(name.startswith(m + ".") for m in matched):
            matched.append(name)
    return matched


# how PEFT keys each kind of adapter parameter: a Linear's A and B are nn.Linear modules (their
# ``.weight``), an Embedding's are Parameters, DoRA's magnitude is keyed as the Parameter it was
_PEFT_KEY = {"lora_A": ".lora_A.weight", "lora_B": ".lora_B.weight",
             "lora_embedding_A": ".lora_embedding_A", "lora_embedding_B": ".lora_embedding_B",
             "lora_magnitude_vector": ".lora_magnitude_vector"}


def _file_key(name: str, lora_layers: set[str]) -> str:
    """PEFT's key (without ``base_model.model.``) for minilora's adapter parameter ``name``
    (``...c_attn.lora_A`` or, of another adapter, ``...c_attn.lora_A.<adapter>``)."""
    module, _, pname = name.rpartition(".")
    if module not in lora_layers and module.rpartition(".")[0] in lora_layers:
        module, _, pname = module.rpartition(".")  # the adapter's name, dropped as PEFT does
    if module in lora_layers:
        return module + _PEFT_KEY[pname] if pname in _PEFT_KEY else \
            f"{module}.base_layer.{pname}"
    return name


def _model_name(key: str, adapter_name: str = DEFAULT) -> str:
    """minilora's parameter name for PEFT's key (``base_model.model.`` already taken off), in
    the adapter ``adapter_name``."""
    for kind, suffix in _PEFT_KEY.items():
        if key.endswith(suffix):
            return parameter_name(key[:-len(suffix)] + "." + kind, adapter_name)
    return key.replace(".base_layer.", ".") if key.endswith(".base_layer.bias") else key


def adapter_file_map(model: Module) -> dict[str, FileTensor]:
    """minilora's adapter parameter name (as
    [`lora_state_dict`][minilora.lora.lora_state_dict] names it) -> its key in
    ``adapter_model.safetensors`` as PEFT writes it, and whether the file holds its transpose
    (a saved GPT-2 Conv1D weight; never ``lora_A`` or ``lora_B``)."""
    arch = architecture_of(model, "adapter_file_map")
    layers = {name for name, _ in named_lora_layers(model)}
    out = {}
    for name in lora_state_dict(model):
        key = _file_key(name, layers)
        out[name] = FileTensor(PREFIX + key, key.endswith(arch.TRANSPOSED))
    return out


# ---- writing -------------------------------------------------------------------------------

def save_adapter(model: Module, path, base_model_name_or_path: str | None = None,
                 selected_adapters: list[str] | None = None,
                 path_initial_model_for_weight_conversion=None) -> Path:
    """Write the adapters of ``model`` as PEFT 0.21's ``save_pretrained`` would for the same
    adapters on the same transformers model (``GPT2LMHeadModel``, ``LlamaForCausalLM``,
    ``Qwen2ForCausalLM``): ``adapter_config.json`` and ``adapter_model.safetensors``, each
    atomically, the ``"default"`` adapter in ``path`` and any other in ``path/<its name>``.

    base_model_name_or_path: what PEFT records as the base (a hub name or a directory).
    selected_adapters: the adapters to write (default: all, as PEFT).
    path_initial_model_for_weight_conversion: PEFT's keyword: the directory where the initial
        PiSSA or OLoRA adapter was saved before training; each adapter is then written as the
        plain LoRA adapter of rank 2r that gives the same weights on the *original* base
        (``minilora/hf/conversion.py``). Unlike PEFT, the initial directory is left as it is.
    Returns the directory.
    """
    arch = architecture_of(model, "save_adapter")
    configs = model.__dict__.get("peft_config") or {}
    if not configs or not list(named_lora_layers(model)):
        raise TargetModuleError("save_adapter: the model has no adapter (apply_lora or "
                                "load_adapter first)")
    if base_model_name_or_path is not None and not isinstance(base_model_name_or_path, str):
        raise ConfigError(f"save_adapter: base_model_name_or_path must be a string, got "
                          f"{type(base_model_name_or_path).__name__}")
    names = list(configs) if selected_adapters is None else selected_adapters
    unknown = [n for n in names if n not in configs] if isinstance(names, (list, tuple)) \
        else [names]
    if unknown:
        raise ConfigError(f"save_adapter: selected_adapters {unknown} are not adapters of the "
                          f"model (its adapters: {list(configs)})")
    initial = None if path_initial_model_for_weight_conversion is None else \
        conversion.read_initial(path_initial_model_for_weight_conversion, ADAPTER_WEIGHTS)
    written = {name: _adapter_files(model, name, configs[name], arch, base_model_name_or_path,
                                    initial)
               for name in names}  # every file's bytes first: an error writes nothing
    root = Path(path)
    for name, content in written.items():
        files.write_files(root if name == DEFAULT else root / name, content)
    return files.write_files(root, {})


def _adapter_files(model: Module, name: str, config: LoRAConfig, arch,
                   base_model_name_or_path: str | None, initial=None) -> dict[str, bytes | str]:
    """The two files of one adapter, as PEFT writes them (converted to rank 2r for the
    original base with ``initial``, the initial adapter's file and tensors)."""
    state, patterns = _file_state(model, name, config)
    tensors = {PREFIX + key: arch.to_file(key, array) for key, array in state.items()}
    d = peft_dict(dataclasses.replace(config, target_slices=None))
    pairs = arch.tied(model.config)
    tied = [n for n in (*pairs, *pairs.values()) if n in state]
    if tied:  # PEFT's tied form: both tensors, the input embedding in modules_to_save
        for key in (*pairs, *pairs.values()):
            tensors[PREFIX + key] = arch.to_file(key, state[tied[0]])
        d["ensure_weight_tying"] = True
    d["modules_to_save"] = _peft_modules_to_save(model, config, arch, bool(tied))
    layers = [n for n, layer in named_lora_layers(model) if name in layer.adapters]
    if config.target_modules == ALL_LINEAR:
        d["target_modules"] = layers  # PEFT writes "all-linear" out as the names it chose
    for field, values in patterns.items():  # the full forms' ranks and alphas, matched first
        d[field] = {**values, **{k: v for k, v in d[field].items() if k not in values}}
    linear = [n for n in layers if isinstance(model.get_submodule(n), LoRALinear)]
    d.update(task_type="CAUSAL_LM", base_model_name_or_path=base_model_name_or_path,
             inference_mode=True, fan_in_fan_out=any(arch.is_conv1d(n) for n in linear))
    if initial is not None:
        tensors, d = conversion.convert_to_lora(tensors, d, initial)
    return {ADAPTER_WEIGHTS: files.safetensors_bytes(tensors, "save_adapter"),
            ADAPTER_CONFIG: io.dumps_json(d) + "\n"}


def _file_state(model: Module, name: str, config: LoRAConfig) -> tuple[dict, dict]:
    """(PEFT's key -> array in minilora's layout, {"rank_pattern": ..., "alpha_pattern": ...}
    for the layers whose adapter is on slices, written as its full form of rank k r)."""
    layers = dict(named_lora_layers(model))
    state: dict[str, np.ndarray] = {}
    patterns: dict[str, dict] = {"rank_pattern": {}, "alpha_pattern": {}}
    for layer_name, layer in layers.items():
        if name not in layer.adapters:
            continue
        adapter = layer.adapters[name]
        arrays = [p.data.copy() for p in layer.adapter_parameters(name)]
        for kind, array in zip(adapter.PARAMETERS, adapter.full_form(*arrays, layer.out_features),
                               strict=True):
            state[layer_name + _PEFT_KEY[kind]] = array
        if isinstance(adapter, SlicedAdapter):  # s = alpha / r kept: alpha' / (k r) = alpha / r
            k, key = len(adapter.slices), re.escape(layer_name)
            patterns["rank_pattern"][key] = k * adapter.r
            patterns["alpha_pattern"][key] = adapter.lora_alpha * (k ** 0.5 if adapter.use_rslora
                                                                   else k)
    for param_name, p in extra_parameters(model, name, config).items():
        state[_file_key(param_name, set(layers))] = p.data.copy()
    return state, patterns


def _peft_modules_to_save(model: Module, config: LoRAConfig, arch, tied: bool) -> list[str] | None:
    """``modules_to_save`` as PEFT must read it to save what minilora saved: the tied embedding
    as PEFT writes it (``transformer.wte``), and full names where PEFT's plain-suffix rule would
    match other modules than minilora's dotted one."""
    entries = list(config.modules_to_save or ())
    if not entries:
        return None
    saved = [n for n, _ in model.named_modules() if n and any(matches_target(n, e)
                                                               for e in entries)]
    if tied:
        pairs = arch.tied(model.config)
        tied_modules = {k.rpartition(".")[0] for k in (*pairs, *pairs.values())}
        holders = [n for n in saved if any(t.startswith(n + ".") for t in tied_modules)]
        if holders:
            raise ConfigError(f"save_adapter: modules_to_save {holders} hold the tied "
                              f"{sorted(tied_modules)}, which PEFT keeps tied only when they are "
                              "named themselves; name them (and the rest) one by one")
        entries = [e for e in entries if not any(matches_target(t, e) for t in tied_modules)]
        saved = [n for n in saved if n not in tied_modules]
        entries.append(arch.INPUT_EMBEDDING)
        saved.append(arch.INPUT_EMBEDDING)
    if set(peft_saved_modules(model, entries)) != set(saved):
        entries = saved  # a full name matches itself alone under both rules
    return entries


# ---- reading -------------------------------------------------------------------------------

def load_adapter(model: Module, path, adapter_name: str = DEFAULT,
                 is_trainable: bool = False) -> Module:
    """Load the LoRA adapter in the directory ``path`` into ``model`` as ``adapter_name``, whether
    PEFT (``PeftModel.save_pretrained``) or [`save_adapter`][] wrote it. On a model without
    adapters it is applied and active (PEFT's ``from_pretrained``); beside others it is added,
    inactive, as PEFT's ``load_adapter`` adds it (``set_adapter`` activates it). A folder PEFT
    saved for another adapter is ``path/<its name>``.

    is_trainable: as PEFT's: False freezes the adapter (and, for the first adapter, every
        parameter, in eval mode: inference); True leaves it trainable, as ``apply_lora`` does.
    Another ``peft_type``, a PEFT feature minilora does not implement, missing or unexpected
    tensors, wrong shapes or dtypes, NaN or infinity: a FileFormatError naming the file and the
    field or key, raised before the model changes; on any error the model is as it was.
    Returns ``model``.
    """
    arch = architecture_of(model, "load_adapter")
    if not isinstance(is_trainable, bool):
        raise ConfigError(f"load_adapter: is_trainable must be True or False, got "
                          f"{is_trainable!r}")
    first = not (model.__dict__.get("peft_config") or {})
    if not first and adapter_name in model.peft_config:
        raise ConfigError(f"load_adapter: the model already has an adapter named "
                          f"{adapter_name!r} (its adapters: {list(model.peft_config)})")
    directory = files.directory_of(path, "adapter")
    config_path, weights_path = directory / ADAPTER_CONFIG, directory / ADAPTER_WEIGHTS
    config = _read_config(config_path, files.read_json(directory, ADAPTER_CONFIG,
                                                       "adapter config", {}), model)
    headers = files.tensor_headers(directory, ADAPTER_WEIGHTS, None, "adapter")
    _check_tie(weights_path, headers, arch, arch.tied(model.config))
    try:
        targets, saved = plan(model, config, adding=None if first else adapter_name)
    except MiniLoRAError as e:
        raise FileFormatError(f"{config_path}: the adapter does not fit the model: {e}") from None
    if not first and (config.bias != "none" or config.modules_to_save):
        raise FileFormatError(f"{config_path}: an adapter beside others may not train biases or "
                              "modules_to_save (minilora trains them in place, for one adapter)")
    wanted = _plan_keys(weights_path, headers, config, saved, arch, adapter_name)
    _check_lora_shapes(weights_path, wanted, config, targets, adapter_name)
    state = io.read_tensors(weights_path, {key: info for name, (key, info) in wanted.items()})
    state = {name: arch.from_file(name, state[key]) for name, (key, _) in wanted.items()}
    _collapse_tie(weights_path, state, saved, arch, arch.tied(model.config))
    _apply_and_load(model, config, state, [t.name for t in targets], weights_path, adapter_name,
                    first)
    if first and not is_trainable:  # as PEFT: frozen, and in eval mode (no dropout)
        model.requires_grad_(False)
        model.eval()
    elif is_trainable:  # as PEFT's load_adapter(is_trainable=True), even while inactive
        for _, layer in named_lora_layers(model):
            for p in layer.adapter_parameters(adapter_name) if adapter_name in layer.adapters \
                    else ():
                p.requires_grad_(True)
    return model


def _read_config(path: Path, d, model: Module) -> LoRAConfig:
    """The LoRAConfig of ``adapter_config.json``, with PEFT's meaning of modules_to_save."""
    try:
        config = lora_config_from_peft(d, weights_follow=True)
    except ConfigError as e:
        raise FileFormatError(f"{path}: {e}") from None
    for where, pattern in slow_patterns(config):
        raise FileFormatError(f"{path}: {where} {pattern[:60]!r} is refused: a pattern read from "
                              "a file may not repeat a group or hold many repetitions (it could "
                              "take exponential time to match)")
    if config.modules_to_save:
        peft_names = peft_saved_modules(model, config.modules_to_save)
        dotted = [n for n, _ in model.named_modules()
                  if n and any(matches_target(n, e) for e in config.modules_to_save)]
        if peft_names != dotted:  # PEFT's plain suffix matched other modules: take its names
            config = dataclasses.replace(config, modules_to_save=tuple(peft_names) or None)
    return config


def _plan_keys(path: Path, headers: dict, config: LoRAConfig, saved: list[str],
               arch, adapter_name: str = DEFAULT) -> dict[str, tuple[str, io.TensorInfo]]:
    """minilora's parameter name -> (the file's key, its info), for every tensor but PEFT's
    copies of saved biases; a key outside ``base_model.model.``, twice, or not a float: refused."""
    wanted: dict[str, tuple[str, io.TensorInfo]] = {}
    for key, (_, info) in headers.items():
        if not key.startswith(PREFIX):
            raise FileFormatError(f"{path}: unexpected tensor {key!r} (PEFT's keys start with "
                                  f"{PREFIX!r})")
        copy = _COPIES.fullmatch(key[len(PREFIX):])
        if copy and config.bias == "all" and copy["module"] in saved:
            continue
        name = _model_name(key[len(PREFIX):], adapter_name)
        if name in wanted:
            raise FileFormatError(f"{path}: tensors {wanted[name][0]!r} and {key!r} are both "
                                  f"{name!r}")
        files.check_float(path, key, info)
        wanted[name] = (key, info)
    return wanted


def _check_tie(path: Path, headers: dict, arch, pairs: dict[str, str]) -> None:
    """An adapter that trains one of a tied pair (GPT-2's lm_head, transformer.wte) without the
    other was untied in PEFT: refused, before anything else says how to tie it."""
    names = {_model_name(key.removeprefix(PREFIX)) for key in headers}
    for lm_head, embedding in pairs.items():
        present = [n for n in (lm_head, embedding) if n in names]
        if len(present) == 1:
            other = embedding if present[0] == lm_head else lm_head
            raise FileFormatError(
                f"{path}: the adapter trains {present[0]!r} but not {other!r}, which {arch.NAME} "
                "ties to it: PEFT had untied them (ensure_weight_tying=False, or modules_to_save "
                f"naming {arch.INPUT_EMBEDDING.rpartition('.')[2]}); minilora keeps the tie "
                "(PEFT: modules_to_save=['lm_head'], ensure_weight_tying=True)")


def _check_lora_shapes(path: Path, wanted: dict, config: LoRAConfig, targets: list,
                       adapter_name: str) -> None:
    """Every adapted layer's A (r, in) and B (out, r) in the file (an Embedding's
    lora_embedding_A (r, vocab) and lora_embedding_B (dim, r); DoRA's magnitude (out,)), with the
    config's rank: so that applying the config allocates only what the file holds."""
    for target in targets:
        name, layer = target.name, target.module
        r = config.rank_and_alpha(name)[0]
        if isinstance(layer, Embedding) or hasattr(layer, "num_embeddings"):
            kinds, in_f, out_f = ("lora_embedding_A", "lora_embedding_B"), layer.num_embeddings, \
                layer.embedding_dim
        else:
            kinds, in_f, out_f = ("lora_A", "lora_B"), layer.in_features, layer.out_features
        shapes = [(r, in_f), (out_f, r)]
        if config.use_dora:
            kinds, shapes = (*kinds, "lora_magnitude_vector"), [*shapes, (out_f,)]
        for kind, shape in zip(kinds, shapes, strict=True):
            entry = wanted.get(parameter_name(f"{name}.{kind}", adapter_name))
            if entry is None:
                raise FileFormatError(f"{path}: missing tensor {PREFIX}{name}{_PEFT_KEY[kind]} "
                                      "(the config adapts the layer)")
            if entry[1].shape != shape:
                raise FileFormatError(f"{path}: tensor {entry[0]!r} has shape {entry[1].shape}, "
                                      f"expected {shape} (r={r} from the config, in={in_f}, "
                                      f"out={out_f})")


def _collapse_tie(path: Path, state: dict, saved: list[str], arch, pairs: dict[str, str]) -> None:
    """Both tensors of a tie, which must be equal, become the one name minilora's adapter uses."""
    for lm_head, embedding in pairs.items():
        if lm_head in state and embedding in state:
            if not np.array_equal(state[lm_head], state[embedding]):
                raise FileFormatError(f"{path}: {lm_head!r} and {embedding!r} differ, but "
                                      f"{arch.NAME} ties them: an untied adapter, which minilora "
                                      "does not run")
            module = embedding.rpartition(".")[0]
            by_embedding = any(module == s or module.startswith(s + ".") for s in saved)
            del state[lm_head if by_embedding else embedding]


def _apply_and_load(model: Module, config: LoRAConfig, state: dict, targets: list[str],
                    path: Path, adapter_name: str, first: bool) -> None:
    """apply_lora (or add_adapter), then load_lora_state_dict (strict); on any error, the model
    as it was."""
    layers = {name: model.get_submodule(name) for name in targets}
    flags = [(p, p.requires_grad, p.grad) for p in model.parameters()]
    try:
        if first:
            apply_lora(model, config, rng=0, adapter_name=adapter_name)  # A drawn, then replaced
        else:
            add_adapter(model, adapter_name, config, rng=0)
        load_lora_state_dict(model, state, adapter_name)
    except MiniLoRAError as e:
        if first:
            for name, layer in layers.items():
                model.set_submodule(name, layer)
            for attr in ("lora_config", "peft_config", "active_adapters"):
                model.__dict__.pop(attr, None)
        elif adapter_name in (model.__dict__.get("peft_config") or {}):
            delete_adapter(model, adapter_name)
        for p, requires_grad, grad in flags:
            p.requires_grad_(requires_grad)
            p.grad = grad
        raise FileFormatError(f"{path}: {e}") from None
