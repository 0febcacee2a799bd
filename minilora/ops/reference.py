"""The fused ops as their equations: forward and vector-Jacobian product in a few lines each.

These are what the docs derive and what a reader checks their own code against. The engine runs
the fast kernels of ``minilora.ops.backend`` (exported as ``minilora.ops.gelu`` and so on), which
take the same arguments and give the same numbers to round-off (``tests/ops/test_kernels.py``).
Softmax, log-softmax and SiLU have no kernel: no hot path calls them; DoRA's ``dora_linear``
has none yet: its equation is what the layer runs.
"""

from minilora.ops.activation import gelu
from minilora.ops.attention import causal_self_attention, scaled_dot_product_attention
from minilora.ops.dora import dora_linear
from minilora.ops.grouped_attention import grouped_query_attention
from minilora.ops.lm_head import lm_head_cross_entropy
from minilora.ops.lora_embedding import lora_embedding
from minilora.ops.lora_linear import lora_linear, lora_slices
from minilora.ops.normalization import layer_norm
from minilora.ops.rms_norm import rms_norm
from minilora.ops.rotary import rotary_embedding
from minilora.ops.softmax import cross_entropy, log_softmax, softmax
from minilora.ops.swiglu import silu, swiglu

__all__ = ["causal_self_attention", "cross_entropy", "dora_linear", "gelu",
           "grouped_query_attention", "layer_norm", "lm_head_cross_entropy", "log_softmax",
           "lora_embedding", "lora_linear",
           "lora_slices", "rms_norm", "rotary_embedding", "scaled_dot_product_attention", "silu",
           "softmax", "swiglu"]
