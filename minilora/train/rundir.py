"""A training run's directory: one writer, ``metrics.jsonl``, and resuming from its checkpoint."""

from __future__ import annotations

import os
from pathlib import Path

from minilora import io
from minilora.errors import ConfigError, FileFormatError, MiniLoRAError
from minilora.lora import load_lora_state_dict
from minilora.train.checkpoint import (
    CHECKPOINT,
    METRICS,
    Checkpoint,
    check_weights,
    is_lora,
    read_checkpoint,
    size_mismatch,
    write_checkpoint,
)


class RunDir:
    """A training run's directory: its lock, ``metrics.jsonl`` and ``checkpoint.safetensors``.

    The loop appends an evaluation's metrics record, then writes the checkpoint that holds that
    evaluation (atomically: a temporary file renamed into place). A crash between the two leaves a
    record newer than the checkpoint, which [`metrics_until`][] drops on resume; the resumed run
    writes it again, bit for bit the same.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.checkpoint_path = self.path / CHECKPOINT
        self.metrics_path = self.path / METRICS
        self.restored: Checkpoint | None = None  # what restore() loaded
        self._lock: io.RunLock | None = None

    def check_free(self) -> None:
        """A RunLockedError if another live process is using this directory (changes nothing)."""
        io.RunLock(self.path).check_free()

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

    def read_metrics(self) -> list[dict]:
        """The metrics records, checked: objects with an integer ``iter`` that increases and
        numeric ``train_loss`` and ``val_loss``. A torn last line (a crash mid-append) is dropped;
        anything else wrong is a FileFormatError naming the line."""
        records = io.read_jsonl(self.metrics_path) if self.metrics_path.exists() else []
        schema = {"iter": int, "train_loss": float, "val_loss": float}
        previous = -1
        for i, r in enumerate(records, 1):
            try:
                io.check_schema(r, schema, f"line {i}")
            except ConfigError as e:
                raise FileFormatError(f"{self.metrics_path}: {e}") from None
            if r["iter"] <= previous:
                raise FileFormatError(f"{self.metrics_path}: line {i}: iter {r['iter']} does not "
                                      f"follow iter {previous}")
            previous = r["iter"]
        return records

    def metrics_until(self, it: int, last_eval: dict | None = None) -> list[dict]:
        """Keep the metrics records up to iteration ``it`` (what the checkpoint being resumed had
        written) and drop the rest, rewriting the file atomically. If the record of ``it`` itself
        is missing, ``last_eval`` (the checkpoint's copy of it) takes its place."""
        kept = [r for r in self.read_metrics() if r["iter"] <= it]
        if (not kept or kept[-1]["iter"] != it) and isinstance(last_eval, dict) \
                and last_eval.get("iter") == it:
            kept.append(last_eval)
        io.write_atomic_text(self.metrics_path, "".join(io.dumps_json(r, indent=None) + "\n"
                                                        for r in kept))
        return kept

    def save(self, model, optimizer, rngs, it: int, elapsed: float, run_info: dict,
             record: dict, skipped: int = 0) -> None:
        info = {**run_info, "iter": it, "elapsed_s": elapsed, "last_eval": record,
                "skipped_steps": skipped, "rng": [io.generator_state(r) for r in rngs]}
        write_checkpoint(self.checkpoint_path, model, info, optimizer)

    def restore(self, model, optimizer, rngs, config) -> tuple[int, float]:
        """Load weights, optimizer state and generator states; return (iteration, elapsed s).

        Everything is checked before anything changes: a refused checkpoint leaves ``model``,
        ``optimizer`` and ``rngs`` as they were. The checkpoint is kept in ``self.restored``.
        """
        if not self.checkpoint_path.exists():
            raise ConfigError(f"--resume: {self.path} holds no checkpoint to resume from")
        ckpt = read_checkpoint(self.checkpoint_path)
        meta, path = ckpt.meta, ckpt.path
        if "train_config" not in meta:
            raise FileFormatError(f"{path}: not a training checkpoint (no train_config, "
                                  "optimizer state or iteration): nothing to resume")
        saved = ckpt.train_config
        if config not in (saved, saved.extended_to(config.max_iters)):
            raise FileFormatError(f"{path}: made with other training settings "
                                  f"({meta['train_config']}); resume with the same ones")
        if config.max_iters < meta["iter"]:
            raise ConfigError(f"--max-iters {config.max_iters}: the run in {self.path} is at "
                              f"iteration {meta['iter']} already")
        if meta["model_config"] != model.config.to_dict() or meta["kind"] != (
                "lora" if is_lora(model) else "full"):
            raise FileFormatError(f"{path}: a checkpoint of another model ({meta['kind']}, "
                                  f"{meta['model_config']}), not of the one resuming")
        # and model.config must be the model's own (a caller may have set it from this very
        # checkpoint, whose config an adapter's file cannot pin by itself)
        problem = size_mismatch(model.config, {n: p.data for n, p in model.named_parameters()})
        if problem is not None:
            raise FileFormatError(f"{path}: the model resuming is not the one its model_config "
                                  f"describes: {problem}")
        if is_lora(model) and ckpt.lora_config != model.lora_config:
            raise FileFormatError(f"{path}: holds another adapter ({meta['lora_config']}) than "
                                  "the one resuming")
        states = meta["rng"]
        if len(states) != len(rngs):
            raise FileFormatError(f"{path}: {len(states)} generator states, expected {len(rngs)}")
        fresh = [io.restore_generator(s, f"{path}: rng[{i}]") for i, s in enumerate(states)]
        for i, (rng, new) in enumerate(zip(rngs, fresh, strict=True)):
            if type(rng.bit_generator) is not type(new.bit_generator):
                raise FileFormatError(f"{path}: rng[{i}] is a {type(new.bit_generator).__name__} "
                                      f"state, the run uses {type(rng.bit_generator).__name__}")
        check_weights(path, ckpt.weights, model)
        try:  # checks everything before it changes anything
            optimizer.load_state_dict({"meta": meta["optimizer"], "arrays": ckpt.optim_arrays})
        except (MiniLoRAError, KeyError, ValueError, TypeError, IndexError) as e:
            raise FileFormatError(f"{path}: optimizer state: {e}") from None
        # all checked: now change the model and the generators (neither can fail any more)
        if is_lora(model):
            load_lora_state_dict(model, ckpt.weights)
        else:
            model.load_state_dict(ckpt.weights)
        for rng, new in zip(rngs, fresh, strict=True):
            rng.bit_generator.state = new.bit_generator.state
        self.restored = ckpt
        return meta["iter"], float(meta["elapsed_s"])
