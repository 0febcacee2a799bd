"""Run directories and checkpoints: one safetensors file holds everything, written atomically.

``DIR/checkpoint.safetensors`` holds the weights that the run trains (all of them for a full run,
only the adapter for a LoRA run: ``model.<name>``), the optimizer state (``optim.<name>.<slot>``),
and, as JSON in the metadata, the iteration, the random generators' states, the configs, the
tokenizer and, for a LoRA run, a reference to its base: the base's directory and a SHA-256
fingerprint of its weights, so an adapter is never loaded onto the wrong base.

Reading trusts nothing: the file's checksum, then every JSON fact (its type, then its meaning:
configs are rebuilt, generator states restored into fresh generators, the tokenizer checked against
the model), then every tensor's name, shape, dtype and finiteness against the model it is for. Only
then does anything change, so a damaged or hostile file is a FileFormatError naming the file and the
fault, and a refused file leaves the model, optimizer and generators as they were.

Crash safety comes from the order of writes in the training loop (the metrics record of an
evaluation is appended before the checkpoint holding it is renamed into place) and from the lock:
see ``RunDir`` and docs/reliability.md.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from minilora import io
from minilora.data import Tokenizer
from minilora.errors import ConfigError, FileFormatError, MiniLoRAError
from minilora.lora import (
    LoRAConfig,
    lora_state_dict,
    matches_target,
)
from minilora.lora.config import ALL_LINEAR, MAX_PATTERN_REPEATS, slow_patterns
from minilora.models import GPTConfig, LlamaConfig
from minilora.nn import Module, Parameter
from minilora.optim import SGD, AdamW
from minilora.train import architecture
from minilora.train.config import TrainConfig
from minilora.train.tokenizer_file import read_tokenizer

CHECKPOINT = "checkpoint.safetensors"
METRICS = "metrics.jsonl"
FORMAT = "minilora.run/1"

# The JSON facts a checkpoint may hold, and their types (see io.check_schema; "?" = optional).
# Written by write_checkpoint from the loop (RunDir.save), `minilora merge` and the demo.
_META_SCHEMA = {
    "format": str, "kind": str, "model_config": dict,
    "lora_config?": dict, "base?": {"path": str, "sha256": str},
    "train_config?": dict, "optimizer?": dict, "tokenizer?": (dict, type(None)),
    "iter?": int, "elapsed_s?": float, "skipped_steps?": int, "rng?": [dict],
    "last_eval?": {"iter": int, "train_loss": float, "val_loss": float, "lr": float,
                   "elapsed_s": float, "tokens_per_s": (float, type(None))},
    "data?": {"source": str, "seed": int},
    "init_from?": str, "merged_from?": str,
}
_RUN_FACTS = ("train_config", "optimizer", "iter", "elapsed_s", "rng")  # what resume needs


def model_fingerprint(model) -> str:
    """SHA-256 over every parameter's name, shape, dtype and bytes: which base an adapter needs."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(json.dumps([name, list(p.shape), p.dtype.str]).encode())
        h.update(np.ascontiguousarray(p.data).tobytes())
    return h.hexdigest()


def is_lora(model) -> bool:
    return "lora_config" in model.__dict__


def _trained_weights(model) -> dict[str, np.ndarray]:
    return lora_state_dict(model) if is_lora(model) else model.state_dict()


def write_checkpoint(path: str | Path, model, info: dict, optimizer=None) -> None:
    """Save ``model``'s trained weights, ``optimizer``'s state (if any) and ``info``, atomically.
    A LoRA run's checkpoint holds its one adapter, the default (save others with save_adapter)."""
    if is_lora(model) and model.__dict__.get("active_adapters", ["default"]) != ["default"]:
        raise ConfigError(f"write_checkpoint: a run's checkpoint holds the default adapter; the "
                          f"active adapters are {model.active_adapters} (set_adapter(model, "
                          "'default'), or save_adapter for the others)")
    tensors = {f"model.{k}": v for k, v in _trained_weights(model).items()}
    meta = {"format": FORMAT, "kind": "lora" if is_lora(model) else "full",
            "model_config": model.config.to_dict(), **info}
    if is_lora(model):
        meta["lora_config"] = model.lora_config.to_dict()
    if optimizer is not None:
        state = optimizer.state_dict()
        tensors.update({f"optim.{k}": v for k, v in state["arrays"].items()})
        meta["optimizer"] = state["meta"]
    io.save_tensors(path, tensors, {"minilora": io.dumps_json(meta, indent=None)})


