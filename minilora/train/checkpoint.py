"""Run directories and checkpoints: one safetensors file holds everything, written atomically.

``DIR/checkpoint.safetensors`` holds the weights that the run trains (all of them for a full run,
only the adapter for a LoRA run: ``model.<name>``), the optimizer state (``optim.<name>.<slot>``),
and, as JSON in the metadata, the iteration, the random generators' states, the configs, the
tokenizer and, for a LoRA run, a reference to its base: the base's directory and a SHA-256
fingerprint of its weights, so an adapter is never loaded onto the wrong base.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from minilora import io
from minilora.errors import ConfigError, FileFormatError
from minilora.lora import LoRAConfig, apply_lora, load_lora_state_dict, lora_state_dict
from minilora.models import GPT, GPTConfig

CHECKPOINT = "checkpoint.safetensors"
METRICS = "metrics.jsonl"
FORMAT = "minilora.run/1"


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
    """Save ``model``'s trained weights, ``optimizer``'s state (if any) and ``info``, atomically."""
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
    """What a checkpoint file holds: weights, optimizer arrays, and the JSON facts."""

    path: Path
    weights: dict[str, np.ndarray]
    optim_arrays: dict[str, np.ndarray]
    meta: dict


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Read and check a checkpoint file; anything wrong is a FileFormatError naming the file."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT
    if not path.exists():
        raise FileFormatError(f"{path}: no checkpoint here (is this a minilora run directory?)")
    metadata = io.load_metadata(path)
    try:
        meta = json.loads(metadata.get("minilora", ""))
    except ValueError:
        meta = None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise FileFormatError(f"{path}: not a minilora checkpoint (format {FORMAT!r} missing)")
    if meta.get("kind") not in ("full", "lora") or not isinstance(meta.get("model_config"), dict):
        raise FileFormatError(f"{path}: checkpoint lacks a valid 'kind' or 'model_config'")
    tensors = io.load_tensors(path)
    weights = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
    optim = {k[6:]: v for k, v in tensors.items() if k.startswith("optim.")}
    if len(weights) + len(optim) != len(tensors):
        odd = sorted(k for k in tensors if not k.startswith(("model.", "optim.")))
        raise FileFormatError(f"{path}: unexpected tensors {odd[:5]}")
    return Checkpoint(path, weights, optim, meta)


@dataclass
class LoadedRun:
    """A model rebuilt from a run directory, with its tokenizer (as a dict) and facts."""

    model: GPT
    tokenizer: dict | None
    meta: dict
    base_dir: Path | None = None


def _config(cls, d, path: Path, what: str):
    try:
        return cls.from_dict(d)
    except (ConfigError, TypeError) as e:
        raise FileFormatError(f"{path}: bad {what}: {e}") from None


def load_run(run_dir: str | Path) -> LoadedRun:
    """The model a run directory holds: a full model, or its base with the adapter applied.

    A LoRA run's base is found where the checkpoint says (relative to the run directory if the
    path is relative) and must have the weights the adapter was trained on.
    """
    ckpt = read_checkpoint(run_dir)
    run_dir = ckpt.path.parent
    meta = ckpt.meta
    config = _config(GPTConfig, meta["model_config"], ckpt.path, "model_config")
    base_dir = None
    if meta["kind"] == "full":
        model = GPT(config, seed=0)
        _load(model.load_state_dict, ckpt.weights, ckpt.path)
    else:
        base = meta.get("base")
        if not isinstance(base, dict) or not isinstance(base.get("path"), str):
            raise FileFormatError(f"{ckpt.path}: LoRA checkpoint without a base reference")
        base_dir = (run_dir / base["path"]).resolve()
        if not (base_dir / CHECKPOINT).exists():
            raise FileFormatError(f"{ckpt.path}: the adapter's base model {base_dir} is missing")
        base_run = load_run(base_dir)
        model = base_run.model
        if base_run.meta["kind"] != "full" or model.config != config:
            raise FileFormatError(f"{ckpt.path}: the base in {base_dir} has a different "
                                  f"architecture than the adapter was made for")
        if model_fingerprint(model) != base.get("sha256"):
            raise FileFormatError(f"{ckpt.path}: the base in {base_dir} is not the model this "
                                  "adapter was trained on (weights fingerprint differs)")
        lora_config = _config(LoRAConfig, meta.get("lora_config"), ckpt.path, "lora_config")
        apply_lora(model, lora_config, rng=0)
        _load(lambda w: load_lora_state_dict(model, w), ckpt.weights, ckpt.path)
    model.eval()
    tokenizer = meta.get("tokenizer")
    return LoadedRun(model, tokenizer if isinstance(tokenizer, dict) else None, meta, base_dir)


def _load(loader, weights, path: Path) -> None:
    try:
        loader(weights)
    except (KeyError, ValueError) as e:  # the MiniLoRAError subclasses name the key and shapes
        raise FileFormatError(f"{path}: weights do not fit the model: {e}") from None


def _rng_state(rng: np.random.Generator) -> dict:
    return rng.bit_generator.state


def _set_rng_state(rng: np.random.Generator, state, path: Path) -> None:
    try:
        rng.bit_generator.state = state
    except (TypeError, ValueError, KeyError) as e:
        raise FileFormatError(f"{path}: bad random generator state: {e}") from None


class RunDir:
    """A training run's directory: its lock, ``metrics.jsonl`` and ``checkpoint.safetensors``."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.checkpoint_path = self.path / CHECKPOINT
        self.metrics_path = self.path / METRICS
        self._lock: io.RunLock | None = None

    def lock(self) -> None:
        """Become the one writer of this directory (made if missing)."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise FileFormatError(f"{self.path}: cannot create run directory: {e.strerror}") \
                from None
        self._lock = io.RunLock(self.path).acquire()
        io.remove_temp_files(self.path)  # left by a write that a crash interrupted

    def unlock(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def start_fresh(self) -> None:
        """Begin a new run here; refuse to overwrite a run that has a checkpoint."""
        if self.checkpoint_path.exists():
            raise ConfigError(f"{self.path} already holds a run ({CHECKPOINT}); continue it with "
                              "--resume or choose another --out")
        if self.metrics_path.exists():  # from a run that died before its first checkpoint
            os.remove(self.metrics_path)

    def append_metrics(self, record: dict) -> None:
        io.append_jsonl(self.metrics_path, record)

    def metrics_until(self, it: int) -> list[dict]:
        """Keep the metrics records up to iteration ``it`` (what a resumed run already wrote)."""
        records = io.read_jsonl(self.metrics_path) if self.metrics_path.exists() else []
        kept = [r for r in records if isinstance(r, dict) and isinstance(r.get("iter"), int)
                and r["iter"] <= it]
        io.write_atomic_text(self.metrics_path, "".join(io.dumps_json(r, indent=None) + "\n"
                                                        for r in kept))
        return kept

    def save(self, model, optimizer, rngs, it: int, elapsed: float, run_info: dict,
             record: dict) -> None:
        info = {**run_info, "iter": it, "elapsed_s": elapsed, "last_eval": record,
                "rng": [_rng_state(r) for r in rngs]}
        write_checkpoint(self.checkpoint_path, model, info, optimizer)

    def restore(self, model, optimizer, rngs, config) -> tuple[int, float]:
        """Load weights, optimizer state and generator states; return (iteration, elapsed s)."""
        if not self.checkpoint_path.exists():
            raise ConfigError(f"--resume: {self.path} holds no checkpoint to resume from")
        ckpt = read_checkpoint(self.checkpoint_path)
        meta = ckpt.meta
        saved_config = meta.get("train_config")
        if saved_config != config.to_dict():
            raise ConfigError(f"--resume: the checkpoint in {self.path} was made with other "
                              f"training settings ({saved_config}); resume with the same ones")
        if meta["model_config"] != model.config.to_dict() or meta["kind"] != (
                "lora" if is_lora(model) else "full"):
            raise ConfigError(f"--resume: the checkpoint in {self.path} is for another model")
        it, elapsed, rng_states = meta.get("iter"), meta.get("elapsed_s"), meta.get("rng")
        if not isinstance(it, int) or not isinstance(elapsed, (int, float)) \
                or not isinstance(rng_states, list) or len(rng_states) != len(rngs):
            raise FileFormatError(f"{self.checkpoint_path}: bad iteration or generator states")
        loader = (lambda w: load_lora_state_dict(model, w)) if is_lora(model) \
            else model.load_state_dict
        _load(loader, ckpt.weights, self.checkpoint_path)
        try:
            optimizer.load_state_dict({"meta": meta.get("optimizer"), "arrays": ckpt.optim_arrays})
        except (KeyError, ValueError) as e:
            raise FileFormatError(f"{self.checkpoint_path}: optimizer state: {e}") from None
        for rng, state in zip(rngs, rng_states, strict=False):
            _set_rng_state(rng, state, self.checkpoint_path)
        return it, float(elapsed)
