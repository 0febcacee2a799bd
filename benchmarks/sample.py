"""Tokens per second while sampling, with the key/value cache, on GPT-2 small's shape.

    python benchmarks/sample.py [--init-from DIR] [--prompt-tokens 16] [--new-tokens 128]
                                [--batch 1] [--rounds 3] [--uncached] [--threads N] [--json FILE]

The model is GPT-2 small's shape (12 layers, 12 heads, 768 wide, vocabulary 50,257, context
1,024), randomly initialised (nanoGPT's init, seed 0): the cost of a token depends on the shape,
not on the weights. ``--init-from DIR`` samples from a Hugging Face GPT-2 directory instead
(``config.json``, ``model.safetensors``). ``generate`` reads the prompt once (the prefill), then
each new token costs one position through the cache; the figure is the new tokens (times the
batch) over the time after the prefill, the best of ``--rounds`` rounds. ``--uncached`` also
times the same generation reading the whole sequence at every token, as a generation without a
cache does. Threads as ``minilora generate`` chooses them (``runtime.step_threading`` for a
step of ``--batch`` tokens). ``--small``: a tiny model, for the tests.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

from minilora.models import GPT, GPTConfig
from minilora.runtime import step_threading
from minilora.train.loop import largest_product

GPT2_SMALL = {"vocab_size": 50257, "block_size": 1024, "n_layer": 12, "n_head": 12,
              "n_embd": 768}
SMALL = {"vocab_size": 300, "block_size": 64, "n_layer": 2, "n_head": 2, "n_embd": 32}


class _Timed:
    """The model, with the time its first ``next_logits`` call (the prefill) took."""

    def __init__(self, model, cached: bool):
        self.model, self.cached, self.prefill_s, self.calls = model, cached, 0.0, 0

    def __getattr__(self, name):
        return getattr(self.model, name)

    def new_cache(self):
        return self.model.new_cache() if self.cached else None  # None: the whole sequence

    def next_logits(self, idx, cache=None):
        t0 = time.perf_counter()
        out = self.model.next_logits(idx, cache)
        if self.calls == 0:
            self.prefill_s = time.perf_counter() - t0
        self.calls += 1
        return out


def sample_once(model, prompt: np.ndarray, new_tokens: int, cached: bool) -> dict:
    """One greedy generation: its tokens, its prefill seconds, and new tokens per second after."""
    from minilora.models.generation import generate

    timed = _Timed(model, cached)
    t0 = time.perf_counter()
    out = generate(timed, prompt, new_tokens, temperature=0, window=model.config.block_size)
    total = time.perf_counter() - t0
    decode = total - timed.prefill_s
    n_new = (out.shape[1] - prompt.shape[1]) * out.shape[0]
    return {"tokens": out[:, prompt.shape[1]:], "prefill_s": timed.prefill_s,
            "tokens_per_s": (n_new - out.shape[0]) / decode if decode > 0 else float("nan")}


def measure(model, prompt, new_tokens: int, rounds: int, cached: bool) -> dict:
    """The best of ``rounds`` generations (after one of warm-up)."""
    sample_once(model, prompt, min(new_tokens, 4), cached)
    runs = [sample_once(model, prompt, new_tokens, cached) for _ in range(rounds)]
    best = max(runs, key=lambda r: r["tokens_per_s"])
    return {"tokens_per_s": best["tokens_per_s"],
            "prefill_ms": 1000 * min(r["prefill_s"] for r in runs), "tokens": best["tokens"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--init-from", metavar="DIR", help="a Hugging Face GPT-2 directory")
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--uncached", action="store_true", help="also time it without the cache")
    p.add_argument("--threads", type=int)
    p.add_argument("--json", metavar="FILE")
    p.add_argument("--small", action="store_true", help="a tiny model (for the tests)")
    args = p.parse_args(argv)

    if args.init_from:
        model = GPT.from_pretrained(args.init_from)
        what = f"{args.init_from}"
    else:
        shape = SMALL if args.small else GPT2_SMALL
        model = GPT(GPTConfig(**shape), seed=0)
        what = "GPT-2 small's shape, random init" if not args.small else "a tiny model"
    model.eval()
    c = model.config
    prompt = np.random.default_rng(0).integers(0, c.vocab_size, (args.batch, args.prompt_tokens))
    print(f"{what}: {c.n_layer} layers x {c.n_embd} ({c.n_head} heads), vocabulary "
          f"{c.vocab_size:,}, {model.num_parameters():,} parameters, {c.dtype}; batch "
          f"{args.batch}, prompt {args.prompt_tokens} tokens, {args.new_tokens} new (greedy), "
          f"best of {args.rounds}")
    results = {}
    with step_threading(largest_product(model, args.batch), args.threads):  # as generate's
        results["cached"] = measure(model, prompt, args.new_tokens, args.rounds, True)
        if args.uncached:
            results["uncached"] = measure(model, prompt, args.new_tokens, args.rounds, False)
    for name, r in results.items():
        print(f"{name}: {r['tokens_per_s']:,.1f} tokens/s after a prefill of "
              f"{r['prefill_ms']:,.1f} ms")
    if args.uncached:
        same = np.array_equal(results["cached"]["tokens"], results["uncached"]["tokens"])
        ratio = results["cached"]["tokens_per_s"] / results["uncached"]["tokens_per_s"]
        print(f"cached / uncached: {ratio:.2f}x; the same tokens: "
              f"{'yes' if same else 'no (a near tie rounded the other way)'}")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"model": what, "config": c.to_dict(), "batch": args.batch,
             "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
             **{k: {"tokens_per_s": v["tokens_per_s"], "prefill_ms": v["prefill_ms"]}
                for k, v in results.items()}}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
