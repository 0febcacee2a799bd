"""Tiny runs for the training tests: a few KB of text, a 1-2 layer GPT, a handful of steps."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from minilora.io import load_tensors
from minilora.lora import LoRAConfig
from minilora.train import TrainConfig, runs
from minilora.train.checkpoint import CHECKPOINT

# dropout > 0 everywhere, so that resuming must restore the dropout generator too
MODEL = {"n_layer": 2, "n_head": 2, "n_embd": 16, "block_size": 16, "dropout": 0.1}
PRETRAIN = TrainConfig(batch_size=4, max_iters=8, eval_interval=4, eval_iters=2, warmup_iters=2,
                       lr=3e-3, min_lr=3e-4, weight_decay=0.1, seed=3)
FINETUNE = TrainConfig(batch_size=4, max_iters=8, eval_interval=4, eval_iters=2, warmup_iters=2,
                       lr=5e-3, min_lr=5e-4, weight_decay=0.1, seed=5)
LORA = LoRAConfig(r=2, lora_alpha=4, lora_dropout=0.1, target_modules=("c_attn", "c_proj"))


def corpus_text(seed: int = 0, words: int = 700) -> str:
    rng = random.Random(seed)
    vocab = "the cat sat on a mat while one dog ran after two red birds in the warm sun".split()
    return " ".join(rng.choice(vocab) for _ in range(words)) + ".\n"


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text(corpus_text(), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def base_run(tmp_path_factory, corpus) -> Path:
    """A pretrained base, shared read-only by the fine-tuning tests."""
    out = tmp_path_factory.mktemp("runs") / "base"
    runs.pretrain(corpus, out, MODEL, PRETRAIN, quiet=True, threads=1)
    return out


def tensors(run_dir: Path) -> dict[str, np.ndarray]:
    """Every array a run's checkpoint holds: weights (model.*) and optimizer state (optim.*)."""
    return load_tensors(Path(run_dir) / CHECKPOINT)


def assert_bit_identical(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert a[name].tobytes() == b[name].tobytes(), f"{name} differs"


class Stop(Exception):
    """Raised from on_eval to stop a run right after a checkpoint, as Ctrl-C would."""


def stop_at(iteration: int):
    def on_eval(record: dict) -> None:
        if record["iter"] == iteration:
            raise Stop(iteration)
    return on_eval
