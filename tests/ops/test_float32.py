"""dtype is kept: float32 in, float32 out, and float32 out of every VJP.

The VJPs are checked directly (``out.grad_fn.backward(g)``), not through ``.grad`` of a leaf: the
engine casts a leaf's gradient to the leaf's dtype, which would hide a backward that silently
computed in float64 (twice the memory and time).
"""

import math
import re
from pathlib import Path

import numpy as np
import pytest

from minilora import Tensor, ops
from minilora.ops.rotary import rope_tables

RNG = np.random.default_rng(0)


def f32(*shape, low=-1.0, high=1.0):
    """A float32 tensor that requires grad, uniform in [low, high)."""
    return Tensor(RNG.uniform(low, high, shape).astype(np.float32), requires_grad=True)


def positive(*shape):
    return f32(*shape, low=0.5, high=2.0)


MASK = np.array([[True, False, True]])

# (op name in ops.__all__, what the case exercises, a thunk making the output from float32 inputs)
CASES = [
    ("add", "tensor + tensor, broadcast", lambda: ops.add(f32(2, 3), f32(3))),
    ("add", "tensor + int", lambda: f32(2, 3) + 1),
    ("add", "float + tensor", lambda: 1.5 + f32(2, 3)),
    ("add", "numpy float64 scalar + tensor", lambda: np.float64(0.5) + f32(2, 3)),
    ("sub", "tensor - tensor", lambda: f32(2, 3) - f32(2, 3)),
    ("sub", "int - tensor", lambda: 1 - f32(2, 3)),
    ("mul", "tensor * float", lambda: f32(2, 3) * 2.0),
    ("mul", "numpy float64 * tensor", lambda: np.sqrt(np.float64(64)) * f32(2, 3)),
    ("div", "tensor / tensor", lambda: f32(2, 3) / positive(2, 3)),
    ("div", "float / tensor", lambda: 2.0 / positive(2, 3)),
    ("div", "tensor / numpy float64", lambda: f32(2, 3) / np.log(np.float64(7))),
    ("neg", "-tensor", lambda: -f32(2, 3)),
    ("pow", "x ** 2", lambda: f32(2, 3) ** 2),
    ("pow", "x ** 3", lambda: f32(2, 3) ** 3),
    ("pow", "x ** 0.5", lambda: positive(2, 3) ** 0.5),
    ("pow", "x ** 1.5", lambda: positive(2, 3) ** 1.5),
    ("pow", "x ** -1", lambda: positive(2, 3) ** -1),
    ("pow", "x ** numpy float64", lambda: positive(2, 3) ** np.float64(2.5)),
    ("pow", "float ** tensor", lambda: 2.0 ** f32(2, 3)),
    ("pow", "tensor ** tensor", lambda: ops.pow(positive(2, 3), f32(3))),
    ("exp", "", lambda: ops.exp(f32(2, 3))),
    ("log", "", lambda: ops.log(positive(2, 3))),
    ("tanh", "", lambda: ops.tanh(f32(2, 3))),
    ("sqrt", "", lambda: ops.sqrt(positive(2, 3))),
    ("relu", "", lambda: ops.relu(f32(2, 3))),
    ("where", "tensor or float", lambda: ops.where(MASK, f32(2, 3), 0.0)),
    ("where", "tensor or tensor", lambda: ops.where(MASK, f32(2, 3), f32(3))),
    ("masked_fill", "-inf", lambda: ops.masked_fill(f32(2, 3), MASK, -np.inf)),
    ("masked_fill", "numpy float64 value", lambda: ops.masked_fill(f32(2, 3), MASK, np.float64(2))),
    ("clip", "", lambda: ops.clip(f32(2, 3), -0.5, 0.5)),
    ("clip", "numpy float64 limits", lambda: ops.clip(f32(2, 3), np.float64(-0.5), np.float64(1))),
    ("astype", "float64 -> float32", lambda: ops.astype(Tensor(np.ones(3), requires_grad=True),
                                                        np.float32)),
    ("matmul", "batched, broadcast", lambda: ops.matmul(f32(2, 1, 3, 4), f32(5, 4, 2))),
    ("matmul", "1-D", lambda: ops.matmul(f32(4), f32(4, 3))),
    ("linear", "", lambda: ops.linear(f32(2, 3, 4), f32(5, 4), f32(5))),
    ("sum", "", lambda: ops.sum(f32(2, 3), axis=0)),
    ("mean", "", lambda: ops.mean(f32(2, 3), axis=(0, 1), keepdims=True)),
    ("max", "", lambda: ops.max(f32(2, 3), axis=-1)),
    ("reshape", "", lambda: ops.reshape(f32(2, 3), (3, -1))),
    ("transpose", "", lambda: ops.transpose(f32(2, 3, 4), (2, 0, 1))),
    ("swapaxes", "", lambda: ops.swapaxes(f32(2, 3, 4), 0, -1)),
    ("getitem", "gather", lambda: ops.getitem(f32(4, 3), np.array([0, 0, 3]))),
    ("getitem", "slice", lambda: ops.getitem(f32(4, 3), (slice(1, None), 1))),
    ("concatenate", "", lambda: ops.concatenate([f32(2, 3), f32(1, 3)])),
    ("stack", "", lambda: ops.stack([f32(2, 3), f32(2, 3)], axis=1)),
    ("split", "", lambda: ops.split(f32(4, 3), 2)),
    ("softmax", "", lambda: ops.softmax(f32(2, 3))),
    ("log_softmax", "", lambda: ops.log_softmax(f32(2, 3))),
    ("cross_entropy", "", lambda: ops.cross_entropy(f32(2, 3), np.array([0, 2]))),
    ("cross_entropy", "ignore_index", lambda: ops.cross_entropy(f32(2, 3), np.array([-1, 2]),
                                                                ignore_index=-1)),
    ("layer_norm", "", lambda: ops.layer_norm(f32(2, 3), f32(3), f32(3))),
    ("layer_norm", "numpy float64 eps",
     lambda: ops.layer_norm(f32(2, 3), None, None, eps=np.float64(1e-5))),
    ("lm_head_cross_entropy", "", lambda: ops.lm_head_cross_entropy(
        f32(2, 3), f32(3), f32(3), f32(5, 3), np.array([0, 4]))),
    ("lm_head_cross_entropy", "numpy float64 eps, ignore_index", lambda: ops.lm_head_cross_entropy(
        f32(2, 3), None, None, f32(5, 3), np.array([-1, 4]), np.float64(1e-5), -1)),
    ("gelu", "", lambda: ops.gelu(f32(2, 3))),
    ("dropout", "", lambda: ops.dropout(f32(2, 3), 0.5, np.random.default_rng(0))),
    ("dropout", "numpy float64 p",
     lambda: ops.dropout(f32(2, 3), np.float64(0.25), np.random.default_rng(0))),
    ("scaled_dot_product_attention", "causal",
     lambda: ops.scaled_dot_product_attention(f32(2, 3, 4), f32(2, 3, 4), f32(2, 3, 4))),
    ("scaled_dot_product_attention", "numpy float64 scale",
     lambda: ops.scaled_dot_product_attention(f32(2, 3, 4), f32(2, 3, 4), f32(2, 3, 4), False,
                                              1 / np.sqrt(np.float64(4)))),
    ("causal_self_attention", "", lambda: ops.causal_self_attention(f32(2, 3, 12), 2)),
    ("rms_norm", "", lambda: ops.rms_norm(f32(2, 3), f32(3))),
    ("rms_norm", "numpy float64 eps", lambda: ops.rms_norm(f32(2, 3), None, eps=np.float64(1e-6))),
    ("rotary_embedding", "float64 tables",
     lambda: ops.rotary_embedding(f32(2, 3, 4), *rope_tables(np.arange(3), 4, 1e4, np.float64))),
    ("silu", "", lambda: ops.silu(f32(2, 3))),
    ("swiglu", "", lambda: ops.swiglu(f32(2, 3), f32(2, 3))),
    ("grouped_query_attention", "numpy float64 scale",
     lambda: ops.grouped_query_attention(f32(1, 4, 3, 2), f32(1, 2, 3, 2), f32(1, 2, 3, 2),
                                         np.float64(0.5))),
    ("lora_linear", "bias", lambda: ops.lora_linear(f32(2, 3, 4), f32(5, 4), f32(5), f32(2, 4),
                                                    f32(5, 2), 2.0)),
    ("lora_linear", "float32 dropout mask",
     lambda: ops.lora_linear(f32(3, 4), f32(5, 4), None, f32(2, 4), f32(5, 2), 16 / math.sqrt(2),
                             (RNG.random((3, 4)) > 0.5).astype(np.float32) * np.float32(2.0))),
    ("lora_linear", "numpy float64 scaling (rsLoRA) and float64 mask",
     lambda: ops.lora_linear(f32(3, 4), f32(5, 4), f32(5), f32(2, 4), f32(5, 2), 16 / np.sqrt(2),
                             (RNG.random((3, 4)) > 0.5) * 2.0)),
    ("lora_slices", "numpy float64 scaling and float64 mask",
     lambda: ops.lora_slices(f32(3, 4), f32(4, 4), f32(6, 2), np.float64(0.5), ((0, 3), (6, 9)),
                             9, (RNG.random((3, 4)) > 0.5) * 2.0)),
    ("lora_embedding", "numpy float64 scaling",
     lambda: ops.lora_embedding(np.array([[0, 2, 2]]), f32(2, 5), f32(4, 2), np.float64(2.0))),
    ("dora_linear", "bias", lambda: ops.dora_linear(f32(2, 3, 4), f32(5, 4), f32(5), f32(2, 4),
                                                    f32(5, 2), f32(5), 2.0)),
    ("dora_linear", "numpy float64 scaling and float64 mask, the path alone",
     lambda: ops.dora_linear(f32(3, 4), f32(5, 4), None, f32(2, 4), f32(5, 2), f32(5),
                             np.float64(0.5), (RNG.random((3, 4)) > 0.5) * 2.0, with_base=False)),
    ("dora_linear", "float64 mask and bias",
     lambda: ops.dora_linear(f32(3, 4), f32(5, 4), f32(5), f32(2, 4), f32(5, 2), f32(5), 4.0,
                             (RNG.random((3, 4)) > 0.5) * 2.0)),
]


