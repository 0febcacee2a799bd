"""What training leaves out of memory, with the gradients unchanged: the logits
(``model(idx, targets, skip_logits=True)``)."""

from __future__ import annotations

import numpy as np
import pytest

from minilora import nn
from minilora.lora import LoRAConfig, apply_lora
from minilora.models import GPT, GPTConfig

TINY = dict(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=8)


def tiny(lora: bool, dtype: str = "float64", dropout: float = 0.0, lora_dropout: float = 0.0,
         targets=("c_attn", "c_fc")):
    model = GPT(GPTConfig(**TINY, dtype=dtype, dropout=dropout), seed=0)
    if lora:
        apply_lora(model, LoRAConfig(r=2, target_modules=targets, lora_dropout=lora_dropout),
                   rng=3)
        b_rng = np.random.default_rng(5)
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):  # B = 0 would hide A's gradient
                p.data = b_rng.standard_normal(p.shape).astype(p.dtype)
    return model


def batch(seed=1, ignored=True):
    rng = np.random.default_rng(seed)
    idx, targets = rng.integers(0, 11, (3, 8)), rng.integers(0, 11, (3, 8))
    if ignored:
        targets[0, :3] = -1  # ignored positions, as nanoGPT's -1
    return idx, targets


def loss_and_grads(model, idx, targets, **kw):
    model.zero_grad()
    logits, loss = model(idx, targets, **kw)
    loss.backward()
    return logits, loss.item(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_skipping_the_logits_gives_the_same_loss_and_gradients(lora):
    """The fused final layer norm + lm_head + loss against the three ops; the tied wte's gradient
    (from the lookup and from lm_head) included."""
    model = tiny(lora)
    idx, targets = batch()
    logits, loss, grads = loss_and_grads(model, idx, targets)
    none, fused_loss, fused_grads = loss_and_grads(model, idx, targets, skip_logits=True)
    assert logits.shape == (3, 8, 11) and none is None
    assert fused_loss == pytest.approx(loss, rel=1e-12)
    assert (grads["transformer.wte.weight"] is None) == lora
    for name, g in grads.items():
        if g is None:
            assert fused_grads[name] is None, name
        else:
            np.testing.assert_allclose(fused_grads[name], g, rtol=1e-10, atol=1e-13, err_msg=name)


def test_an_adapted_lm_head_skips_its_logits_the_plain_way():
    """LoRA on an untied lm_head: the fused op would miss the adapter, so the logits are formed
    inside."""
    model = GPT(GPTConfig(**TINY, dtype="float64"), seed=0)
    model.lm_head = nn.Linear.from_weights(model.lm_head.weight.data.copy())  # untied
    apply_lora(model, LoRAConfig(r=2, target_modules=("lm_head",)), rng=3)
    model.lm_head.lora_B.data = np.random.default_rng(5).standard_normal(model.lm_head.lora_B.shape)
    idx, targets = batch()
    _, loss, grads = loss_and_grads(model, idx, targets)
    none, fused_loss, fused_grads = loss_and_grads(model, idx, targets, skip_logits=True)
    assert none is None and fused_loss == loss
    for name, g in grads.items():
        assert (g is None and fused_grads[name] is None) or np.array_equal(g, fused_grads[name])


def test_without_targets_skip_logits_still_gives_the_logits():
    model = tiny(False)
    logits, loss = model(batch()[0], skip_logits=True)
    assert logits.shape == (3, 8, 11) and loss is None