@dataclass
class Checkpoint:
    """What a checkpoint file holds, checked: weights, optimizer arrays, the JSON facts, and the
    configs rebuilt from them (``lora_config`` and ``train_config`` are None where absent)."""

    path: Path
    weights: dict[str, np.ndarray]
    optim_arrays: dict[str, np.ndarray]
    meta: dict
    model_config: GPTConfig | LlamaConfig | None = None
    lora_config: LoRAConfig | None = None
    train_config: TrainConfig | None = None
    tokenizer: Tokenizer | None = None


def _config(cls, d, path: Path, what: str):
    try:
        return cls.from_dict(d)
    except (ConfigError, TypeError) as e:
        raise FileFormatError(f"{path}: bad {what}: {e}") from None


def _check_patterns(path: Path, config: LoRAConfig) -> None:
    for where, pattern in slow_patterns(config):
        raise FileFormatError(f"{path}: lora_config {where} {pattern[:60]!r} is refused: a "
                              "pattern read from a file may not repeat a group or hold more "
                              f"than {MAX_PATTERN_REPEATS} repetitions (it could take "
                              "exponential time to match)")


def _check_meta(path: Path, meta) -> tuple[GPTConfig | LlamaConfig, LoRAConfig | None,
                                           TrainConfig | None, Tokenizer | None]:
    """Every JSON fact, by type and by meaning; returns the configs and the tokenizer they
    describe (a BPE tokenizer is read from the file beside the checkpoint)."""
    try:
        io.check_schema(meta, _META_SCHEMA, "metadata")
    except ConfigError as e:
        raise FileFormatError(f"{path}: {e}") from None
    if meta["format"] != FORMAT:
        raise FileFormatError(f"{path}: not a minilora checkpoint: format {meta['format']!r}, "
                              f"expected {FORMAT!r}")
    if meta["kind"] not in ("full", "lora"):
        raise FileFormatError(f"{path}: kind must be 'full' or 'lora', got {meta['kind']!r}")
    try:  # a GPTConfig, or a LlamaConfig (its model_type says so)
        family = architecture.of_config_dict(meta["model_config"])
    except ConfigError as e:
        raise FileFormatError(f"{path}: bad model_config: {e}") from None
    model_config = _config(family.config_class, meta["model_config"], path, "model_config")
    lora_config = None
    if meta["kind"] == "lora":
        if "base" not in meta or "lora_config" not in meta:
            raise FileFormatError(f"{path}: a LoRA checkpoint needs 'base' (the reference to its "
                                  "base model) and 'lora_config'")
        lora_config = _config(LoRAConfig, meta["lora_config"], path, "lora_config")
        _check_patterns(path, lora_config)
    train_config = None
    if "train_config" in meta:
        train_config = _config(TrainConfig, meta["train_config"], path, "train_config")
    tokenizer = read_tokenizer(meta.get("tokenizer"), path.parent, path)
    if tokenizer is not None:
        vocab = tokenizer.vocab_size
        if vocab > model_config.vocab_size:  # fewer is fine: a vocabulary padded past it
            raise FileFormatError(f"{path}: the tokenizer has {vocab} tokens, more than the "
                                  f"model's vocabulary of {model_config.vocab_size}")
    for key in ("iter", "skipped_steps", "elapsed_s"):
        value = meta.get(key, 0)
        if not (math.isfinite(value) and value >= 0):
            raise FileFormatError(f"{path}: {key} must be >= 0, got {value!r}")
    if train_config is not None and meta.get("iter", 0) > train_config.max_iters:
        raise FileFormatError(f"{path}: iter {meta['iter']} is past max_iters "
                              f"{train_config.max_iters}")
    for i, state in enumerate(meta.get("rng", [])):
        io.restore_generator(state, f"{path}: rng[{i}]")  # a FileFormatError if damaged
    present = [k for k in _RUN_FACTS if k in meta]
    if present and len(present) != len(_RUN_FACTS):
        missing = [k for k in _RUN_FACTS if k not in meta]
        raise FileFormatError(f"{path}: holds {present} but not {missing}: a training checkpoint "
                              "needs all of them")
    return model_config, lora_config, train_config, tokenizer


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Read and check a checkpoint file (or the one in a run directory).

    Anything wrong (the bytes, the JSON facts, a tensor's name, shape, dtype or values, the
    optimizer state) is a FileFormatError naming the file and the fault.
    """
    return _read(path)[0]


def _read(path: str | Path) -> tuple[Checkpoint, Module | None]:
    """The checked checkpoint and, for a full model, a model of its architecture that the weights
    were checked against (not loaded into it yet). An adapter is checked against its base by
    [`minilora.train.load_run`][] and against the model it resumes by [`RunDir.restore`][]."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT
    elif path.is_file() and path.suffix != ".safetensors":  # not the file internals of a text
        raise FileFormatError(f"{path}: a file, not a run directory (a minilora run directory "
                              f"holds {CHECKPOINT})")
    if not path.exists():
        raise FileFormatError(f"{path}: no checkpoint here (is this a minilora run directory?)")
    tensors = io.load_tensors(path)
    metadata = io.load_metadata(path)
    if set(metadata) != {"minilora"}:
        raise FileFormatError(f"{path}: not a minilora checkpoint: metadata keys "
                              f"{sorted(metadata)[:5]}, expected ['minilora']")
    try:
        meta = io.strict_loads(metadata["minilora"])
    except RecursionError:
        raise FileFormatError(f"{path}: metadata JSON nested too deeply") from None
    except ValueError as e:
        raise FileFormatError(f"{path}: metadata is not valid JSON: {e}") from None
    model_config, lora_config, train_config, tokenizer = _check_meta(path, meta)
    weights = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
    optim = {k[6:]: v for k, v in tensors.items() if k.startswith("optim.")}
    if len(weights) + len(optim) != len(tensors):
        odd = sorted(k for k in tensors if not k.startswith(("model.", "optim.")))
        raise FileFormatError(f"{path}: unexpected tensors {odd[:5]}")
    if optim and "optimizer" not in meta:
        raise FileFormatError(f"{path}: optimizer arrays without the optimizer's state")
    dtype = np.dtype(model_config.dtype)
    for prefix, arrays in (("model.", weights), ("optim.", optim)):
        for name, a in arrays.items():
            if a.dtype != dtype:
                raise FileFormatError(f"{path}: tensor {prefix + name!r} has dtype {a.dtype}, "
                                      f"the model is {dtype}")
            if not np.isfinite(a).all():
                raise FileFormatError(f"{path}: tensor {prefix + name!r} holds NaN or infinity")
    model = None
    if lora_config is None:
        _check_size(path, model_config, weights)  # before a model of that size is built
        model = architecture.of_config(model_config).model_class(model_config, seed=0)
        check_weights(path, weights, model)
    else:
        _check_adapter(path, lora_config, weights)
    if "optimizer" in meta:
        _check_optimizer(path, meta["optimizer"], weights, optim)
    return Checkpoint(path, weights, optim, meta, model_config, lora_config, train_config,
                      tokenizer), model


