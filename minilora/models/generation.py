"""Inference: the key/value cache, the generation loop every model shares, choosing the next
token, and greedy completion of prompts.

``generate`` reads a prompt once and then costs one position per new token: each attention layer
keeps the keys and values of the positions it has seen ([`KVCache`][]) and attends the new
queries to all of them. A model takes part through ``model.next_logits(idx, cache)`` and
``model.new_cache()``. Nothing here builds a graph.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from minilora.configs import non_negative_int, positive_int
from minilora.errors import ConfigError, NonFiniteError, ShapeError
from minilora.nn import make_rng
from minilora.tensor import Tensor, no_grad


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
    """A model's key/value cache: one [`LayerCache`][] per block, and the positions read."""

    def __init__(self, n_layer: int):
        self.layers = [LayerCache() for _ in range(n_layer)]
        self.length = 0  # positions whose keys and values are held


@no_grad()
def generate(model, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
             rng: np.random.Generator | int | None = None, stop_token: int | None = None,
             window: int | None = None, streamer=None, vocab_size: int | None = None) -> np.ndarray:
    """Extend idx (B, T) by up to ``max_new_tokens`` tokens -> (B, T + n), n <= max_new_tokens.

    temperature 0 picks the most likely token (greedy); top_k keeps the k most likely.
    stop_token: stop as soon as every row has produced it. window: the longest sequence the model
    reads (GPT's ``block_size``; None: no limit). The prompt is read once; each new token then
    costs one position, its keys and values added to the model's cache, until the sequence fills
    the window. From there the window slides and each step reads the last ``window`` tokens
    afresh (their positions moved). Runs in eval mode and restores the previous mode after.
    streamer: as in ``transformers``, an object whose ``put(ids)`` is called with the prompt
    (B, T), then with each new token (B,), and whose ``end()`` is called once the sequence is
    done ([`TextStreamer`][] prints the text as it comes). vocab_size: sample only ids below it,
    for a tokenizer smaller than the model's vocabulary (nanoGPT pads GPT-2's 50,257 to 50,304);
    None: every id.
    """
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or temperature < 0:
        raise ConfigError(f"generate: temperature must be a number >= 0, got {temperature!r}")
    if top_k is not None:
        top_k = positive_int("generate", "top_k", top_k)
    max_new_tokens = non_negative_int("generate", "max_new_tokens", max_new_tokens)
    if vocab_size is not None:
        vocab_size = positive_int("generate", "vocab_size", vocab_size)
    idx = np.array(np.asarray(idx.data if isinstance(idx, Tensor) else idx), dtype=np.int64)
    if idx.ndim != 2 or idx.shape[1] == 0:
        raise ShapeError(f"generate: idx must have shape (B, T) with T >= 1, got {idx.shape}")
    rng = make_rng(rng)
    was_training = model.training
    model.eval()
    try:
        if streamer is not None:
            streamer.put(idx)
        out = _extend(model, idx, max_new_tokens, temperature, top_k, rng, stop_token, window,
                      streamer, vocab_size)
        if streamer is not None:
            streamer.end()
        return out
    finally:
        model.train(was_training)


def _extend(model, idx: np.ndarray, max_new_tokens: int, temperature: float, top_k: int | None,
            rng: np.random.Generator, stop_token: int | None, window: int | None,
            streamer=None, vocab_size: int | None = None) -> np.ndarray:
    prompt = idx.shape[1]
    cache: KVCache | None = model.new_cache()
    feed = idx if window is None else idx[:, -window:]  # what the next forward pass reads
    for _ in range(max_new_tokens):
        logits = model.next_logits(feed, cache)[:, :vocab_size]  # (B, V): ids a tokenizer has
        nxt = next_token(logits, temperature, top_k, rng)  # (B,)
        idx = np.concatenate([idx, nxt[:, None]], axis=1)
        if streamer is not None:
            streamer.put(nxt)
        if stop_token is not None and (idx[:, prompt:] == stop_token).any(axis=1).all():
            break
        if cache is not None and (window is None or cache.length < window):
            feed = nxt[:, None]
        else:  # the window slides: every position moves, so the cache no longer holds
            cache, feed = None, idx[:, -window:]
    return idx


class TextStreamer:
    """Prints the text of a generation as it comes, as ``transformers``' ``TextStreamer``: pass it
    as ``generate(..., streamer=...)``. One sequence (batch size 1).

    tokenizer: decodes the ids; skip_prompt: print only the new text; file: where (default
    stdout), flushed at every token. A token that ends inside a character (a byte of a
    multi-byte UTF-8 character, with byte-level tokenizers) waits for the rest of it. ``text``
    holds everything printed so far, so a caller stopped by Ctrl-C still has it.
    """

    def __init__(self, tokenizer, skip_prompt: bool = False, file=None):
        self.tokenizer, self.skip_prompt, self.file = tokenizer, skip_prompt, file
        self.text = ""
        self._ids: list[int] = []
        self._prompt = True  # the first put() is the prompt

    def put(self, value) -> None:
        ids = np.asarray(value)
        if ids.ndim == 2:
            if ids.shape[0] != 1:
                raise ShapeError(f"TextStreamer: one sequence at a time, got a batch of "
                                 f"{ids.shape[0]}")
            ids = ids[0]
        if self._prompt and self.skip_prompt:
            self._prompt = False
            return
        self._prompt = False
        self._ids += ids.reshape(-1).tolist()
        text = self.tokenizer.decode(np.asarray(self._ids, dtype=np.int64))
        if not text.endswith("\ufffd"):  # a character may still be incomplete: wait for it
            self._write(text)

    def end(self) -> None:
        """Print what is still held back (even an incomplete character) and a newline."""
        if self._ids:
            self._write(self.tokenizer.decode(np.asarray(self._ids, dtype=np.int64)))
        self._print("\n")
        self.text, self._ids, self._prompt = "", [], True

    def _write(self, text: str) -> None:
        # decoding a sequence extends the decoding of its beginning (characters, bytes, BPE)
        self._print(text[len(self.text):])
        self.text = text

    def _print(self, text: str) -> None:
        print(text, end="", flush=True, file=self.file)


def next_token(logits: np.ndarray, temperature: float, top_k: int | None,
               rng: np.random.Generator) -> np.ndarray:
    """One token per row of ``logits`` (B, V): the most likely at temperature 0, else sampled
    from softmax(logits / temperature) over the ``top_k`` most likely (all if None)."""
    logits = logits.astype(np.float64)
    if not np.isfinite(logits).all():  # no token to pick: say so, not numpy's "contain NaN"
        raise NonFiniteError("generate: the next token's logits hold NaN or infinity (the "
                             "model's numbers overflow)")
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
