"""LoRA on an Embedding, as PEFT's ``lora.Embedding``: A (r, vocab) starts at 0 and B (dim, r)
random; the forward pass looks up columns of A; merging adds s (B A)^T to W (vocab, dim). GPT-2
ties lm_head to wte, so merging an adapter on wte changes lm_head too: the one case where the
merged model is not the unmerged one, which PEFT shares (tests/hf/test_adapters_parity.py)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minilora import GPT, GPTConfig, Tensor
from minilora.lora import (
    LoRAConfig,
    LoRAEmbedding,
    apply_lora,
    get_nb_trainable_parameters,
    lora_parameter_counts,
    merge_adapter,
    merge_and_unload,
    unmerge_adapter,
)
from minilora.nn import Embedding, Parameter
from tests.lora.helpers import MODEL_TOL, PROPERTY, ToyGPT, tokens, train_every_adapter


@st.composite
def wte_models(draw):
    """(seed, a ToyGPT with LoRA on wte (and maybe c_attn), trained, its config)."""
    seed = draw(st.integers(0, 2**31 - 1))
    targets = draw(st.sampled_from([["wte"], ["wte", "c_attn"]]))
    config = LoRAConfig(r=draw(st.integers(1, 4)), lora_alpha=draw(st.integers(1, 8)),
                        use_rslora=draw(st.booleans()), target_modules=targets)
    model = apply_lora(ToyGPT(vocab=draw(st.integers(2, 9)), seed=seed), config, rng=seed)
    return seed, train_every_adapter(model, seed), config


def test_a_fresh_embedding_adapter_is_zero_a_and_random_b_and_changes_nothing():
    idx, _ = tokens(0)
    base = ToyGPT(seed=1)(idx).data
    model = apply_lora(ToyGPT(seed=1), LoRAConfig(r=3, target_modules=["wte"]), rng=0)
    layer = model.transformer.wte
    assert isinstance(layer, LoRAEmbedding)
    assert layer.lora_embedding_A.shape == (3, 7) and not layer.lora_embedding_A.data.any()
    assert layer.lora_embedding_B.shape == (4, 3) and np.all(layer.lora_embedding_B.data != 0)
    np.testing.assert_array_equal(model(idx).data, base)
    assert not layer.weight.requires_grad and layer.lora_embedding_A.requires_grad


@PROPERTY
@given(case=wte_models())
def test_the_embedding_path_is_a_lookup_of_columns_of_a(case):
    """y = W[idx] + s A[:, idx]^T B^T, token by token."""
    seed, model, _ = case
    layer = model.transformer.wte
    W, A, B = (p.data for p in (layer.weight, layer.lora_embedding_A, layer.lora_embedding_B))
    idx, _ = tokens(seed, vocab=layer.num_embeddings)
    expected = W[idx] + layer.scaling * np.einsum("rbt,dr->btd", A[:, idx], B)
    np.testing.assert_allclose(layer(idx).data, expected, **MODEL_TOL)


@PROPERTY
@given(case=wte_models())
def test_merging_into_the_tied_wte_changes_lm_head_too(case):
    """Unmerged, the adapter changes the token embeddings only; merged into wte.weight, which is
    lm_head.weight too, it changes the output layer as well. Each equals its plain model."""
    seed, model, config = case
    layer = model.transformer.wte
    idx, _ = tokens(seed, vocab=layer.num_embeddings)
    W, delta = layer.weight.data.copy(), layer.delta_weight()
    unmerged = model(idx).data.copy()
    with pytest.warns(UserWarning, match=r"tied to \['lm_head'\]"):
        merge_adapter(model)
    merged = model(idx).data.copy()
    assert model.lm_head.weight is layer.weight  # the tie holds: one array, merged
    np.testing.assert_array_equal(layer.weight.data, W + delta)

    def plain(embedding, output):  # the same model without adapters, its two weights given
        other = ToyGPT(vocab=layer.num_embeddings, seed=seed)
        other.load_state_dict({k: v for k, v in model.state_dict().items()
                               if "lora_" not in k})
        other.transformer.wte.weight = Parameter(embedding)
        other.lm_head.weight = Parameter(output)
        return other

    if config.target_modules == ("wte",):  # no other adapter: the plain model is the oracle
        np.testing.assert_allclose(unmerged, plain(W + delta, W)(idx).data, **MODEL_TOL)
        np.testing.assert_allclose(merged, plain(W + delta, W + delta)(idx).data, **MODEL_TOL)
    assert not np.allclose(merged, unmerged, **MODEL_TOL)
    unmerge_adapter(model)
    np.testing.assert_array_equal(layer.weight.data, W)
    np.testing.assert_array_equal(model(idx).data, unmerged)


def test_merge_and_unload_of_wte_gives_a_plain_tied_embedding():
    model = train_every_adapter(apply_lora(ToyGPT(), LoRAConfig(target_modules=["wte"])), 0)
    delta = model.transformer.wte.delta_weight()
    W = model.transformer.wte.weight.data.copy()
    with pytest.warns(UserWarning, match="tied"):
        merge_and_unload(model)
    assert type(model.transformer.wte) is Embedding
    assert model.lm_head.weight is model.transformer.wte.weight
    np.testing.assert_allclose(model.transformer.wte.weight.data, W + delta, rtol=1e-15)


def test_an_embedding_adapter_counts_r_times_vocab_plus_dim():
    model = apply_lora(ToyGPT(vocab=7, c=4), LoRAConfig(r=3, target_modules=["wte"]))
    (count,) = lora_parameter_counts(model)
    assert (count.in_features, count.out_features, count.lora_params) == (7, 4, 3 * (7 + 4))
    assert get_nb_trainable_parameters(model)[0] == 33


def test_gpt2s_embeddings_train_through_their_adapters():
    """On the real GPT: wte and wpe adapted, one step gives A a gradient (B's is 0 while A = 0,
    A's is not: the gradient reaches A through B)."""
    model = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=8,
                          dtype="float64"))
    apply_lora(model, LoRAConfig(r=2, target_modules=["wte", "wpe", "c_attn"]), rng=0)
    idx = np.random.default_rng(0).integers(0, 11, (2, 8))
    _, loss = model(idx, idx)
    loss.backward()
    for layer in (model.transformer.wte, model.transformer.wpe):
        assert np.abs(layer.lora_embedding_A.grad).sum() > 0
        np.testing.assert_array_equal(layer.lora_embedding_B.grad, 0.0)  # A = 0: no dB yet
        assert layer.weight.grad is None


def test_a_token_outside_the_vocabulary_is_refused_by_the_adapted_embedding():
    model = apply_lora(ToyGPT(vocab=7), LoRAConfig(target_modules=["wte"]))
    with pytest.raises(Exception, match=r"index 7 is outside \[0, 7\)"):
        model.transformer.wte(Tensor(np.array([[7]])))
