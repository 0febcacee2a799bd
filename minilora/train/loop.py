"""The training loop used by the CLI, the demo and the examples.

One iteration ``it`` (0-based) is: set the learning rate from the cosine schedule, draw a batch,
forward, backward, check the numbers are finite, clip, AdamW step. Every ``eval_interval``
iterations and at the end, the mean train and validation loss over ``eval_iters`` batches is
appended to ``metrics.jsonl`` and a checkpoint is written (atomically), holding everything needed
to continue bit for bit: the weights that train, the optimizer state, the iteration, and the states
of the three random generators (batches, evaluation batches, dropout).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from minilora.errors import ConfigError, NonFiniteError
from minilora.optim import AdamW, CosineSchedule, clip_grad_norm, param_groups
from minilora.runtime import parallel_for
from minilora.tensor import no_grad
from minilora.train.checkpoint import CHECKPOINT
from minilora.train.config import TrainConfig
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


@no_grad()
def estimate_loss(model, data, batch_size: int, eval_iters: int, rng: np.random.Generator) -> dict:
    """Mean loss over ``eval_iters`` random batches of each split, in eval mode (no dropout)."""
    was_training = model.training
    model.eval()
    try:
        out = {}
        for split in ("train", "val"):
            losses = []
            for _ in range(eval_iters):
                x, y = data.get_batch(split, batch_size, model.config.block_size, rng)
                losses.append(model(x, y)[1].item())
            out[split] = float(np.mean(losses))
        return out
    finally:
        model.train(was_training)


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


def _kept(run) -> str:
    return f"; the last good checkpoint is in {run.path}" if run is not None else ""


def _grad_norm(params) -> float:
    return math.sqrt(sum(float(np.vdot(p.grad, p.grad)) for p in params if p.grad is not None))


def train(model, data, config: TrainConfig, out_dir: str | Path | None = None, *,
          resume: bool = False, quiet: bool = False, run_info: dict | None = None,
          extra_eval: Callable[[object], dict] | None = None,
          on_eval: Callable[[dict], None] | None = None,
          threads: int | None = None) -> TrainResult:
    """Train ``model`` on ``data`` (a dataset with ``get_batch``) and return a :class:`TrainResult`.

    out_dir: where ``metrics.jsonl`` and ``checkpoint.safetensors`` go (nothing is written if None).
    resume: continue from the checkpoint in ``out_dir``; the result is bit-identical to a run that
        was never interrupted.
    run_info: JSON-able facts saved in the checkpoint (tokenizer, LoRA config, base model, data).
    extra_eval: called with the model at each evaluation; its numbers join the metrics record.
    on_eval: called with each metrics record once it is saved (the CLI prints it).
    threads: how many threads the engine uses (default: all CPUs); see ``runtime.parallel_for``.
    """
    with parallel_for(largest_product(model, config.batch_size * model.config.block_size), threads):
        return _train(model, data, config, out_dir, resume, quiet, run_info, extra_eval,
                      on_eval)


def largest_product(model, tokens: int) -> int:
    """Multiply-adds of the largest product in a step over ``tokens`` tokens: every 2-D parameter
    (a linear layer's weight, the embedding that is also the output layer) meets every token."""
    return tokens * max((p.shape[0] * p.shape[1] for p in model.parameters() if p.ndim == 2),
                        default=0)


def _train(model, data, config, out_dir, resume, quiet, run_info, extra_eval,
           on_eval=None) -> TrainResult:
    block_size = model.config.block_size
    data.check_block_size(block_size)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    trainable = [p for _, p in named]
    optimizer = AdamW(param_groups(named, config.weight_decay), lr=config.lr,
                      betas=(config.beta1, config.beta2))
    schedule = CosineSchedule(config.lr, config.min_lr, config.warmup_iters, config.decay_iters)
    batch_rng = np.random.default_rng(config.seed)
    eval_rng = np.random.default_rng([config.seed, 1])  # evaluation never shifts training batches
    run_info = dict(run_info or {})
    run_info["train_config"] = config.to_dict()

    if resume and out_dir is None:
        raise ConfigError("train: resume=True needs out_dir, the run directory to continue")
    if resume and not (Path(out_dir) / CHECKPOINT).is_file():  # before making the dir
        raise ConfigError(f"--resume: {out_dir} holds no checkpoint to resume from")
    run = RunDir(out_dir) if out_dir is not None else None
    start, elapsed, history, skipped = 0, 0.0, [], 0
    try:
        if run is not None:
            run.lock()
            if resume:
                rngs = (batch_rng, eval_rng, model.rng)
                start, elapsed = run.restore(model, optimizer, rngs, config)
                skipped = run.restored.meta.get("skipped_steps", 0)
                history = run.metrics_until(start, run.restored.meta.get("last_eval"))
            else:
                run.start_fresh()
        if not resume:  # dropout masks follow the run's seed, not the model's history
            fresh = np.random.default_rng([config.seed, 2])
            model.rng.bit_generator.state = fresh.bit_generator.state

        tokens_per_step = config.batch_size * block_size
        step_times: list[float] = []
        last = {"train": math.nan, "val": math.nan}
        if history:
            last = {"train": history[-1]["train_loss"], "val": history[-1]["val_loss"]}
        since_eval_tokens, since_eval_time = 0, 0.0
        show = not quiet and sys.stderr.isatty()
        bar = tqdm(total=config.max_iters, initial=start, disable=not show, unit="it", leave=False)
        model.train()
        for it in range(start, config.max_iters + 1):
            due = it % config.eval_interval == 0 or it == config.max_iters
            if due and not (resume and it == start):
                last = estimate_loss(model, data, config.batch_size, config.eval_iters, eval_rng)
                if not (math.isfinite(last["train"]) and math.isfinite(last["val"])):
                    raise NonFiniteError(
                        f"training stopped at iteration {it}: the evaluation loss is "
                        f"{last['train']} (train), {last['val']} (val); "
                        f"{_culprit(model, named)}{_kept(run)}")
                record = {"iter": it, "train_loss": last["train"], "val_loss": last["val"],
                          "lr": schedule(min(it, config.max_iters)), "elapsed_s": round(elapsed, 4),
                          "tokens_per_s": round(since_eval_tokens / since_eval_time, 2)
                          if since_eval_time else None}
                if extra_eval is not None:
                    record.update(extra_eval(model))
                history.append(record)
                since_eval_tokens, since_eval_time = 0, 0.0
                if run is not None:
                    run.append_metrics(record)
                    run.save(model, optimizer, (batch_rng, eval_rng, model.rng), it, elapsed,
                             run_info, record, skipped)
                if on_eval is not None:
                    on_eval(record)
            if it == config.max_iters:
                break

            t0 = time.perf_counter()
            optimizer.set_lr(schedule(it))
            x, y = data.get_batch("train", config.batch_size, block_size, batch_rng)
            _, loss = model(x, y)
            loss_value = loss.item()
            finite_loss = math.isfinite(loss_value)
            if finite_loss or config.on_nonfinite == "raise":
                loss.backward()  # for a non-finite loss, only to find the parameter it reaches
            del loss
            norm = math.nan
            if finite_loss:
                norm = clip_grad_norm(trainable, config.grad_clip) if config.grad_clip > 0 \
                    else _grad_norm(trainable)
            if math.isfinite(norm):
                optimizer.step()
            elif config.on_nonfinite == "skip":
                skipped += 1
            else:
                what = "the gradient norm is not finite" if finite_loss \
                    else f"the loss is {loss_value}"
                raise NonFiniteError(f"training stopped at iteration {it}: {what}; "
                                     f"{_culprit(model, named)}{_kept(run)} "
                                     "(on_nonfinite='skip', --skip-nonfinite on the command line, "
                                     "skips such steps instead)")
            optimizer.zero_grad()
            dt = time.perf_counter() - t0
            step_times.append(dt)
            elapsed += dt
            since_eval_tokens += tokens_per_step
            since_eval_time += dt
            bar.update(1)
            if show:
                bar.set_postfix(loss=f"{loss_value:.4f}", tok_s=f"{tokens_per_step / dt:,.0f}")
        bar.close()
    finally:
        if run is not None:
            run.unlock()

    ms = 1000 * float(np.median(step_times)) if step_times else math.nan
    return TrainResult(iters=config.max_iters, train_loss=last["train"], val_loss=last["val"],
                       elapsed_s=elapsed, ms_per_step=ms,
                       tokens_per_s=tokens_per_step / (ms / 1000) if step_times else math.nan,
                       skipped_steps=skipped, history=history)
