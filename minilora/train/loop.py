"""The training loop used by the CLI, the demo and the examples.

One iteration ``it`` (0-based) is: set the learning rate from the cosine schedule, draw a batch,
forward, backward (over ``gradient_accumulation_steps`` micro-batches, their gradients added up),
check the numbers are finite, clip, AdamW step. Every ``eval_interval``
iterations and at the end, the mean train and validation loss over ``eval_iters`` batches is
appended to ``metrics.jsonl`` and a checkpoint is written (atomically), holding everything needed
to continue bit for bit: the weights that train, the optimizer state, the iteration, and the states
of the three random generators (batches, evaluation batches, dropout).
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from minilora import io
from minilora.data.instruct import IGNORE_INDEX
from minilora.errors import ConfigError, NonFiniteError
from minilora.lora.loraplus import create_loraplus_optimizer
from minilora.optim import AdamW, CosineSchedule, clip_grad_norm, grad_norm, param_groups
from minilora.runtime import step_threading
from minilora.train import architecture
from minilora.train.checkpoint import CHECKPOINT
from minilora.train.config import TrainConfig
from minilora.train.evaluate import estimate_loss
from minilora.train.rundir import RunDir


@dataclass
class TrainResult:
    """What a run did: final losses, speed, and every metrics record it wrote."""

    iters: int
    train_loss: float
    val_loss: float
    elapsed_s: float
    ms_per_step: float
    tokens_per_s: float
    skipped_steps: int = 0
    history: list[dict] = field(default_factory=list)


def _first_nonfinite(named_params) -> str | None:
    """The first parameter, in model order, whose gradient holds a NaN or an infinity."""
    for name, p in named_params:
        if p.grad is not None and not np.isfinite(p.grad).all():
            return name
    return None


def _nonfinite_values(model) -> str | None:
    """The first parameter, in model order, whose values hold a NaN or an infinity."""
    for name, p in model.named_parameters():
        if not np.isfinite(p.data).all():
            return name
    return None


def _culprit(model, named) -> str:
    """Which parameter a non-finite loss or gradient comes from, for the error message."""
    name = _nonfinite_values(model)
    if name is not None:
        return f"parameter {name} holds NaN or infinity"
    name = _first_nonfinite(named)
    if name is not None:
        return f"the first parameter affected is {name} (its gradient is not finite)"
    return "no parameter's gradient is affected"


def _last_good_checkpoint(run) -> str:
    return f"; the last good checkpoint is in {run.path}" if run is not None else ""


def train(model, data, config: TrainConfig, out_dir: str | Path | None = None, *,
          resume: bool = False, quiet: bool = False, run_info: dict | None = None,
          extra_eval: Callable[[object], dict] | None = None,
          on_eval: Callable[[dict], None] | None = None,
          threads: int | None = None, run_files: dict[str, bytes] | None = None) -> TrainResult:
    """Train ``model`` on ``data`` (a dataset with ``get_batch``) and return a [`TrainResult`][].

    out_dir: where ``metrics.jsonl`` and ``checkpoint.safetensors`` go (nothing is written if None).
    resume: continue from the checkpoint in ``out_dir``; the result is bit-identical to a run that
        was never interrupted.
    run_info: JSON-able facts saved in the checkpoint (tokenizer, LoRA config, base model, data).
    extra_eval: called with the model at each evaluation; its numbers join the metrics record.
    on_eval: called with each metrics record once it is saved (the CLI prints it).
    threads: how many threads the engine uses (default: all CPUs); see ``runtime.step_threading``.
    run_files: files (name -> bytes) a new run writes once into ``out_dir`` before its first
        checkpoint, atomically: a BPE tokenizer (see ``tokenizer_file.py``).
    """
    block = architecture.of_model(model).block_size(model.config, config.block_size)
    with step_threading(largest_product(model, config.batch_size * block), threads), \
            _checkpointing(model, config.activation_checkpointing):
        training = _Training(model, data, config, out_dir, resume, run_info, run_files)
        return training.run(quiet, extra_eval, on_eval)


def largest_product(model, tokens: int) -> int:
    """Multiply-adds of the largest product in a step over ``tokens`` tokens: every 2-D parameter
    (a linear layer's weight, the embedding that is also the output layer) meets every token."""
    return tokens * max((p.shape[0] * p.shape[1] for p in model.parameters() if p.ndim == 2),
                        default=0)


class _Training:
    """One run of the loop: what it trains with, and what it has done so far."""

    def __init__(self, model, data, config: TrainConfig, out_dir, resume: bool,
                 run_info: dict | None, run_files: dict[str, bytes] | None = None):
        self.block_size = architecture.of_model(model).block_size(model.config,
                                                                  config.block_size)
        data.check_block_size(self.block_size)
        if resume and out_dir is None:
            raise ConfigError("train: resume=True needs out_dir, the run directory to continue")
        if resume and not (Path(out_dir) / CHECKPOINT).is_file():  # before making the dir
            raise ConfigError(f"--resume: {out_dir} holds no checkpoint to resume from")
        self.model, self.data, self.config, self.resume = model, data, config, resume
        self.named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.trainable = [p for _, p in self.named]
        if config.loraplus_lr_ratio is None:
            self.optimizer = AdamW(param_groups(self.named, config.weight_decay), lr=config.lr,
                                   betas=(config.beta1, config.beta2))
        else:  # LoRA+: PEFT's groups, B at lr * ratio; the schedule keeps the ratios
            self.optimizer = create_loraplus_optimizer(
                model, AdamW, lr=config.lr, loraplus_lr_ratio=config.loraplus_lr_ratio,
                loraplus_weight_decay=config.weight_decay, betas=(config.beta1, config.beta2))
        self.schedule = CosineSchedule(config.lr, config.min_lr, config.warmup_iters,
                                       config.decay_iters)
        self.batch_rng = np.random.default_rng(config.seed)
        self.eval_rng = np.random.default_rng([config.seed, 1])  # never shifts training batches
        self.run_info = {**(run_info or {}), "train_config": config.to_dict()}
        self.run_dir = RunDir(out_dir) if out_dir is not None else None
        self.run_files = run_files or {}
        self.start, self.elapsed, self.history, self.skipped = 0, 0.0, [], 0
        self.step_times: list[float] = []
        self.tokens_done = 0  # the tokens the steps of this session read
        self.last = {"train": math.nan, "val": math.nan}
        self.since_eval = [0, 0.0]  # tokens and seconds of training since the last evaluation

    @property
    def rngs(self) -> tuple:
        return self.batch_rng, self.eval_rng, self.model.rng

    def run(self, quiet: bool, extra_eval, on_eval) -> TrainResult:
        config = self.config
        try:
            self._open()
            show = not quiet and sys.stderr.isatty()
            bar = tqdm(total=config.max_iters, initial=self.start, disable=not show, unit="it",
                       leave=False)
            self.model.train()
            for it in range(self.start, config.max_iters + 1):
                due = it % config.eval_interval == 0 or it == config.max_iters
                if due and not (self.resume and it == self.start):
                    self._evaluate(it, extra_eval, on_eval)
                if it == config.max_iters:
                    break
                loss, dt, tokens = self._step(it)
                bar.update(1)
                if show:
                    bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens / dt:,.0f}")
            bar.close()
        finally:
            if self.run_dir is not None:
                self.run_dir.unlock()
        return self._result()

    def _open(self) -> None:
        """Lock the run directory and start afresh, or restore where the checkpoint stopped."""
        if self.run_dir is not None:
            self.run_dir.lock()
            if self.resume:
                self.start, self.elapsed = self.run_dir.restore(self.model, self.optimizer,
                                                            self.rngs, self.config)
                meta = self.run_dir.restored.meta
                self.skipped = meta.get("skipped_steps", 0)
                self.history = self.run_dir.metrics_until(self.start, meta.get("last_eval"))
            else:
                self.run_dir.start_fresh()
                for name, data in self.run_files.items():
                    io.write_atomic_bytes(self.run_dir.path / name, data)
        if not self.resume:  # dropout masks follow the run's seed, not the model's history
            fresh = np.random.default_rng([self.config.seed, 2])
            self.model.rng.bit_generator.state = fresh.bit_generator.state
        if self.history:
            self.last = {"train": self.history[-1]["train_loss"],
                         "val": self.history[-1]["val_loss"]}

    def _evaluate(self, it: int, extra_eval, on_eval) -> None:
        """Measure both losses, append the metrics record, write the checkpoint."""
        config = self.config
        last = estimate_loss(self.model, self.data, config.batch_size, config.eval_iters,
                             self.eval_rng, self.block_size)
        if not (math.isfinite(last["train"]) and math.isfinite(last["val"])):
            raise NonFiniteError(
                f"training stopped at iteration {it}: the evaluation loss is "
                f"{last['train']} (train), {last['val']} (val); "
                f"{_culprit(self.model, self.named)}{_last_good_checkpoint(self.run_dir)}")
        tokens, seconds = self.since_eval
        record = {"iter": it, "train_loss": last["train"], "val_loss": last["val"],
                  "lr": self.schedule(min(it, config.max_iters)),
                  "elapsed_s": round(self.elapsed, 4),
                  "tokens_per_s": round(tokens / seconds, 2) if seconds else None}
        if extra_eval is not None:
            record.update(extra_eval(self.model))
        self.last = last
        self.history.append(record)
        self.since_eval = [0, 0.0]
        if self.run_dir is not None:
            self.run_dir.append_metrics(record)
            self.run_dir.save(self.model, self.optimizer, self.rngs, it, self.elapsed,
                              self.run_info, record, self.skipped)
        if on_eval is not None:
            on_eval(record)

    def _step(self, it: int) -> tuple[float, float, int]:
        """One optimizer step (or a skipped one): (its loss, its seconds, the tokens it read)."""
        config, model = self.config, self.model
        t0 = time.perf_counter()
        self.optimizer.set_lr(self.schedule(it))
        loss_value, finite_loss, tokens = 0.0, True, 0
        for (x, y), weight in self._micro_batches():
            tokens += x.size  # padded instruction batches are shorter than block_size
            _, loss = model(x, y, skip_logits=True)
            value = loss.item()
            if not math.isfinite(value):
                loss_value, finite_loss = value, False
                if config.on_nonfinite == "raise":
                    loss.backward()  # only to find the parameter it reaches
                break
            loss_value += weight * value
            loss.backward(weight)  # each backward adds to the gradients
            del loss
        norm = math.nan
        if finite_loss:
            norm = clip_grad_norm(self.trainable, config.grad_clip) if config.grad_clip > 0 \
                else grad_norm(self.trainable)
        if math.isfinite(norm):
            self.optimizer.step()
        elif config.on_nonfinite == "skip":
            self.skipped += 1
        else:
            what = "the gradient norm is not finite" if finite_loss \
                else f"the loss is {loss_value}"
            raise NonFiniteError(f"training stopped at iteration {it}: {what}; "
                                 f"{_culprit(model, self.named)}"
                                 f"{_last_good_checkpoint(self.run_dir)} "
                                 "(on_nonfinite='skip', --skip-nonfinite on the command line, "
                                 "skips such steps instead)")
        self.optimizer.zero_grad()
        dt = time.perf_counter() - t0
        self.step_times.append(dt)
        self.elapsed += dt
        self.since_eval[0] += tokens
        self.since_eval[1] += dt
        self.tokens_done += tokens
        return loss_value, dt, tokens

    def _micro_batches(self) -> list[tuple[tuple[np.ndarray, np.ndarray], float]]:
        """The step's ``gradient_accumulation_steps`` batches, each with its weight in the step's
        loss: its share of the counted (not ignored) targets. So the weighted sum of the
        micro-batches' mean losses is the mean over all their targets, the loss of the one batch
        they make up, also when masks count a different number in each; one batch weighs 1."""
        config = self.config
        batches = [self.data.get_batch("train", config.batch_size, self.block_size, self.batch_rng)
                   for _ in range(config.gradient_accumulation_steps)]
        counted = [int(np.count_nonzero(y != IGNORE_INDEX)) for _, y in batches]
        total = sum(counted)
        if len(batches) == 1 or total == 0:  # nothing counted: the loss says so (NaN)
            return [(b, 1.0 / len(batches)) for b in batches]
        return [(b, n / total) for b, n in zip(batches, counted, strict=True) if n]

    def _result(self) -> TrainResult:
        ms = 1000 * float(np.median(self.step_times)) if self.step_times else math.nan
        per_step = self.tokens_done / len(self.step_times) if self.step_times else math.nan
        return TrainResult(iters=self.config.max_iters, train_loss=self.last["train"],
                           val_loss=self.last["val"], elapsed_s=self.elapsed, ms_per_step=ms,
                           tokens_per_s=per_step / (ms / 1000), skipped_steps=self.skipped,
                           history=self.history)


@contextlib.contextmanager
def _checkpointing(model, enabled: bool):
    """The run with the model's activation checkpointing on, if ``enabled``; as it was after."""
    if not enabled:
        yield
        return
    if not hasattr(model, "gradient_checkpointing_enable"):
        raise ConfigError(f"TrainConfig.activation_checkpointing: {type(model).__name__} has no "
                          "gradient_checkpointing_enable(); train it without")
    was = model.gradient_checkpointing
    model.gradient_checkpointing_enable()
    try:
        yield
    finally:
        model.gradient_checkpointing = was
