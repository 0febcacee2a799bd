"""Parity with Hugging Face transformers' GPT2LMHeadModel in float64 (skips without torch).

Given the same weights, minilora's logits, loss and gradients equal GPT-2's to round-off. GPT-2's
Conv1D stores weights as (in, out), the transpose of our Linear.weight (out, in).
"""

import numpy as np
import pytest

from minilora.models import GPT, GPTConfig
from tests.extras import need

torch, transformers = need("torch", "transformers")

CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def hf_name(name):
    return "transformer.wte.weight" if name == "lm_head.weight" else name


def to_hf(name, array):
    return array.T if name.endswith(CONV1D) else array


@pytest.fixture(scope="module")
def pair():
    cfg = GPTConfig(vocab_size=23, block_size=16, n_layer=2, n_head=4, n_embd=16, dtype="float64")
    ours = GPT(cfg, seed=0)
    hf_cfg = transformers.GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd,
        n_layer=cfg.n_layer, n_head=cfg.n_head, activation_function="gelu_new",
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=1e-5,
    )
    hf = transformers.GPT2LMHeadModel(hf_cfg).double().eval()
    hf_params = dict(hf.named_parameters())
    with torch.no_grad():
        for name, p in ours.named_parameters():
            hf_params[name].copy_(torch.from_numpy(to_hf(name, p.data).copy()))
    return ours, hf


def test_logits_loss_and_gradients_equal_gpt2(pair):
    ours, hf = pair
    rng = np.random.default_rng(0)
    idx, targets = rng.integers(0, 23, (2, 16)), rng.integers(0, 23, (2, 16))
    logits, loss = ours(idx, targets)
    ours.zero_grad()
    loss.backward()

    hf.zero_grad()
    hf_logits = hf(torch.from_numpy(idx)).logits
    flat_targets = torch.from_numpy(targets).reshape(-1)
    hf_loss = torch.nn.functional.cross_entropy(hf_logits.reshape(-1, 23), flat_targets)
    hf_loss.backward()

    np.testing.assert_allclose(logits.data, hf_logits.detach().numpy(), rtol=1e-10, atol=1e-12)
    assert loss.item() == pytest.approx(hf_loss.item(), rel=1e-12)
    hf_params = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        expected = to_hf(name, hf_params[hf_name(name)].grad.numpy())
        np.testing.assert_allclose(p.grad, expected, rtol=1e-8, atol=1e-12, err_msg=name)
