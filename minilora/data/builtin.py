"""Built-in corpora, generated from a seed by the code below: no download, no data files.

``builtin:world`` (to pretrain on) is plain English-like prose about a small made-up world: people,
animals, fruits and things that see, find and carry each other, counts in digits, questions and
answers, and sentences that say what each word is ("a plum is a fruit."). A small char-level GPT
learns its spelling and grammar in a few hundred steps.

``builtin:majority`` (to adapt to) is a task in a format the base has never seen: a list of 3 to 6
words, then the category that most of them belong to::

    fig cow owl plum fox: animal

The base cannot do it (its exact match is 0: it has never seen the format), and it cannot be done
by copying or by looking at one word: the model must recognise every word, know its category, and
count. A pretrained base has the first two partly in hand, so fine-tuning learns it in a few hundred
steps, and full fine-tuning and LoRA at each rank learn it to different degrees in the demo's
budget (the README has the demo's table). Copying-style tasks (reverse, shift or sort a random
string) do not: they need induction heads, which a small char model grows only after many more
steps. The metric is the exact match of greedy completions on 200 held-out prompts
([`Task.pairs`][], never in the training text); always answering the most common category
scores 41%.

Both corpora are written in one fixed alphabet ([`ALPHABET`][]), so the base's tokenizer
([`builtin_tokenizer`][]) encodes the fine-tuning text, and every character of it appears in the
pretraining text, so none has an untrained embedding.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple

import numpy as np

from minilora.data.tokenizer import CharTokenizer
from minilora.errors import ConfigError

ALPHABET = "\n !',-.0123456789:;?abcdefghijklmnopqrstuvwxyz"
"""Every character of the built-in corpora, in the order of their token ids."""

CATEGORIES = {
    "animal": ("cat", "dog", "fox", "owl", "bee", "frog", "duck", "goat", "hen", "pig", "cow",
               "yak"),
    "fruit": ("apple", "pear", "plum", "fig", "lime", "kiwi", "date", "melon", "grape", "peach"),
    "thing": ("box", "jar", "cup", "hat", "key", "map", "boat", "kite", "lamp", "book", "rope",
              "drum"),
}
NAMES = ("ada", "bob", "cy", "dan", "eve", "fay", "gus", "hal", "ivy", "jo", "kim", "lou", "max",
         "ned", "oz", "pam", "quin", "rex", "sue", "tom", "uma", "vic", "wes", "xia", "yan", "zed")
ADJECTIVES = ("red", "blue", "green", "small", "big", "old", "quick", "lazy", "quiet", "happy",
              "sad", "brave", "wet", "dry", "warm", "cold", "soft", "loud", "shy", "sweet")
VERBS = ("sees", "finds", "likes", "takes", "wants", "hears", "helps", "follows", "carries",
         "pulls", "pushes", "brings", "paints", "jumps over", "hides")
INTRANSITIVE = ("runs", "sleeps", "sings", "waits", "jumps", "swims", "hides", "laughs", "rests")
PLACES = ("in the park", "by the river", "at home", "on the hill", "near the farm",
          "under the bridge", "in the box", "at the zoo", "on the jetty")
LINKS = ("and", "but", "so", "then")
ENDS = (".", ".", ".", "!")


def _pick(rng: np.random.Generator, items: Sequence[str]) -> str:
    return items[int(rng.integers(len(items)))]


# ---- builtin:world ---------------------------------------------------------------------------
def _noun(rng: np.random.Generator) -> str:
    return _pick(rng, CATEGORIES[_pick(rng, tuple(CATEGORIES))])


def _phrase(rng: np.random.Generator) -> str:
    """A noun phrase: a name, or 'the (adjective) noun'."""
    if rng.random() < 0.3:
        return _pick(rng, NAMES)
    det = _pick(rng, ("the", "a", "my", "her", "his", "our"))
    adj = f"{_pick(rng, ADJECTIVES)} " if rng.random() < 0.4 else ""
    return f"{det} {adj}{_noun(rng)}"


def _sentence(rng: np.random.Generator) -> str:
    kind = rng.random()
    if kind < 0.35:
        s = f"{_phrase(rng)} {_pick(rng, VERBS)} {_phrase(rng)}"
    elif kind < 0.55:
        s = f"{_phrase(rng)} {_pick(rng, INTRANSITIVE)} {_pick(rng, PLACES)}"
    elif kind < 0.67:
        category = _pick(rng, tuple(CATEGORIES))
        word = _pick(rng, CATEGORIES[category])
        article = "an" if category[0] in "aeiou" else "a"
        s = f"{'an' if word[0] in 'aeiou' else 'a'} {word} is {article} {category}"
    elif kind < 0.77:
        a, b = (int(x) for x in rng.integers(0, 10, 2))
        s = f"{_pick(rng, NAMES)} has {a} {_noun(rng)}s and {b} more, so {a + b} in all"
    elif kind < 0.87:
        s = f"is {_phrase(rng)} {_pick(rng, ADJECTIVES)}? yes; it's {_pick(rng, ADJECTIVES)}-ish"
    else:
        s = f"{_pick(rng, NAMES)} said: {_phrase(rng)} {_pick(rng, INTRANSITIVE)}"
    if rng.random() < 0.25:
        s += f", {_pick(rng, LINKS)} {_phrase(rng)} {_pick(rng, INTRANSITIVE)}"
    return s + _pick(rng, ENDS)


def world_text(n_chars: int, seed: int) -> str:
    """Lines of 1 to 3 sentences, at least ``n_chars`` characters in all."""
    rng = np.random.default_rng(seed)
    lines, total = [], 0
    while total < n_chars:
        line = " ".join(_sentence(rng) for _ in range(int(rng.integers(1, 4))))
        lines.append(line)
        total += len(line) + 1
    return "\n".join(lines) + "\n"


# ---- builtin:majority --------------------------------------------------------------------------
_WORDS = tuple((w, c) for c, ws in CATEGORIES.items() for w in ws)


def _majority_example(rng: np.random.Generator) -> tuple[str, str]:
    """(prompt, answer): 3-6 words, more than half of them of one category, which is the answer."""
    while True:
        n = int(rng.integers(3, 7))
        picks = [_WORDS[i] for i in rng.integers(len(_WORDS), size=n)]
        cats = [c for _, c in picks]
        top = max(CATEGORIES, key=cats.count)
        if 2 * cats.count(top) > n:
            return " ".join(w for w, _ in picks) + ": ", top


Pairs = tuple[tuple[str, str], ...]


def majority_text(n_chars: int, seed: int, n_heldout: int) -> tuple[str, Pairs]:
    """Training lines ``prompt + answer`` (at least ``n_chars`` characters), and ``n_heldout``
    distinct (prompt, answer) pairs drawn first, none of whose prompts occurs in the text."""
    rng = np.random.default_rng(seed)
    heldout: dict[str, str] = {}
    while len(heldout) < n_heldout:
        prompt, answer = _majority_example(rng)
        heldout.setdefault(prompt, answer)
    lines, total = [], 0
    while total < n_chars:
        prompt, answer = _majority_example(rng)
        if prompt in heldout:
            continue
        lines.append(prompt + answer)
        total += len(lines[-1]) + 1
    return "\n".join(lines) + "\n", tuple(heldout.items())


# ---- the task metric -------------------------------------------------------------------------
GenerateFn = Callable[[list[str], int], list[str]]


class ExactMatch(NamedTuple):
    """accuracy = correct / total; completions[i] is the model's answer to pairs[i]."""

    accuracy: float
    correct: int
    total: int
    completions: list[str]


