"""Evaluation (minilora.train.evaluate) builds no graph: its forward passes run under no_grad."""

from __future__ import annotations

import numpy as np

from minilora.data import TextDataset
from minilora.models import GPT, GPTConfig
from minilora.train.evaluate import estimate_loss
from tests.train.conftest import MODEL, corpus_text


def test_estimating_the_loss_builds_no_graph_and_keeps_the_mode(graph_nodes):
    data = TextDataset(corpus_text(), name="corpus")
    model = GPT(GPTConfig(vocab_size=data.tokenizer.vocab_size, **MODEL), seed=0).train()
    made = graph_nodes
    losses = estimate_loss(model, data, 2, 2, np.random.default_rng(0))
    assert made == [] and model.training and np.isfinite(list(losses.values())).all()
    model(*data.get_batch("train", 2, MODEL["block_size"], np.random.default_rng(0)))
    assert made  # the counter sees a forward pass that does build one