def size_mismatch(config, weights: dict) -> str | None:
    """Where the sizes in ``config`` disagree with the arrays ``weights`` (by parameter name), or
    None: see each architecture's ``size_mismatch``."""
    return architecture.of_config(config).size_mismatch(config, weights)


def _check_size(path: Path, config, weights: dict) -> None:
    """Pin every size in model_config to the file's own tensors: a hostile config must not make
    the loader allocate more than the file holds (n_embd = 2**40 would)."""
    problem = size_mismatch(config, weights)
    if problem is not None:
        raise FileFormatError(f"{path}: {problem}")


def _check_adapter(path: Path, config: LoRAConfig, weights: dict) -> None:
    """What an adapter must say without its base: its layers are the ones lora_config targets, and
    each has a 2-D lora_A (r, in) and lora_B (out, r) (an Embedding's lora_embedding_A and _B),
    with the rank lora_config gives it (k r on k slices of a fused output)."""
    layers = sorted({n.rpartition(".")[0] for n in weights if n.endswith(_KINDS)})
    targets = config.target_modules
    if targets == ALL_LINEAR:  # which layers are Linear only the base can say; it is checked then
        odd, unused = [], []
    elif isinstance(targets, str):
        odd = [n for n in layers if not re.fullmatch(targets, n)]
        unused = []
    else:
        odd = [n for n in layers if not any(matches_target(n, t) for t in targets)]
        unused = [t for t in targets if not any(matches_target(n, t) for n in layers)]
    if not layers or odd or unused:
        raise FileFormatError(f"{path}: the adapter's layers {layers[:4]} do not match "
                              f"lora_config.target_modules {targets!r}")
    for name in weights:
        layer, _, kind = name.rpartition(".")
        if "." + kind not in _KINDS:
            continue
        prefix = "lora_embedding_" if kind.startswith("lora_embedding_") else "lora_"
        a, b = weights.get(f"{layer}.{prefix}A"), weights.get(f"{layer}.{prefix}B")
        if a is None or b is None or a.ndim != 2 or b.ndim != 2:
            held = [None if x is None else x.shape for x in (a, b)]
            raise FileFormatError(f"{path}: layer {layer!r} needs a 2-D {prefix}A and {prefix}B, "
                                  f"the file holds {held}")
        r = config.rank_and_alpha(layer)[0]
        slices = len(config.slices_for(layer) or ()) or 1
        if a.shape[0] != slices * r or b.shape[1] != r:
            raise FileFormatError(f"{path}: layer {layer!r} has {prefix}A {a.shape} and {prefix}B "
                                  f"{b.shape}; lora_config says rank {r}"
                                  + (f" on {slices} slices" if slices > 1 else ""))