def exact_match(generate_fn: GenerateFn, pairs: Sequence[tuple[str, str]], prefix: str = "\n",
                max_new_tokens: int | None = None) -> ExactMatch:
    """Score greedy completions: the share of prompts whose completion, up to its first newline,
    equals the answer exactly.

    generate_fn(prompts, max_new_tokens) -> the new text after each prompt (a list of str). Each
    prompt is given as ``prefix + prompt``: after a newline, as every line starts in the training
    text. ``max_new_tokens`` defaults to the longest answer plus one (for the newline).
    """
    if not pairs:
        raise ConfigError("exact_match: no (prompt, answer) pairs to score")
    prompts = [prefix + p for p, _ in pairs]
    n_new = max_new_tokens if max_new_tokens is not None else max(len(a) for _, a in pairs) + 1
    outs = generate_fn(prompts, n_new)
    if not isinstance(outs, list | tuple) or len(outs) != len(pairs) \
            or not all(isinstance(o, str) for o in outs):
        raise ConfigError(f"exact_match: generate_fn must return a list of {len(pairs)} "
                          f"strings, got {type(outs).__name__} {outs!s:.60}")
    completions = [o.split("\n", 1)[0] for o in outs]
    correct = sum(c == a for c, (_, a) in zip(completions, pairs, strict=True))
    return ExactMatch(correct / len(pairs), correct, len(pairs), completions)


