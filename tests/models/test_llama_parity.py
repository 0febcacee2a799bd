"""Parity with transformers' LlamaForCausalLM and Qwen2ForCausalLM, and with PEFT's LoRA on them.

Tiny random models are made here by transformers, their weights copied into minilora's model by
name (no transposes: both store Linear weights (out, in)), and minilora's config read from
transformers' own ``config.to_dict()``. In float64: logits and loss within 1e-10, every gradient
within 1e-8 (relative), full and with LoRA on q_proj, v_proj and on all seven projections.

transformers computes two steps in float32 whatever the model's dtype: RMSNorm's statistics
(``hidden_states.to(torch.float32)``) and the rotary tables (``inv_freq`` and the angles). For a
float64 model those are downcasts, which leave transformers float32-accurate (1e-7, measured by
``test_unmodified_float64_transformers_is_only_float32_accurate``). So the float64 tests run
transformers with exactly those two steps computed in the input's dtype (``in_float64``); the
float32 test runs it unmodified. Skips without torch, transformers or peft:
``pip install -e ".[parity]"``.
"""

from __future__ import annotations

import copy
import types

import numpy as np
import pytest

from minilora.lora import LoRAConfig, apply_lora, named_lora_layers
from minilora.models import LlamaConfig, LlamaForCausalLM
from minilora.ops.rotary import rope_inv_freq

EXTRA = 'needs the parity extra: pip install -e ".[parity]"'
torch = pytest.importorskip("torch", reason=EXTRA)
transformers = pytest.importorskip("transformers", reason=EXTRA)
peft = pytest.importorskip("peft", reason=EXTRA)

VOCAB = 29
SIZES = dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
             num_attention_heads=4)
VARIANTS = {  # each with fewer key/value heads than query heads
    "llama-untied": ("llama", dict(num_key_value_heads=2, tie_word_embeddings=False,
                                   pad_token_id=3, rms_norm_eps=1e-5,
                                   rope_parameters={"rope_type": "default", "rope_theta": 5e5})),
    "llama-tied-mqa-biases": ("llama", dict(num_key_value_heads=1, tie_word_embeddings=True,
                                            head_dim=6, attention_bias=True, mlp_bias=True)),
    "qwen2-untied": ("qwen2", dict(num_key_value_heads=2, tie_word_embeddings=False,
                                   rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    "qwen2-tied": ("qwen2", dict(num_key_value_heads=2, tie_word_embeddings=True)),
}
SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TARGETS = {"q,v": ["q_proj", "v_proj"], "all-seven": SEVEN}

# PEFT calls a transformers method that warns it is deprecated; nothing to do with these numbers
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated")

LOGITS_TOL = dict(rtol=1e-10, atol=1e-12)
GRAD_TOL = dict(rtol=1e-8, atol=1e-12)


def hf_model(variant: str, dtype=torch.float64):
    """A transformers model with random weights (seeded), in eval mode, on the sdpa attention
    (the eager one computes its softmax in float32 too)."""
    kind, fields = VARIANTS[variant]
    config_class, model_class = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[kind]
    torch.manual_seed(sorted(VARIANTS).index(variant))
    config = config_class(**SIZES, **fields, attn_implementation="sdpa")
    model = model_class(config).to(dtype).eval()
    with torch.no_grad():  # norms start at ones and biases at zero: make them random too
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
    return model


def in_float64(hf):
    """RMSNorm's statistics and the rotary tables computed in the input's dtype instead of
    float32; everything else (attention, GQA, rotate_half, MLP, PEFT) is transformers' own."""
    config = hf.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    theta = config.rope_parameters["rope_theta"]

    def rms_norm(self, x):
        variance = x.pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(variance + self.variance_epsilon))

    def rotary(self, x, position_ids):
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=x.dtype) / head_dim))
        angles = position_ids[..., None].to(x.dtype) * inv_freq
        table = torch.cat((angles, angles), dim=-1)
        return table.cos(), table.sin()

    for module in hf.modules():
        name = type(module).__name__
        if name.endswith("RMSNorm"):
            module.forward = types.MethodType(rms_norm, module)
        elif name.endswith("RotaryEmbedding"):
            module.forward = types.MethodType(rotary, module)
    return hf


