"""Inference: generation through the key/value cache, and greedy completion of prompts.

The cached path (the prompt once, then one position per token) and the plain forward pass (the
whole sequence each time) compute the same logits in another order, so they round differently:
logits are compared with a tolerance, and greedy tokens tie-aware, never bit for bit.
"""

from __future__ import annotations

import numpy as np
import pytest

from minilora.data import builtin_tokenizer
from minilora.lora import LoRAConfig, apply_lora
from minilora.models import GPT, GPTConfig, KVCache, greedy_completions
from minilora.tensor import Node

# Two float32 paths to the same logits round differently, by a few ulps of logits of size ~1
# (test_the_cache_gives_the_logits_of_the_forward_pass measures it).
LOGIT_ROUND_OFF = 2e-5


@pytest.fixture(scope="module")
def tokenizer():
    return builtin_tokenizer()


def _gpt(vocab_size: int, block_size: int = 48, lora: bool = False) -> GPT:
    """A float32 GPT with weights large enough that its greedy answers are not all alike."""
    model = GPT(GPTConfig(vocab_size=vocab_size, block_size=block_size, n_layer=2, n_head=2,
                          n_embd=16), seed=1)
    rng = np.random.default_rng(2)
    for _, p in model.named_parameters():
        p.data = (p.data + rng.normal(0, 0.3, p.shape)).astype(np.float32)
    if lora:
        apply_lora(model, LoRAConfig(r=2, lora_alpha=4, target_modules=("c_attn", "c_proj")),
                   rng=0)
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.data = rng.normal(0, 0.3, p.shape).astype(np.float32)
    return model.eval()


def _is_greedy_continuation(model, ids, tokens) -> bool:
    """Whether ``tokens`` continue ``ids`` greedily under the plain forward pass, up to round-off:
    each token's logit is the largest, or within LOGIT_ROUND_OFF of it. At a tie that close
    another path may choose the other token, so nothing after it is compared."""
    seq = list(ids)
    for token in tokens:
        logits = model(np.array([seq[-model.config.block_size:]]))[0].data[0, -1]
        best = logits.max()
        if logits[token] < best - LOGIT_ROUND_OFF:
            return False
        if (logits >= best - LOGIT_ROUND_OFF).sum() > 1:
            return True
        seq.append(token)
    return True


def test_the_cache_gives_the_logits_of_the_forward_pass():
    model = _gpt(30)
    idx = np.random.default_rng(0).integers(0, 30, (3, 20))
    cache = KVCache(model.config.n_layer)
    first = model.next_logits(idx[:, :12], cache)  # the prompt, once
    rest = [model.next_logits(idx[:, t:t + 1], cache) for t in range(12, 20)]  # then one each
    full = model(idx)[0].data  # (B, T, V)
    assert cache.length == 20
    np.testing.assert_allclose(first, full[:, 11], rtol=0, atol=LOGIT_ROUND_OFF)
    for t, logits in zip(range(12, 20), rest, strict=True):
        np.testing.assert_allclose(logits, full[:, t], rtol=0, atol=LOGIT_ROUND_OFF)


@pytest.mark.parametrize("lora", [False, True], ids=["plain", "lora-unmerged"])
@pytest.mark.parametrize("prompt_length, block_size", [(5, 48), (14, 16)],
                         ids=["cached", "window-slides"])
def test_greedy_generation_is_greedy_under_the_plain_forward_pass(lora, prompt_length,
                                                                  block_size):
    """Through the cache, and past block_size, where the window slides and the cache is left."""
    model = _gpt(30, block_size, lora)
    prompts = np.random.default_rng(3).integers(0, 30, (4, prompt_length))
    out = model.generate(prompts, 9, temperature=0)
    assert out.shape == (4, prompt_length + 9)
    for prompt, row in zip(prompts, out, strict=True):
        assert list(row[:prompt_length]) == list(prompt)
        assert _is_greedy_continuation(model, prompt, row[prompt_length:])
        # the check can fail: the least likely first token is not greedy
        worst = int(model(prompt[None])[0].data[0, -1].argmin())
        assert not _is_greedy_continuation(model, prompt, [worst])
    assert len({tuple(r) for r in out[:, prompt_length:]}) > 1  # the check sees something


def test_generation_builds_no_graph(monkeypatch):
    model = _gpt(30).train()
    made = []
    init = Node.__init__

    def counting_init(self, *args, **kwargs):
        made.append(1)
        init(self, *args, **kwargs)

    monkeypatch.setattr(Node, "__init__", counting_init)
    model.generate(np.zeros((2, 3), np.int64), 5, temperature=0.7, rng=0)
    assert made == [] and model.training  # no node at all; the mode is restored
    model(np.zeros((2, 3), np.int64))
    assert made  # the counter sees a forward pass that does build one