# every case on the engine's op, and the fused ops' cases again on their equations
RUNS = [(n, what, m, impl) for impl in ("kernel", "reference") for n, what, m in CASES
        if impl == "kernel" or n in ops.reference.__all__]


@pytest.mark.parametrize("name, make, impl", [(n, m, impl) for n, _, m, impl in RUNS],
                         ids=[f"{n}[{what}]-{impl}" if what else f"{n}-{impl}"
                              for n, what, _, impl in RUNS])
def test_op_keeps_float32_in_its_output_and_its_vjp(name, make, impl, monkeypatch):
    if impl == "reference":
        monkeypatch.setattr(ops, name, getattr(ops.reference, name))
    outs = make()
    for out in outs if isinstance(outs, list) else [outs]:
        assert out.dtype == np.float32, f"{name} returned {out.dtype}"
        g = RNG.standard_normal(out.shape).astype(np.float32)
        node = out.grad_fn
        for parent, grad in zip(node.parents, node.backward(g), strict=True):
            if grad is not None and parent is not None:  # each VJP in its input's dtype
                assert grad.dtype == parent.dtype, f"{name}: {grad.dtype} VJP for {parent.dtype}"


def test_astype_to_the_same_dtype_is_the_tensor_itself():
    """The one op that may return its input: no copy, no graph node (as numpy's copy=False)."""
    x = f32(2, 3)
    assert ops.astype(x, np.float32) is x


