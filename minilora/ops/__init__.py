"""Every differentiable operation: forward and vector-Jacobian product side by side.

Primitives live in ``elementwise``, ``reduce``, ``shape`` and ``matmul``, each one short function
with its VJP. The fused ops (softmax and cross-entropy, layer norm, GELU, attention, the LoRA
linear, the final layer norm with ``lm_head`` and cross-entropy, and Llama's RMSNorm, rotary
embedding, SwiGLU and grouped-query attention) are written twice: as their equations in
``softmax``, ``normalization``, ``activation``, ``attention``, ``lora_linear``, ``lm_head``,
``rms_norm``, ``rotary``, ``swiglu`` and ``grouped_attention`` (gathered in
[`minilora.ops.reference`][]), and as the fast kernels of [`minilora.ops.backend`][], behind the
same signatures. The names exported here are the kernels, which the engine runs;
``tests/ops/test_kernels.py`` holds each equal to its equation. The paths of the other adapters
(``lora_slices``: an adapter on slices of a fused projection, or one of several on a layer;
``lora_embedding``: LoRA on an embedding; ``dora_linear``: DoRA's layer, in ``dora``) are their
equations alone: no hot path needs more.
"""

from minilora.ops import reference
from minilora.ops.activation import dropout, dropout_mask
from minilora.ops.backend.activation import gelu
from minilora.ops.backend.attention import causal_self_attention, scaled_dot_product_attention
from minilora.ops.backend.grouped_attention import grouped_query_attention
from minilora.ops.backend.lm_head import lm_head_cross_entropy
from minilora.ops.backend.lora_linear import lora_linear
from minilora.ops.backend.normalization import layer_norm
from minilora.ops.backend.rms_norm import rms_norm
from minilora.ops.backend.rotary import rotary_embedding
from minilora.ops.backend.softmax import cross_entropy
from minilora.ops.backend.swiglu import swiglu
from minilora.ops.dora import dora_linear
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
from minilora.ops.lora_embedding import lora_embedding
from minilora.ops.lora_linear import lora_slices
from minilora.ops.matmul import linear, matmul
from minilora.ops.reduce import max, mean, sum
from minilora.ops.shape import concatenate, getitem, reshape, split, stack, swapaxes, transpose
from minilora.ops.softmax import log_softmax, softmax
from minilora.ops.swiglu import silu

__all__ = [
    "add", "astype", "causal_self_attention", "clip", "concatenate", "cross_entropy", "div",
    "dora_linear",
    "dropout", "dropout_mask", "exp", "gelu", "getitem", "grouped_query_attention", "layer_norm",
    "linear", "lm_head_cross_entropy", "log", "log_softmax", "lora_embedding", "lora_linear",
    "lora_slices", "masked_fill", "matmul", "max", "mean", "mul", "neg", "pow", "reference",
    "relu", "reshape", "rms_norm", "rotary_embedding", "scaled_dot_product_attention", "silu",
    "softmax", "split", "sqrt", "stack", "sub", "sum", "swapaxes", "swiglu", "tanh", "transpose",
    "where",
]