def ours_like(hf, dtype: str = "float64") -> LlamaForCausalLM:
    """minilora's model from transformers' config dict and weights, copied by name."""
    model = LlamaForCausalLM(LlamaConfig.from_dict(hf.config.to_dict(), dtype=dtype), seed=1)
    model.load_state_dict({name: p.detach().numpy().copy() for name, p in hf.named_parameters()})
    return model


def batch(seed: int = 0):
    """idx (2, 9) with the padding token 3 in it, and targets with some positions ignored."""
    rng = np.random.default_rng(seed)
    idx, targets = rng.integers(0, VOCAB, (2, 9)), rng.integers(0, VOCAB, (2, 9))
    idx[0, :2] = 3
    targets[0, :2] = targets[1, 4] = -1
    return idx, targets


def run_hf(hf, idx, targets):
    """logits, loss = cross-entropy with minilora's convention (targets aligned, -1 ignored)."""
    hf.zero_grad()
    logits = hf(torch.from_numpy(idx)).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB),
                                             torch.from_numpy(targets).reshape(-1), ignore_index=-1)
    loss.backward()
    return logits.detach().numpy(), loss.item()


def run_ours(model, idx, targets):
    model.zero_grad()
    logits, loss = model(idx, targets)
    loss.backward()
    return logits.data, loss.item()


def assert_same_outputs(ours, theirs):
    np.testing.assert_allclose(ours[0], theirs[0], **LOGITS_TOL, err_msg="logits")
    assert ours[1] == pytest.approx(theirs[1], rel=1e-10), "loss"


@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_loss_and_every_gradient_equal_transformers(variant):
    hf = in_float64(hf_model(variant))
    ours = ours_like(hf)
    idx, targets = batch()
    assert_same_outputs(run_ours(ours, idx, targets), run_hf(hf, idx, targets))
    theirs = dict(hf.named_parameters())
    assert [n for n, _ in ours.named_parameters()] == list(theirs)
    for name, p in ours.named_parameters():
        np.testing.assert_allclose(p.grad, theirs[name].grad.numpy(), **GRAD_TOL, err_msg=name)


@pytest.mark.parametrize("variant", ["llama-untied", "qwen2-tied"])
def test_loss_on_shifted_targets_equals_transformers_labels_loss(variant):
    """transformers' ``labels=idx`` predicts idx[t + 1] at t: minilora's targets are idx shifted
    left, the last position ignored. Its loss function casts the logits to float32
    (``logits.float()``), so the two agree to float32 round-off."""
    hf = in_float64(hf_model(variant))
    idx, _ = batch()
    targets = np.concatenate([idx[:, 1:], np.full((2, 1), -1)], axis=1)
    with torch.no_grad():
        expected = hf(torch.from_numpy(idx), labels=torch.from_numpy(idx)).loss.item()
    assert ours_like(hf)(idx, targets)[1].item() == pytest.approx(expected, rel=1e-6)


def lora_pair(variant: str, targets: list[str], seed: int = 0):
    """(minilora model, PEFT model) with the same random, non-zero lora_A and lora_B (with B = 0
    the gradient of A would be exactly zero and prove nothing)."""
    hf = in_float64(hf_model(variant))
    ours = apply_lora(ours_like(hf), LoRAConfig(r=4, lora_alpha=8, target_modules=targets))
    theirs = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0)).to(torch.float64)
    peft_params = dict(theirs.named_parameters())
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for name, layer in named_lora_layers(ours):
            for part in ("lora_A", "lora_B"):
                p = getattr(layer, part)
                p.data = rng.normal(0.0, 0.3, p.shape)
                peft_params[f"base_model.model.{name}.{part}.default.weight"].copy_(
                    torch.from_numpy(p.data))
    return ours, theirs


