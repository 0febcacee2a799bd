"""Evaluation: the mean loss over random batches, and exact match on a built-in task.

The training loop, ``minilora eval`` and the demo all measure a model here, so a loss or a score
means the same wherever it is printed.
"""

from __future__ import annotations

import numpy as np

from minilora.data import ExactMatch, Task
from minilora.models.generation import greedy_completions
from minilora.tensor import no_grad
from minilora.train import architecture


@no_grad()
def mean_loss(model, data, split: str, batches: int, batch_size: int,
              rng: np.random.Generator, block_size: int | None = None) -> float:
    """Mean loss over ``batches`` random batches of ``split`` ("train" or "val") drawn from
    ``rng``, in eval mode (no dropout); the model's mode is restored after. block_size: the
    sequence length (None: the model's own; a Llama has none and needs it)."""
    block = architecture.of_model(model).block_size(model.config, block_size)
    was_training = model.training
    model.eval()
    try:
        losses = []
        for _ in range(batches):
            x, y = data.get_batch(split, batch_size, block, rng)
            losses.append(model(x, y, skip_logits=True)[1].item())
        return float(np.mean(losses))
    finally:
        model.train(was_training)


def estimate_loss(model, data, batch_size: int, eval_iters: int, rng: np.random.Generator,
                  block_size: int | None = None) -> dict:
    """{"train": ..., "val": ...}: [`mean_loss`][] over ``eval_iters`` batches of each split."""
    return {split: mean_loss(model, data, split, eval_iters, batch_size, rng, block_size)
            for split in ("train", "val")}


def task_accuracy(model, tokenizer, task: Task, limit: int | None = None) -> ExactMatch:
    """Exact match of greedy completions on the task's held-out prompts (the first ``limit``)."""
    return task.evaluate(lambda ps, n: greedy_completions(model, tokenizer, ps, n, stop="\n"),
                         limit)
