"""LoRALinear on its own: parameters, initialisation, dropout, what training computes, merging."""

from __future__ import annotations

import numpy as np
import pytest

from minilora import Tensor, ops
from minilora.lora import LoRALinear
from minilora.nn import Linear
from tests.lora.helpers import LayerSpec, assert_within_rounding, oracle_output


def test_adapted_layer_keeps_base_names_frozen_and_adds_lora_A_and_lora_B():
    base = Linear(5, 3, rng=0)
    base.weight.grad = np.ones_like(base.weight.data)  # a stale gradient must not survive
    layer = LoRALinear(base, r=2, lora_alpha=4, rng=0)
    names = [(n, p.shape, p.requires_grad) for n, p in layer.named_parameters()]
    assert names == [("weight", (3, 5), False), ("bias", (3,), False),
                     ("lora_A", (2, 5), True), ("lora_B", (3, 2), True)]
    assert layer.weight is base.weight and layer.bias is base.bias  # taken over, not copied
    assert layer.weight.grad is None
    assert (layer.in_features, layer.out_features, layer.r, layer.scaling) == (5, 3, 2, 2.0)


def test_a_layer_without_bias_stays_without_bias():
    layer = LoRALinear(Linear(4, 6, bias=False, rng=0), r=1, lora_alpha=1)
    assert layer.bias is None and [n for n, _ in layer.named_parameters()] == [
        "weight", "lora_A", "lora_B"]


def test_kaiming_init_is_uniform_within_one_over_sqrt_in_and_b_is_zero():
    layer = LoRALinear(Linear(400, 3, rng=0), r=50, lora_alpha=50, rng=1)
    bound = 1 / np.sqrt(400)  # kaiming_uniform_(a=sqrt(5)) on (r, in): U(-1/sqrt(in), 1/sqrt(in))
    A = layer.lora_A.data
    assert np.abs(A).max() <= bound and np.abs(A).max() > 0.99 * bound
    assert abs(A.std() - bound / np.sqrt(3)) < 0.03 * bound  # the std of U(-b, b) is b / sqrt(3)
    assert not layer.lora_B.data.any()


def test_gaussian_init_has_std_one_over_r_and_b_is_zero():
    layer = LoRALinear(Linear(2000, 3, rng=0), 4, 4, init_lora_weights="gaussian", rng=1)
    assert abs(layer.lora_A.data.std() - 1 / 4) < 0.01  # PEFT: normal_(A, std=1/r)
    assert abs(layer.lora_A.data.mean()) < 0.01  # centred: 8000 draws put the mean within 0.003
    assert not layer.lora_B.data.any()


def test_dropout_keeps_float32_and_the_repr_says_what_the_layer_is():
    layer = LoRALinear(Linear(4, 3, dtype="float32", rng=0), r=2, lora_alpha=4, lora_dropout=0.5,
                       rng=1)
    x = Tensor(np.ones((5, 4), np.float32), requires_grad=True)
    y = layer(x)
    y.backward(np.ones(y.shape, np.float32))
    assert y.dtype == x.grad.dtype == layer.lora_A.grad.dtype == np.float32
    assert repr(layer) == ("LoRALinear(in_features=4, out_features=3, bias=True, adapters={"
                           "default: r=2, lora_alpha=4, scaling=2, lora_dropout=0.5}, "
                           "active=['default'], merged=[])")


def test_same_seed_gives_bit_identical_initial_adapters():
    a = LoRALinear(Linear(6, 4, rng=0), r=3, lora_alpha=6, rng=np.random.default_rng(7))
    b = LoRALinear(Linear(6, 4, rng=0), r=3, lora_alpha=6, rng=7)
    np.testing.assert_array_equal(a.lora_A.data, b.lora_A.data)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dtype_is_kept_through_forward_backward_and_merge(dtype):
    layer = LayerSpec(4, 3, 2, np.float64(16.0), dtype, seed=0).build()  # must not leak float64
    x = Tensor(np.ones((2, 4), dtype), requires_grad=True)
    y = layer(x)
    y.backward(np.ones(y.shape, dtype))
    assert y.dtype == x.grad.dtype == layer.lora_A.grad.dtype == layer.lora_B.grad.dtype == dtype
    assert isinstance(layer.scaling, float)
    layer.merge()
    assert layer.weight.dtype == layer(x).dtype == dtype


