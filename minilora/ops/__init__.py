"""Every differentiable operation: forward and vector-Jacobian product side by side.

Primitives live in ``elementwise``, ``reduce``, ``shape`` and ``matmul``; fused kernels with
hand-written backward passes in ``softmax``, ``normalization``, ``activation``, ``attention`` and
``lora_linear``. Each fused kernel is tested against its composition of primitives. Llama's ops
(``rms_norm``, ``rotary``, ``swiglu``, ``grouped_attention``) each hold a short reference op and
its fast version, tested equal.
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
from minilora.ops.grouped_attention import (
    grouped_query_attention,
    grouped_query_attention_reference,
)
from minilora.ops.lora_linear import lora_linear
from minilora.ops.matmul import linear, matmul
from minilora.ops.normalization import layer_norm
from minilora.ops.reduce import max, mean, sum
from minilora.ops.rms_norm import rms_norm, rms_norm_reference
from minilora.ops.rotary import rotary_embedding, rotary_embedding_reference
from minilora.ops.shape import concatenate, getitem, reshape, split, stack, swapaxes, transpose
from minilora.ops.softmax import cross_entropy, log_softmax, softmax
from minilora.ops.swiglu import silu, swiglu, swiglu_reference

__all__ = [
    "add", "astype", "causal_self_attention", "clip", "concatenate", "cross_entropy", "div",
    "dropout", "exp", "gelu", "getitem", "grouped_query_attention",
    "grouped_query_attention_reference", "layer_norm", "linear", "log", "log_softmax",
    "lora_linear", "masked_fill", "matmul", "max", "mean", "mul", "neg", "pow", "relu", "reshape",
    "rms_norm", "rms_norm_reference", "rotary_embedding", "rotary_embedding_reference",
    "scaled_dot_product_attention", "silu", "softmax", "split", "sqrt", "stack", "sub", "sum",
    "swapaxes", "swiglu", "swiglu_reference", "tanh", "transpose", "where",
]