@dataclass(frozen=True)
class Task:
    """A generated task: held-out (prompt, answer) pairs scored by exact match."""

    name: str
    description: str
    pairs: tuple[tuple[str, str], ...]
    """The held-out (prompt, answer) pairs, never in the training text."""
    prefix: str = "\n"

    def evaluate(self, generate_fn: GenerateFn, limit: int | None = None) -> ExactMatch:
        """exact_match over the first ``limit`` pairs (all by default)."""
        pairs = self.pairs if limit is None else self.pairs[:limit]
        return exact_match(generate_fn, pairs, prefix=self.prefix)


# ---- the registry ------------------------------------------------------------------------------
@dataclass(frozen=True)
class BuiltinCorpus:
    """A generated corpus: its text, and the task it carries (None for plain text)."""

    name: str
    seed: int
    description: str
    text: str
    task: Task | None = None


def _world(seed: int, n_chars: int) -> BuiltinCorpus:
    return BuiltinCorpus("world", seed, _BUILTIN["world"][0], world_text(n_chars, seed))


def _majority(seed: int, n_chars: int) -> BuiltinCorpus:
    text, pairs = majority_text(n_chars, seed, n_heldout=200)
    task = Task("majority", "the category most of the listed words belong to", pairs)
    return BuiltinCorpus("majority", seed, _BUILTIN["majority"][0], text, task)


_BUILTIN: dict[str, tuple[str, int, Callable[[int, int], BuiltinCorpus]]] = {
    "world": ("English-like sentences about a small world (pretraining)", 400_000, _world),
    "majority": ("word lists and the category most words belong to (a task to fine-tune on, "
                 "scored by exact match)", 200_000, _majority),
}


def list_builtin() -> dict[str, str]:
    """name -> one-line description of every built-in corpus."""
    return {name: desc for name, (desc, _, _) in _BUILTIN.items()}


def builtin_tokenizer() -> CharTokenizer:
    """The character tokenizer of [`ALPHABET`][], shared by every built-in corpus."""
    return CharTokenizer(ALPHABET)


def load_builtin(name: str, seed: int = 0, n_chars: int | None = None) -> BuiltinCorpus:
    """Generate the built-in corpus ``name`` (with or without a ``builtin:`` prefix).

    The same (name, seed, n_chars) gives the same text, character for character. ``n_chars`` is
    the minimum length (default: 400,000 for world, 200,000 for majority).
    """
    key = name.removeprefix("builtin:")
    if key not in _BUILTIN:
        raise ConfigError(f"unknown built-in corpus {name!r}; choose from "
                          f"{', '.join('builtin:' + n for n in _BUILTIN)}")
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ConfigError(f"load_builtin: seed must be a non-negative integer, got {seed!r}")
    n = _BUILTIN[key][1] if n_chars is None else n_chars
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
        raise ConfigError(f"load_builtin: n_chars must be a positive integer, got {n_chars!r}")
    return _generate(key, int(seed), int(n))


@lru_cache(maxsize=8)
def _generate(key: str, seed: int, n_chars: int) -> BuiltinCorpus:
    """Generated once per (name, seed, size) in a process; a corpus is immutable, so shared."""
    return _BUILTIN[key][2](seed, n_chars)
