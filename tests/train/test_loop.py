"""The training loop (minilora.train.train) on the GPT: frozen weights, non-finite steps."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from minilora.data import TextDataset
from minilora.errors import NonFiniteError
from minilora.lora import apply_lora
from minilora.models import GPT, GPTConfig
from minilora.train import TrainConfig, read_checkpoint, train
from tests.train.conftest import LORA, MODEL, corpus_text

CONFIG = TrainConfig(batch_size=4, max_iters=6, eval_interval=3, eval_iters=1, warmup_iters=1,
                     lr=1e-2, min_lr=1e-3, weight_decay=0.1, seed=0)


@pytest.fixture(scope="module")
def data() -> TextDataset:
    return TextDataset(corpus_text(), name="corpus")


def _gpt(data, cls=GPT) -> GPT:
    return cls(GPTConfig(vocab_size=data.tokenizer.vocab_size, **MODEL), seed=0)


def test_lora_training_leaves_every_frozen_parameter_bit_identical(data):
    model = apply_lora(_gpt(data), LORA, rng=0)
    frozen = {n: p.data.copy() for n, p in model.named_parameters() if not p.requires_grad}
    trained = {n: p.data.copy() for n, p in model.named_parameters() if p.requires_grad}
    assert frozen and all(("lora_A" in n or "lora_B" in n) for n in trained)
    assert CONFIG.weight_decay > 0  # decay would move a frozen weight handed to the optimizer

    train(model, data, CONFIG, quiet=True, threads=1)

    params = dict(model.named_parameters())
    for name, before in frozen.items():
        assert params[name].data.tobytes() == before.tobytes(), f"{name} changed"
        assert params[name].grad is None, f"{name} got a gradient"
    assert all(params[n].data.tobytes() != before.tobytes() for n, before in trained.items())


class FlakyGPT(GPT):
    """A GPT whose loss is NaN on the training steps listed in ``poisoned`` (0-based)."""

    poisoned: tuple[int, ...] = ()

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.steps = 0

    def forward(self, idx, targets=None, **kwargs):
        out = super().forward(idx, targets, **kwargs)
        if targets is None or not self.training:  # evaluation is never poisoned
            return out
        step, self.steps = self.steps, self.steps + 1
        if step in self.poisoned:
            logits, loss = out
            return logits, loss * float("nan")
        return out


# constant learning rate, so a run of 4 steps and a run of 5 whose last step is skipped must agree
CONSTANT = dataclasses.replace(CONFIG, lr=1e-2, min_lr=1e-2, warmup_iters=0, eval_interval=100,
                               weight_decay=0.1)


def test_a_nonfinite_loss_stops_training_by_default_naming_the_iteration(data, tmp_path):
    model = _gpt(data, FlakyGPT)
    model.poisoned = (2,)
    with pytest.raises(NonFiniteError, match="iteration 2"):
        train(model, data, CONSTANT, tmp_path / "run", quiet=True, threads=1)
    assert read_checkpoint(tmp_path / "run").meta["iter"] == 0  # the last good checkpoint


def test_a_skipped_nonfinite_step_changes_nothing(data):
    model = _gpt(data, FlakyGPT)
    model.poisoned = (4,)
    result = train(model, data, dataclasses.replace(CONSTANT, max_iters=5, on_nonfinite="skip"),
                   quiet=True, threads=1)
    assert result.skipped_steps == 1
    reference = _gpt(data)
    train(reference, data, dataclasses.replace(CONSTANT, max_iters=4), quiet=True, threads=1)
    ref = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        assert np.isfinite(p.data).all()
        assert p.data.tobytes() == ref[name].data.tobytes(), name


def test_skipping_keeps_training_after_a_bad_step(data):
    model = _gpt(data, FlakyGPT)
    model.poisoned = (1,)
    start = {n: p.data.copy() for n, p in model.named_parameters()}
    result = train(model, data, dataclasses.replace(CONSTANT, max_iters=4, on_nonfinite="skip"),
                   quiet=True, threads=1)
    assert result.skipped_steps == 1 and np.isfinite(result.val_loss)
    assert any(p.data.tobytes() != start[n].tobytes() for n, p in model.named_parameters())
