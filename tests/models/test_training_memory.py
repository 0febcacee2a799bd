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


def checkpointed_and_not(model, idx, targets, **kw):
    """(loss, gradients) without and with checkpointing, from the same generator states."""
    results = []
    for enabled in (False, True):
        state = model.rng.bit_generator.state
        lora_states = [m.rng.bit_generator.state for m in model.modules() if hasattr(m, "lora_A")]
        (model.gradient_checkpointing_enable if enabled else
         model.gradient_checkpointing_disable)()
        results.append(loss_and_grads(model, idx, targets, **kw)[1:])
        if not enabled:  # the second run draws the same masks as the first
            model.rng.bit_generator.state = state
            for m, s in zip((m for m in model.modules() if hasattr(m, "lora_A")), lora_states,
                            strict=True):
                m.rng.bit_generator.state = s
    return results


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("dropout", [0.0, 0.2], ids=["no-dropout", "dropout"])
def test_checkpointing_gives_the_same_gradients_bit_for_bit(lora, dropout):
    """float32 as training runs; dropout in the model (and in LoRA's adapters) replayed."""
    model = tiny(lora, dtype="float32", dropout=dropout, lora_dropout=dropout)
    frozen = {n: p.data.copy() for n, p in model.named_parameters() if not p.requires_grad}
    idx, targets = batch()
    (loss, grads), (loss_ckpt, grads_ckpt) = checkpointed_and_not(model, idx, targets,
                                                                  skip_logits=True)
    assert loss_ckpt == loss
    for name, g in grads.items():
        if g is None:
            assert grads_ckpt[name] is None and name in frozen, name
        else:
            assert grads_ckpt[name].tobytes() == g.tobytes(), name
    for name, p in model.named_parameters():
        if name in frozen:
            assert p.data.tobytes() == frozen[name].tobytes() and p.grad is None, name


def test_checkpointing_leaves_the_generators_where_the_plain_step_does():
    """The replayed masks are drawn from saved states: the model's generator ends where it
    would have ended anyway, so the next step's masks do not change."""
    model = tiny(False, dtype="float32", dropout=0.2)
    idx, targets = batch()
    start = model.rng.bit_generator.state
    loss_and_grads(model, idx, targets)
    plain_end = model.rng.bit_generator.state
    model.rng.bit_generator.state = start
    model.gradient_checkpointing_enable()
    loss_and_grads(model, idx, targets)
    assert model.rng.bit_generator.state == plain_end


def test_checkpointing_keeps_only_the_blocks_inputs():
    """What the graph holds after the forward pass shrinks: no block's activations are saved."""
    import tracemalloc

    held = []
    for enabled in (False, True):
        model = tiny(True, dtype="float32")
        if enabled:
            model.gradient_checkpointing_enable()
        idx, targets = np.zeros((4, 8), int), np.ones((4, 8), int)
        tracemalloc.start()
        start, _ = tracemalloc.get_traced_memory()
        _, loss = model(idx, targets, skip_logits=True)
        held.append(tracemalloc.get_traced_memory()[0] - start)
        tracemalloc.stop()
        del loss
    assert held[1] < held[0] / 2


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_a_run_with_activation_checkpointing_is_the_run_without(lora):
    """TrainConfig.activation_checkpointing: the same weights after a few steps, bit for bit
    (dropout on), and the model's setting as it was after the run."""
    from minilora.data import TextDataset
    from minilora.train import TrainConfig, train
    from tests.train.conftest import LORA, MODEL, corpus_text

    data = TextDataset(corpus_text(), name="corpus")
    states = []
    for enabled in (False, True):
        model = GPT(GPTConfig(vocab_size=data.tokenizer.vocab_size, **MODEL), seed=0)
        if lora:
            apply_lora(model, LORA, rng=1)
        config = TrainConfig(batch_size=2, max_iters=3, eval_interval=3, eval_iters=1,
                             warmup_iters=1, seed=0, activation_checkpointing=enabled)
        train(model, data, config, quiet=True, threads=1)
        assert not model.is_gradient_checkpointing
        states.append(model.state_dict())
    for name, value in states[0].items():
        assert states[1][name].tobytes() == value.tobytes(), name


def test_the_command_line_flag_sets_the_config_field():
    from minilora import cli
    from minilora.commands import _train_config

    parser = cli.build_parser()
    args = parser.parse_args(["train", "--out", "o", "--activation-checkpointing"])
    assert _train_config(args).activation_checkpointing
    assert not _train_config(parser.parse_args(["train", "--out", "o"])).activation_checkpointing


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_checkpointing_is_bit_for_bit_on_the_engines_threads_with_blocked_attention(lora):
    """200 positions (causal attention in row blocks), two threads, dropout: the no_grad first
    run gives the same bits as the recorded one, so the loss and gradients are the same."""
    from minilora import runtime

    model = GPT(GPTConfig(vocab_size=50, block_size=200, n_layer=2, n_head=2, n_embd=32,
                          dropout=0.1), seed=0)
    if lora:
        apply_lora(model, LoRAConfig(r=2, target_modules=("c_attn", "c_proj"), lora_dropout=0.1),
                   rng=1)
    rng = np.random.default_rng(0)
    idx, targets = rng.integers(0, 50, (3, 200)), rng.integers(0, 50, (3, 200))
    with runtime.parallel(2):
        (loss, grads), (loss_ckpt, grads_ckpt) = checkpointed_and_not(model, idx, targets,
                                                                      skip_logits=True)
    assert loss_ckpt == loss
    for name, g in grads.items():
        assert (g is None and grads_ckpt[name] is None) or g.tobytes() == grads_ckpt[name].tobytes()
