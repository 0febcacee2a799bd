"""The GPT model: against the plain-NumPy oracle, its gradients, its dtypes, its errors."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minilora import ConfigError, ShapeError, no_grad, ops
from minilora.lora import LoRAConfig, apply_lora
from minilora.models import GPT, GPTConfig
from tests.models import reference_gpt as ref

TINY = dict(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=8)


def tiny(dtype="float64", seed=0, **kw):
    return GPT(GPTConfig(**{**TINY, "dtype": dtype, **kw}), seed=seed)


def batch(rng, b=3, t=8, v=11):
    return rng.integers(0, v, (b, t)), rng.integers(0, v, (b, t))


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**16), t=st.integers(1, 8), bias=st.booleans())
def test_logits_equal_the_plain_numpy_oracle(seed, t, bias):
    model = tiny(seed=seed, bias=bias)
    idx, targets = batch(np.random.default_rng(seed), t=t)
    logits, loss = model(idx, targets)
    expected = ref.gpt_logits(model.state_dict(), idx, 2, 2)
    np.testing.assert_allclose(logits.data, expected, rtol=1e-12, atol=1e-12)  # float64 round-off
    assert loss.item() == pytest.approx(ref.cross_entropy(expected, targets), rel=1e-12)


def test_parameter_names_are_gpt2s():
    names = [n for n, _ in tiny().named_parameters()]
    assert names[:2] == ["transformer.wte.weight", "transformer.wpe.weight"]
    assert "transformer.h.1.attn.c_attn.weight" in names
    assert "transformer.h.0.mlp.c_proj.bias" in names
    assert "lm_head.weight" not in names  # tied to wte: listed once


def _gpt2_count(V, T, L, C):
    """GPT-2's parameters by hand: embeddings, per block 12 C^2 + 13 C (two LayerNorms, c_attn,
    attn.c_proj, c_fc, mlp.c_proj, with biases), the final LayerNorm; lm_head is tied to wte."""
    return V * C + T * C + L * (12 * C * C + 13 * C) + 2 * C


def test_get_num_params_counts_as_nanogpt_without_the_position_embeddings():
    model = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=8))
    total = _gpt2_count(11, 8, 2, 8)
    assert model.get_num_params(non_embedding=False) == model.num_parameters() == total
    assert model.get_num_params() == total - 8 * 8  # wpe (block_size, C) left out
    # nanoGPT prints "number of parameters: 123.65M" for GPT-2 small (124M with wpe)
    assert _gpt2_count(50257, 1024, 12, 768) - 1024 * 768 == 123_653_376
    apply_lora(model, LoRAConfig(r=2, target_modules=["c_attn"]))
    assert model.get_num_params() == total - 64 + 2 * 2 * (8 + 24)  # A and B count too


def test_lm_head_is_tied_to_token_embedding():
    model = tiny()
    assert model.lm_head.weight is model.transformer.wte.weight


def test_init_follows_nanogpt():
    model = GPT(GPTConfig(vocab_size=50, block_size=64, n_layer=4, n_head=4, n_embd=128), seed=1)
    p = dict(model.named_parameters())
    assert np.std(p["transformer.h.0.mlp.c_fc.weight"].data) == pytest.approx(0.02, rel=0.05)
    residual = p["transformer.h.0.attn.c_proj.weight"].data
    assert np.std(residual) == pytest.approx(0.02 / np.sqrt(8), rel=0.05)
    assert not p["transformer.h.0.attn.c_attn.bias"].data.any()
    assert (p["transformer.h.3.ln_2.weight"].data == 1).all()


def test_same_seed_gives_bit_identical_models():
    a, b = tiny(seed=5), tiny(seed=5)
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert na == nb and np.array_equal(pa.data, pb.data)


def _flat_loss(model, idx, targets):
    with no_grad():
        return model(idx, targets)[1].item()


def test_gradients_of_every_parameter_match_finite_differences():
    """Directional central differences in float64, one random direction per parameter tensor."""
    model = tiny(seed=3)
    rng = np.random.default_rng(0)
    idx, targets = batch(rng)
    model.zero_grad()
    model(idx, targets)[1].backward()
    eps = 1e-6
    for name, p in model.named_parameters():
        direction = rng.standard_normal(p.shape)
        base = p.data.copy()
        p.data = base + eps * direction
        up = _flat_loss(model, idx, targets)
        p.data = base - eps * direction
        down = _flat_loss(model, idx, targets)
        p.data = base
        numeric = (up - down) / (2 * eps)
        analytic = float(np.sum(p.grad * direction))
        assert analytic == pytest.approx(numeric, rel=1e-5, abs=1e-8), name


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_the_model_on_the_reference_ops_equals_the_model_on_the_kernels(lora, monkeypatch):
    """Every fused op swapped for its equation (ops.reference): the same logits and gradients."""
    rng = np.random.default_rng(1)
    idx, targets = batch(rng)
    grads = []
    for impl in ("kernel", "reference"):
        if impl == "reference":
            for name in ops.reference.__all__:
                monkeypatch.setattr(ops, name, getattr(ops.reference, name))
        model = tiny(seed=2)
        if lora:
            apply_lora(model, LoRAConfig(r=2, target_modules=("c_attn", "c_fc")), rng=3)
            b_rng = np.random.default_rng(5)
            for name, p in model.named_parameters():
                if name.endswith("lora_B"):  # B = 0 would hide A's gradient
                    p.data = b_rng.standard_normal(p.shape)
        logits, loss = model(idx, targets)
        loss.backward()
        grads.append((logits.data, {n: p.grad for n, p in model.named_parameters()}))
    np.testing.assert_allclose(grads[0][0], grads[1][0], rtol=1e-12, atol=1e-13)
    for name, g in grads[0][1].items():
        if g is None:  # frozen: no gradient on either side
            assert grads[1][1][name] is None, name
            continue
        np.testing.assert_allclose(g, grads[1][1][name], rtol=1e-10, atol=1e-13, err_msg=name)


def test_float32_model_stays_float32_and_matches_float64():
    idx, targets = batch(np.random.default_rng(4))
    m64 = tiny("float64", seed=7)
    m32 = tiny("float32", seed=7)
    m32.load_state_dict(m64.state_dict())
    logits32, loss32 = m32(idx, targets)
    loss32.backward()
    assert logits32.dtype == np.float32
    assert all(p.grad.dtype == np.float32 for p in m32.parameters())
    logits64, _ = m64(idx)
    # float32 eps ~1e-7, grown by a few layers of sums
    np.testing.assert_allclose(logits32.data, logits64.data, rtol=1e-4, atol=1e-5)


def test_dropout_changes_training_output_but_not_eval_output():
    model = tiny(dropout=0.5)
    idx, _ = batch(np.random.default_rng(0))
    a, b = model(idx)[0].data, model(idx)[0].data
    assert not np.array_equal(a, b)
    model.eval()
    np.testing.assert_array_equal(model(idx)[0].data, model(idx)[0].data)


def test_greedy_generation_is_deterministic_and_extends_the_prompt():
    model = tiny()
    prompt = np.array([[1, 2, 3]])
    out = model.generate(prompt, 6, temperature=0)
    assert out.shape == (1, 9) and np.array_equal(out[:, :3], prompt)
    np.testing.assert_array_equal(out, model.generate(prompt, 6, temperature=0))
    assert model.training  # mode restored


def test_sampling_with_a_seed_is_reproducible_and_top_k_limits_choices():
    model = tiny()
    prompt = np.zeros((2, 1), np.int64)
    a = model.generate(prompt, 5, temperature=1.0, top_k=2, rng=9)
    np.testing.assert_array_equal(a, model.generate(prompt, 5, temperature=1.0, top_k=2, rng=9))
    with no_grad():
        first = model.eval()(prompt)[0].data[0, -1]
    assert a[0, 1] in np.argsort(first)[-2:]


def test_generation_beyond_block_size_crops_the_context():
    out = tiny().generate(np.zeros((1, 1), np.int64), 12, temperature=0)
    assert out.shape == (1, 13)


@pytest.mark.parametrize("field,value", [("n_head", 3), ("n_layer", 0), ("vocab_size", -1),
                                         ("dropout", 1.0), ("dtype", "float16"), ("n_embd", 2.5)])
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ConfigError, match=field):
        GPTConfig(**{**TINY, field: value})


def test_sequence_longer_than_block_size_is_refused():
    with pytest.raises(ShapeError, match="block_size 8"):
        tiny()(np.zeros((1, 9), np.int64))


def test_token_outside_vocabulary_is_refused():
    with pytest.raises(ShapeError, match="outside"):
        tiny()(np.full((1, 2), 11))


def test_config_round_trips_through_a_dict():
    cfg = GPTConfig(**TINY)
    assert GPTConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="unknown fields"):
        GPTConfig.from_dict({**cfg.to_dict(), "n_embed": 3})