def test_every_op_is_in_the_float32_table():
    """A new op cannot skip the dtype check by being forgotten here."""
    assert {name for name, _, _ in CASES} == set(ops.__all__) - {"reference", "dropout_mask"}


def test_a_dropout_mask_has_the_dtype_asked_for_even_with_a_float64_p():
    mask = ops.dropout_mask((4, 5), np.float64(0.25), np.random.default_rng(0), np.float32)
    assert mask.dtype == np.float32 and set(np.unique(mask)) <= {0.0, np.float32(1 / 0.75)}


def test_a_float32_graph_backward_gives_float32_gradients_everywhere():
    """End to end through several ops, with retained non-leaf gradients."""
    x, w = f32(2, 3, 4), f32(5, 4)
    h = ops.gelu(ops.linear(x, w)).retain_grad()
    loss = ops.cross_entropy(ops.layer_norm(h, None, None), np.array([[0, 1, 2], [3, 4, 0]]))
    loss.backward()
    assert loss.dtype == np.float32
    assert x.grad.dtype == w.grad.dtype == h.grad.dtype == np.float32


def test_the_promotion_rule_the_docs_teach_holds_on_every_numpy_pyproject_allows():
    """docs/engine.md: a Python float keeps float32 float32, an np.float64 scalar does not. That
    is NumPy 2's rule (NEP 50); NumPy 1 kept float32 for both, so pyproject requires NumPy 2."""
    pyproject = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    floor = re.search(r'"numpy>=(\d+)', pyproject)
    assert floor and int(floor.group(1)) >= 2, "pyproject must require numpy>=2 (NEP 50)"
    x = np.ones(3, dtype=np.float32)
    assert (x * 2.0).dtype == np.float32 and (x + 1).dtype == np.float32
    assert (x * np.float64(2.0)).dtype == np.float64
