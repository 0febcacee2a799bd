"""Gradient accumulation (TrainConfig.gradient_accumulation_steps, --grad-accum): N micro-batches
of B rows make the step one batch of N B rows makes, to float round-off, masked targets too."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from minilora.data import TextDataset
from minilora.models import GPT, GPTConfig
from minilora.train import TrainConfig, read_checkpoint, runs, train
from tests.train.conftest import (
    MODEL,
    PRETRAIN,
    Stop,
    assert_bit_identical,
    corpus_text,
    stop_at,
    tensors,
)

# float64 sums of the same terms grouped otherwise: differences of a few ulps, far below this
FLOAT64_ROUND_OFF = 1e-12


class RowByRow(TextDataset):
    """A dataset whose batch is drawn one row at a time, so that N batches of B rows from a
    generator are the rows of one batch of N B from it; each row ignores (-1) the targets
    before a point that depends on where it starts, so micro-batches count different numbers."""

    def get_batch(self, split, batch_size, block_size, rng):
        data = self.split(split)
        xs, ys = [], []
        for _ in range(batch_size):
            start = int(rng.integers(len(data) - block_size))
            window = data[start:start + block_size + 1]
            x, y = window[:-1].copy(), window[1:].copy()
            y[:start % block_size] = -1  # 0 to block_size - 1 ignored: at least one counts
            xs.append(x)
            ys.append(y)
        return np.stack(xs), np.stack(ys)


CONFIG = TrainConfig(batch_size=2, max_iters=3, eval_interval=100, eval_iters=1, warmup_iters=1,
                     lr=1e-2, min_lr=1e-3, weight_decay=0.1, grad_clip=0.5, seed=0)


def _trained(data, batch_size: int, accum: int) -> dict[str, np.ndarray]:
    model = GPT(GPTConfig(vocab_size=data.tokenizer.vocab_size, **{**MODEL, "dropout": 0.0},
                          dtype="float64"), seed=0)
    config = dataclasses.replace(CONFIG, batch_size=batch_size,
                                 gradient_accumulation_steps=accum)
    train(model, data, config, quiet=True, threads=1)
    return {n: p.data for n, p in model.named_parameters()}


def _largest_difference(a: dict, b: dict) -> float:
    return max(float(np.max(np.abs(a[n] - b[n]))) for n in a)


@pytest.mark.parametrize("accum", [2, 3])
def test_accumulated_steps_equal_one_batch_n_times_larger_with_masked_targets(accum):
    data = RowByRow(corpus_text(), name="corpus")
    one = _trained(data, CONFIG.batch_size * accum, 1)
    accumulated = _trained(data, CONFIG.batch_size, accum)
    assert _largest_difference(accumulated, one) < FLOAT64_ROUND_OFF
    start = GPT(GPTConfig(vocab_size=data.tokenizer.vocab_size, **{**MODEL, "dropout": 0.0},
                          dtype="float64"), seed=0).state_dict()
    assert _largest_difference(one, start) > 1e-3  # the steps moved the weights


def test_the_check_sees_micro_batches_weighted_alike(monkeypatch):
    """The test above can fail: weighting each micro-batch 1/N (the mean of their mean losses)
    is another step when the micro-batches count different numbers of targets."""
    from minilora.train.loop import _Training

    data = RowByRow(corpus_text(), name="corpus")
    one = _trained(data, 2 * CONFIG.batch_size, 1)
    weighted = _Training._micro_batches

    def alike(self):
        batches = weighted(self)
        return [(b, 1 / len(batches)) for b, _ in batches]

    monkeypatch.setattr(_Training, "_micro_batches", alike)
    assert _largest_difference(_trained(data, CONFIG.batch_size, 2), one) > 1e-6


def test_an_accumulating_run_resumes_bit_for_bit(corpus, tmp_path):
    config = dataclasses.replace(PRETRAIN, gradient_accumulation_steps=3)
    runs.pretrain(corpus, tmp_path / "whole", MODEL, config, quiet=True, threads=1)
    with pytest.raises(Stop):
        runs.pretrain(corpus, tmp_path / "stopped", MODEL, config, quiet=True, threads=1,
                      on_eval=stop_at(4))
    assert read_checkpoint(tmp_path / "stopped").meta["iter"] == 4
    runs.resume(tmp_path / "stopped", quiet=True, threads=1)
    assert_bit_identical(tensors(tmp_path / "whole"), tensors(tmp_path / "stopped"))
    # and accumulating made another run than one batch per step does
    runs.pretrain(corpus, tmp_path / "plain", MODEL, PRETRAIN, quiet=True, threads=1)
    whole, plain = tensors(tmp_path / "whole"), tensors(tmp_path / "plain")
    assert any(whole[k].tobytes() != plain[k].tobytes() for k in whole)