@pytest.mark.parametrize("targets", TARGETS.values(), ids=TARGETS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_lora_logits_loss_and_gradients_equal_peft(variant, targets):
    ours, theirs = lora_pair(variant, targets)
    idx, y = batch(1)
    assert_same_outputs(run_ours(ours, idx, y), run_hf(theirs, idx, y))
    peft_params = dict(theirs.named_parameters())
    layers = dict(named_lora_layers(ours))
    assert len(layers) == 2 * len(targets)  # every target, in both layers
    for name, layer in layers.items():
        for part in ("lora_A", "lora_B"):
            expected = peft_params[f"base_model.model.{name}.{part}.default.weight"].grad.numpy()
            np.testing.assert_allclose(getattr(layer, part).grad, expected, **GRAD_TOL,
                                       err_msg=f"{name}.{part}")
    frozen = [n for n, p in ours.named_parameters() if not n.endswith(("lora_A", "lora_B"))]
    assert all(dict(ours.named_parameters())[n].grad is None for n in frozen)
    assert all(p.grad is None for n, p in peft_params.items() if "lora_" not in n)


@pytest.mark.parametrize("variant", ["llama-untied", "qwen2-untied"])
def test_merged_lora_equals_peft_merge_and_unload(variant):
    from minilora.lora import merge_and_unload

    ours, theirs = lora_pair(variant, SEVEN)
    merged = theirs.merge_and_unload()
    mine = merge_and_unload(ours)
    for name, p in mine.named_parameters():
        np.testing.assert_allclose(p.data, dict(merged.named_parameters())[name].detach().numpy(),
                                   rtol=1e-13, atol=1e-15, err_msg=name)


@pytest.mark.parametrize("variant", ["llama-untied", "qwen2-tied"])
def test_greedy_generation_with_the_key_value_cache_equals_transformers(variant):
    """Positions continue after the cached ones: the same tokens as transformers' generate."""
    hf = in_float64(hf_model(variant))
    idx, _ = batch(2)
    hf.generation_config.eos_token_id = None  # never stop early: six tokens, as minilora makes
    with torch.no_grad():
        expected = hf.generate(torch.from_numpy(idx), max_new_tokens=6, do_sample=False,
                               pad_token_id=0).numpy()
    np.testing.assert_array_equal(ours_like(hf).generate(idx, 6, temperature=0), expected)


def test_unmodified_float64_transformers_is_only_float32_accurate():
    """Why ``in_float64`` exists: transformers' float64 Llama differs from minilora's (and from
    itself with the two float32 steps removed) by float32 round-off, ~1e-7."""
    hf = hf_model("llama-untied")
    idx, targets = batch()
    plain = run_hf(hf, idx, targets)[0]
    exact = run_ours(ours_like(hf), idx, targets)[0]
    error = np.abs(plain - exact).max() / np.abs(exact).max()
    assert 1e-9 < error < 1e-5


@pytest.mark.parametrize("variant", VARIANTS)
def test_float32_model_equals_unmodified_transformers_to_float32_round_off(variant):
    """Where transformers' arithmetic is float32 anyway, minilora's float32 model follows it."""
    hf = hf_model(variant, dtype=torch.float32)
    ours = ours_like(hf, dtype="float32")
    idx, targets = batch()
    (logits, loss), (hf_logits, hf_loss) = run_ours(ours, idx, targets), run_hf(hf, idx, targets)
    assert logits.dtype == np.float32
    np.testing.assert_allclose(logits, hf_logits, rtol=1e-4, atol=1e-5)
    assert loss == pytest.approx(hf_loss, rel=1e-5)
    theirs = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        assert p.grad.dtype == np.float32
        scale = np.abs(theirs[name].grad.numpy()).max()
        np.testing.assert_allclose(p.grad, theirs[name].grad.numpy(), rtol=1e-3,
                                   atol=1e-4 * scale, err_msg=name)


@pytest.mark.parametrize("head_dim, theta", [(4, 1e4), (6, 5e5), (64, 1e4), (128, 5e5),
                                             (128, 1e6)])
def test_rope_frequencies_equal_transformers_in_float32(head_dim, theta):
    config = transformers.LlamaConfig(**SIZES, head_dim=head_dim,
                                      rope_parameters={"rope_type": "default", "rope_theta": theta})
    inv_freq = transformers.LlamaForCausalLM(config).model.rotary_emb.inv_freq.numpy()
    np.testing.assert_allclose(rope_inv_freq(head_dim, theta, np.float32), inv_freq, rtol=2e-7)
