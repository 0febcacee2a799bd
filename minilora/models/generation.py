"""Generation, shared by the models: the loop, and picking each next token (greedy,
temperature, top-k) from the model's last logits."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from minilora.errors import ConfigError, ShapeError
from minilora.nn import Module, make_rng
from minilora.tensor import Tensor, no_grad


def generate(model: Module, idx, max_new_tokens: int, temperature: float, top_k: int | None,
             rng: np.random.Generator | int | None,
             next_logits: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Extend idx (B, T) by ``max_new_tokens`` tokens -> (B, T + max_new_tokens).

    ``next_logits(idx)`` gives the logits (B, V) of the token after ``idx``. Runs without
    gradients and in eval mode, and restores the model's previous mode after.
    """
    check_sampling(temperature, top_k)
    idx = np.array(np.asarray(idx.data if isinstance(idx, Tensor) else idx), dtype=np.int64)
    if idx.ndim != 2 or idx.shape[1] == 0:
        raise ShapeError(f"generate: idx must have shape (B, T) with T >= 1, got {idx.shape}")
    rng = make_rng(rng)
    was_training = model.training
    model.eval()
    try:
        with no_grad():
            for _ in range(max_new_tokens):
                nxt = sample_next(next_logits(idx), temperature, top_k, rng)  # (B,)
                idx = np.concatenate([idx, nxt[:, None]], axis=1)
    finally:
        model.train(was_training)
    return idx


def check_sampling(temperature: float, top_k: int | None) -> None:
    """A ConfigError unless temperature >= 0 and top_k is None or a positive integer."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or temperature < 0:
        raise ConfigError(f"generate: temperature must be a number >= 0, got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool)
                              or not isinstance(top_k, (int, np.integer)) or top_k < 1):
        raise ConfigError(f"generate: top_k must be a positive integer or None, got {top_k!r}")


def sample_next(logits: np.ndarray, temperature: float, top_k: int | None,
                rng: np.random.Generator) -> np.ndarray:
    """logits (B, V) -> next tokens (B,): the most likely with temperature 0, else a draw from
    softmax(logits / temperature) restricted to the ``top_k`` most likely (all if None)."""
    logits = logits.astype(np.float64)
    if temperature == 0:
        return logits.argmax(axis=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = np.partition(logits, -top_k, axis=-1)[:, -top_k][:, None]
        logits = np.where(logits < kth, -np.inf, logits)
    probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    return np.array([rng.choice(len(p), p=p) for p in probs])
