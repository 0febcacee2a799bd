"""Every differentiable operation: forward and vector-Jacobian product side by side.

Primitives live in ``elementwise``, ``reduce``, ``shape`` and ``matmul``; fused kernels with
hand-written backward passes in ``softmax``, ``normalization``, ``activation``, ``attention`` and
``lora_linear``. Each fused kernel is tested against its composition of primitives.
"""

from minilora.ops.activation import dropout, gelu
from minilora.ops.attention import causal_self_attention, scaled_dot_product_attention
from minilora.ops.elementwise import (
    add,
    astype,
    clip,
    div,
    exp,
    log,
    masked_fill,
    mul,
    neg,
    pow,
    relu,
    sqrt,
    sub,
    tanh,
    where,
)
from minilora.ops.lora_linear import lora_linear
from minilora.ops.matmul import linear, matmul
from minilora.ops.normalization import layer_norm
from minilora.ops.reduce import max, mean, sum
from minilora.ops.shape import concatenate, getitem, reshape, split, stack, swapaxes, transpose
from minilora.ops.softmax import cross_entropy, log_softmax, softmax

__all__ = [
    "add", "astype", "causal_self_attention", "clip", "concatenate", "cross_entropy", "div",
    "dropout", "exp", "gelu", "getitem", "layer_norm", "linear", "log", "log_softmax",
    "lora_linear", "masked_fill", "matmul", "max", "mean", "mul", "neg", "pow", "relu", "reshape",
    "scaled_dot_product_attention", "softmax", "split", "sqrt", "stack", "sub", "sum", "swapaxes",
    "tanh", "transpose", "where",
]
