"""Every differentiable operation: forward and vector-Jacobian product side by side.

Primitives live in ``elementwise``, ``reduce``, ``shape`` and ``matmul``, each one short function
with its VJP. The fused ops (softmax and cross-entropy, layer norm, GELU, attention, the LoRA
linear) are written twice: as their equations in ``softmax``, ``normalization``, ``activation``,
``attention`` and ``lora_linear`` (gathered in :mod:`minilora.ops.reference`), and as the fast
kernels of :mod:`minilora.ops.backend`, behind the same signatures. The names exported here are the
kernels, which the engine runs; ``tests/ops/test_kernels.py`` holds each equal to its equation.
Llama's ops (``rms_norm``, ``rotary``, ``swiglu``, ``grouped_attention``) each hold a short
reference op and its fast version in one file, tested equal.
"""

from minilora.ops import reference
from minilora.ops.activation import dropout, dropout_mask
from minilora.ops.backend.activation import gelu
from minilora.ops.backend.attention import causal_self_attention, scaled_dot_product_attention
from minilora.ops.backend.lora_linear import lora_linear
from minilora.ops.backend.normalization import layer_norm
from minilora.ops.backend.softmax import cross_entropy
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
from minilora.ops.matmul import linear, matmul
from minilora.ops.reduce import max, mean, sum
from minilora.ops.rms_norm import rms_norm, rms_norm_reference
from minilora.ops.rotary import rotary_embedding, rotary_embedding_reference
from minilora.ops.shape import concatenate, getitem, reshape, split, stack, swapaxes, transpose
from minilora.ops.softmax import log_softmax, softmax
from minilora.ops.swiglu import silu, swiglu, swiglu_reference

__all__ = [
    "add", "astype", "causal_self_attention", "clip", "concatenate", "cross_entropy", "div",
    "dropout", "dropout_mask", "exp", "gelu", "getitem", "grouped_query_attention",
    "grouped_query_attention_reference", "layer_norm", "linear", "log", "log_softmax",
    "lora_linear", "masked_fill", "matmul", "max", "mean", "mul", "neg", "pow", "reference",
    "relu", "reshape", "rms_norm", "rms_norm_reference", "rotary_embedding",
    "rotary_embedding_reference", "scaled_dot_product_attention", "silu", "softmax", "split",
    "sqrt", "stack", "sub", "sum", "swapaxes", "swiglu", "swiglu_reference", "tanh", "transpose",
    "where",
]
