"""Inference: the key/value cache, choosing the next token, and greedy completion of prompts.

``GPT.generate`` reads a prompt once and then costs one position per new token: each attention
layer keeps the keys and values of the positions it has seen (:class:`KVCache`) and attends the
new queries to all of them. Nothing here builds a graph (``generate`` runs under ``no_grad``).
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np


class LayerCache:
    """The keys and values one attention layer has computed so far: (B, H, length, hd) each."""

    def __init__(self):
        self.k: np.ndarray | None = None
        self.v: np.ndarray | None = None

    def extend(self, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Append the new positions' k, v (B, H, t, hd); return every position's (B, H, T, hd)."""
        if self.k is not None:
            k, v = np.concatenate([self.k, k], axis=2), np.concatenate([self.v, v], axis=2)
        self.k, self.v = k, v
        return k, v


class KVCache:
    """A model's key/value cache: one :class:`LayerCache` per block, and the positions read."""

    def __init__(self, n_layer: int):
        self.layers = [LayerCache() for _ in range(n_layer)]
        self.length = 0  # positions whose keys and values are held


def next_token(logits: np.ndarray, temperature: float, top_k: int | None,
               rng: np.random.Generator) -> np.ndarray:
    """One token per row of ``logits`` (B, V): the most likely at temperature 0, else sampled
    from softmax(logits / temperature) over the ``top_k`` most likely (all if None)."""
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


def greedy_completions(model, tokenizer, prompts: list[str], max_new_tokens: int,
                       stop: str | None = None) -> list[str]:
    """The greedy continuation of each prompt: ``model.generate(..., temperature=0)`` decoded.

    Prompts of one length run as one batch. ``stop``: a character after which a prompt's
    continuation no longer matters (a batch ends when every prompt has produced it; what a
    prompt says after it is kept, for the caller to cut).
    """
    by_length: dict[int, list[int]] = defaultdict(list)
    encoded = [tokenizer.encode(p) for p in prompts]
    for i, ids in enumerate(encoded):
        by_length[len(ids)].append(i)
    stop_token = None if stop is None else int(tokenizer.encode(stop)[0])
    out = [""] * len(prompts)
    for length, members in by_length.items():
        idx = np.stack([encoded[i] for i in members])  # (B, T)
        new = model.generate(idx, max_new_tokens, temperature=0, stop_token=stop_token)
        for i, row in zip(members, new[:, length:], strict=True):
            out[i] = tokenizer.decode(row)
    return out