def test_dropout_masks_come_from_the_generator_and_only_in_training():
    spec = LayerSpec(6, 5, 3, 6, np.float64, seed=3)
    a, b, c = spec.build(lora_dropout=0.5), spec.build(lora_dropout=0.5), spec.build(0.5)
    c.rng = np.random.default_rng(12345)
    x = spec.inputs()
    ya, yb, yc = a(Tensor(x)).data, b(Tensor(x)).data, c(Tensor(x)).data
    np.testing.assert_array_equal(ya, yb)  # same seed, same masks
    assert not np.array_equal(ya, yc)  # another generator, other masks
    expected, M = oracle_output(a, x, a.scaling)
    assert not np.allclose(ya, expected)  # dropout did act
    a.eval()
    assert_within_rounding(a(Tensor(x)).data, expected, M, 4 + 6 + 3, np.float64)  # eval: none


def test_training_never_forms_b_a_nor_the_frozen_weights_gradient(mm_calls):
    """The saving LoRA promises, made real: in a training step no (out, in) array is computed,
    neither s B A nor dL/dW; the adapter's products are all thin, (rows, r) or (r, in)-sized."""
    spec = LayerSpec(in_features=7, out_features=11, r=3, lora_alpha=6, dtype=np.float32, seed=0)
    layer = spec.build()
    x = Tensor(spec.inputs(rows=5), requires_grad=True)
    y = layer(x)
    y.backward(np.ones(y.shape, np.float32))
    shapes = [out for _, _, out in mm_calls]
    assert shapes and (11, 7) not in shapes and (7, 11) not in shapes, shapes
    assert layer.lora_A.grad is not None and layer.lora_B.grad is not None
    assert layer.weight.grad is None and layer.bias.grad is None


def test_merged_layer_forward_is_the_plain_linear():
    spec = LayerSpec(5, 4, 2, 3.5, np.float64, seed=1)
    layer, x = spec.build(), spec.inputs()
    layer.merge()
    y = layer(Tensor(x, requires_grad=True))
    np.testing.assert_array_equal(y.data, ops.linear(Tensor(x), layer.weight, layer.bias).data)
    y.backward(np.ones(y.shape))
    assert layer.lora_A.grad is None and layer.lora_B.grad is None  # no adapter path at all


def test_delta_weight_is_scaled_b_a():
    layer = LayerSpec(3, 2, 2, 5, np.float64, seed=2).build()
    expected = 2.5 * layer.lora_B.data @ layer.lora_A.data
    np.testing.assert_allclose(layer.delta_weight(), expected, rtol=1e-15)


def test_disabled_layer_computes_the_base_output_exactly():
    spec = LayerSpec(5, 4, 2, 8, np.float32, seed=4)
    layer, x = spec.build(), spec.inputs()
    base = ops.linear(Tensor(x), layer.weight, layer.bias).data
    layer.enable_adapters(False)
    assert layer.disable_adapters
    np.testing.assert_array_equal(layer(Tensor(x)).data, base)
    layer.enable_adapters(True)
    assert not np.array_equal(layer(Tensor(x)).data, base)


def test_layer_accepts_a_plain_array_and_leading_axes():
    layer = LayerSpec(3, 2, 1, 1, np.float64, seed=5).build()
    assert layer(np.ones((4, 2, 3))).shape == (4, 2, 2)


def test_repr_shows_rank_alpha_and_scaling():
    text = repr(LoRALinear(Linear(3, 2, rng=0), r=4, lora_alpha=8))
    for part in ("r=4", "lora_alpha=8", "scaling=2", "merged=[]"):
        assert part in text