def test_stop_token_ends_generation_once_every_row_has_produced_it():
    model = _gpt(30)
    prompts = np.random.default_rng(4).integers(0, 30, (2, 4))
    full = model.generate(prompts, 12, temperature=0)
    new = full[:, 4:]
    only_first = next(int(t) for t in new[0] if t not in new[1])
    first_at = list(new[0]).index(only_first)
    # one row: it stops right after the token
    one = model.generate(prompts[:1], 12, temperature=0, stop_token=only_first)
    np.testing.assert_array_equal(one, full[:1, :4 + first_at + 1])
    # two rows: the second never says it, so both run to the end
    both = model.generate(prompts, 12, temperature=0, stop_token=only_first)
    np.testing.assert_array_equal(both, full)


def test_sampling_follows_the_seed():
    model = _gpt(30)
    prompt = np.zeros((2, 2), np.int64)
    a = model.generate(prompt, 8, temperature=0.9, top_k=5, rng=7)
    np.testing.assert_array_equal(a, model.generate(prompt, 8, temperature=0.9, top_k=5, rng=7))
    assert not np.array_equal(a, model.generate(prompt, 8, temperature=0.9, top_k=5, rng=8))


def test_vocab_size_samples_only_ids_a_smaller_tokenizer_has():
    """A vocabulary padded past its tokenizer (nanoGPT's 50,304 for GPT-2's 50,257): the padding's
    ids are never sampled, and the ids below are drawn as from the sliced logits."""
    model = _gpt(30)
    prompt = np.zeros((4, 2), np.int64)
    free = model.generate(prompt, 40, temperature=2.0, rng=3)[:, 2:]
    assert (free >= 7).any()  # the check below can fail
    limited = model.generate(prompt, 40, temperature=2.0, rng=3, vocab_size=7)[:, 2:]
    assert limited.max() < 7
    greedy = model.generate(prompt, 12, temperature=0, vocab_size=7)[:, 2:]
    seq = prompt
    for step in range(12):
        best = model(seq)[0].data[:, -1, :7].argmax(axis=-1)
        np.testing.assert_array_equal(greedy[:, step], best)
        seq = np.concatenate([seq, best[:, None]], axis=1)


def test_greedy_completions_are_generate_decoded_prompt_by_prompt(tokenizer):
    """Prompts of several lengths, batched by length, each as generate gives it alone."""
    model = _gpt(tokenizer.vocab_size)
    prompts = ["\nfig cow owl: ", "\nkey: ", "\nplum pear fig cat dog: ", "\ncat: "]
    got = greedy_completions(model, tokenizer, prompts, 9)
    for prompt, completion in zip(prompts, got, strict=True):
        ids = tokenizer.encode(prompt)
        assert len(completion) == 9
        assert _is_greedy_continuation(model, ids, tokenizer.encode(completion))
    assert len(set(got)) > 1


def test_greedy_completions_stop_once_every_prompt_has_said_the_stop(tokenizer):
    model = _gpt(tokenizer.vocab_size)
    full = greedy_completions(model, tokenizer, ["\nab", "\ncd"], 12)
    stopped = greedy_completions(model, tokenizer, ["\nab", "\ncd"], 12, stop=full[0][2])
    assert all(f.startswith(s) for f, s in zip(full, stopped, strict=True))
    assert all(full[0][2] in s for s in stopped) and len(stopped[0]) < 12


def test_logits_that_overflow_are_a_nonfinite_error_not_numpys():
    from minilora.errors import NonFiniteError
    from minilora.models.generation import next_token

    logits = np.array([[0.0, np.nan, 1.0]])
    for temperature in (0, 1.0):
        with pytest.raises(NonFiniteError, match="logits hold NaN or infinity"):
            next_token(logits, temperature, None, np.random.default_rng(0))


class _Recording:
    """The model, with the logits of every step; without the cache (``cached=False``) each
    step reads the whole sequence, as a generation that has none."""

    def __init__(self, model, cached: bool):
        self.model, self.cached, self.logits = model, cached, []

    def __getattr__(self, name):
        return getattr(self.model, name)

    def new_cache(self):
        return self.model.new_cache() if self.cached else None

    def next_logits(self, idx, cache=None):
        self.logits.append(self.model.next_logits(idx, cache))
        return self.logits[-1]


@pytest.mark.parametrize("lora", [False, True], ids=["plain", "lora-unmerged"])
def test_sampling_with_and_without_the_cache_gives_the_same_tokens_and_logits(lora):
    """Sampled (temperature 1, top-k 10), not greedy: the same generator draws the same tokens
    from logits that agree to round-off, step by step, through the cache and without it."""
    from minilora.models.generation import generate

    model = _gpt(30, 48, lora)
    prompts = np.random.default_rng(5).integers(0, 30, (3, 6))
    runs = {}
    for cached in (True, False):
        recording = _Recording(model, cached)
        out = generate(recording, prompts, 20, temperature=1.0, top_k=10, rng=7, window=48)
        runs[cached] = out, recording.logits
    (with_cache, logits), (without, plain_logits) = runs[True], runs[False]
    np.testing.assert_array_equal(with_cache, without)
    assert len(logits) == len(plain_logits) == 20
    for a, b in zip(logits, plain_logits, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=LOGIT_ROUND_OFF)
    assert len({tuple(r) for r in with_cache[:, 6:]}) == 3  # sampled rows differ