_KINDS = (".lora_A", ".lora_B", ".lora_embedding_A", ".lora_embedding_B")
_OPTIMIZERS = {"AdamW": AdamW, "SGD": SGD}
_OPTIM_SCHEMA = {"type": str, "param_groups": [{"params": [str]}]}


def _check_optimizer(path: Path, meta, weights: dict, arrays: dict) -> None:
    """Load the optimizer state into a stand-in optimizer over the checkpoint's own weights: the
    checks a resumed run will make, made now, so a damaged state is refused by every reader."""
    try:
        io.check_schema(meta, _OPTIM_SCHEMA, "metadata.optimizer")
    except ConfigError as e:
        raise FileFormatError(f"{path}: {e}") from None
    cls = _OPTIMIZERS.get(meta["type"])
    if cls is None:
        raise FileFormatError(f"{path}: optimizer type must be one of {sorted(_OPTIMIZERS)}, got "
                              f"{meta['type']!r}")
    groups = []
    for group in meta["param_groups"]:
        unknown = [n for n in group["params"] if n not in weights]
        if unknown:
            raise FileFormatError(f"{path}: optimizer state for parameters the checkpoint does not "
                                  f"hold: {unknown[:5]}")
        groups.append({"params": [(n, Parameter(weights[n])) for n in group["params"]]})
    try:
        stand_in = cls(groups, lr=1.0)
        stand_in.load_state_dict({"meta": meta, "arrays": arrays})
    except (MiniLoRAError, KeyError, ValueError, TypeError, IndexError) as e:
        raise FileFormatError(f"{path}: optimizer state: {e}") from None


def check_weights(path: Path, weights: dict, model) -> None:
    """The weights must be exactly the names, shapes and dtypes ``model`` trains."""
    trained = lora_state_dict(model) if is_lora(model) else dict(model.named_parameters())
    io.check_tensors(path, {f"model.{k}": v for k, v in weights.items()},
                     {f"model.{k}": (v.shape, v.dtype) for k, v in trained.items()})


def read_model(path: str | Path) -> tuple[Checkpoint, Module | None]:
    """The checked checkpoint and, for a full model, the model holding its weights."""
    ckpt, model = _read(path)
    if model is not None:
        model.load_state_dict(ckpt.weights)  # checked by _read: cannot fail
    return ckpt, model
