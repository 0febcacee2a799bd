"""The layers: Linear, Embedding, LayerNorm, Dropout against plain NumPy."""

from __future__ import annotations

import numpy as np
import pytest

from minilora import ConfigError, ShapeError, Tensor
from minilora.nn import Dropout, Embedding, LayerNorm, Linear, Parameter


def test_linear_is_x_w_transpose_plus_b_with_pytorch_shapes_and_init():
    layer = Linear(4, 3, dtype=np.float64, rng=0)
    assert layer.weight.shape == (3, 4) and layer.bias.shape == (3,)
    bound = 1 / np.sqrt(4)  # PyTorch's default: U(-1/sqrt(in), 1/sqrt(in)) for W and b
    assert np.abs(layer.weight.data).max() <= bound and np.abs(layer.bias.data).max() <= bound
    x = np.random.default_rng(1).normal(size=(2, 5, 4))
    expected = x @ layer.weight.data.T + layer.bias.data
    np.testing.assert_allclose(layer(Tensor(x)).data, expected, rtol=1e-14)
    np.testing.assert_allclose(layer(x).data, expected, rtol=1e-14)  # a plain array works too


def test_linear_keeps_float32():
    layer = Linear(4, 3, rng=0)
    assert layer.weight.dtype == np.float32
    assert layer(np.ones((1, 4), np.float32)).dtype == np.float32


def test_linear_from_weights_shares_the_parameters_and_draws_nothing():
    w, b = Parameter(np.ones((3, 2))), Parameter(np.zeros(3))
    layer = Linear.from_weights(w, b)
    assert layer.weight is w and layer.bias is b
    assert (layer.in_features, layer.out_features) == (2, 3)
    assert [n for n, _ in layer.named_parameters()] == ["weight", "bias"]
    assert Linear.from_weights(np.ones((3, 2))).bias is None
    with pytest.raises(ShapeError, match=r"bias \(2,\) must be \(out,\)"):
        Linear.from_weights(w, np.zeros(2))


def test_same_seed_same_layer():
    a, b = Linear(5, 4, rng=3), Linear(5, 4, rng=np.random.default_rng(3))
    np.testing.assert_array_equal(a.weight.data, b.weight.data)


@pytest.mark.parametrize(("make", "named"), [
    (lambda: Linear(0, 3), "in_features must be a positive integer, got 0"),
    (lambda: Linear(3, 2.0), "out_features must be a positive integer, got 2.0"),
    (lambda: Embedding(-1, 3), "num_embeddings must be a positive integer, got -1"),
    (lambda: LayerNorm(True), "normalized_shape must be a positive integer, got True"),
    (lambda: Dropout(1.0), "p must be a number in [0, 1), got 1.0"),
])
def test_bad_layer_arguments_are_named(make, named):
    with pytest.raises(ConfigError) as e:
        make()
    assert named in str(e.value)


def test_embedding_looks_up_rows_and_names_a_bad_index():
    emb = Embedding(5, 2, dtype=np.float64, rng=0)
    idx = np.array([[4, 0], [1, 1]])
    np.testing.assert_array_equal(emb(idx).data, emb.weight.data[idx])
    with pytest.raises(ShapeError, match=r"index 5 is outside \[0, 5\)"):
        emb(np.array([5]))
    with pytest.raises(ShapeError, match="integers"):
        emb(np.array([0.5]))


def test_layer_norm_normalises_the_last_axis():
    ln = LayerNorm(6, dtype=np.float64)
    x = np.random.default_rng(0).normal(2.0, 3.0, (4, 6))
    y = ln(Tensor(x)).data
    expected = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-12)


def test_dropout_is_seeded_and_off_in_eval():
    x = Tensor(np.ones((50, 50)))
    a, b = Dropout(0.5, rng=1), Dropout(0.5, rng=1)
    ya, yb = a(x).data, b(x).data
    np.testing.assert_array_equal(ya, yb)
    assert set(np.unique(ya)) == {0.0, 2.0} and 0.4 < (ya == 0).mean() < 0.6
    a.eval()
    assert a(x) is x
