"""The machinery behind the ops: fast kernels, and how products and blocks run.

The reference ops in ``minilora.ops`` (``softmax.py``, ``normalization.py``, ``activation.py``,
``attention.py``, ``lora_linear.py``, ``lm_head.py``, ``rms_norm.py``, ``rotary.py``, ``swiglu.py``,
``grouped_attention.py``) are the equations and their vector-Jacobian products, and
nothing else. Here, behind the same signatures, are the versions the engine runs: row blocks on the
engine's threads, temporaries that stay in cache, saved arrays pruned to what the wanted gradients
use. ``tests/ops/test_kernels.py`` holds each equal to its reference, in value and gradient.

- ``products``: every matrix product (``mm`` whole, ``matmul`` per block) and their count.
- ``blocks``: cutting a kernel's work into blocks fixed by the shape, shared by the threads.
- ``activation``, ``attention``, ``lm_head``, ``lora_linear``, ``normalization``, ``softmax``,
  ``rms_norm``, ``rotary``, ``swiglu``, ``grouped_attention``: the kernels, one file per
  reference file, named alike.
"""

from minilora.ops.backend.products import (
    MAX_PRODUCT_BLOCKS,
    MIN_BLOCK_MACS,
    SPLIT_MIN_MACS,
    block_size,
    mm,
    note_product,
    record_products,
    swap,
)

__all__ = ["MAX_PRODUCT_BLOCKS", "MIN_BLOCK_MACS", "SPLIT_MIN_MACS", "block_size", "mm",
           "note_product", "record_products", "swap"]
