"""Matrix products: how each one runs, and how they are counted.

Every product the engine computes goes through this module. [`mm`][] computes a whole product:
plain ``np.matmul``, or, inside ``runtime.parallel``, fixed blocks shared by the engine's threads
(NumPy releases the GIL inside BLAS). ``matmul`` is the product a fused kernel computes on one of
its blocks. [`record_products`][] collects the shapes of both: how the benchmark counts a step's
FLOPs, and how the tests see that a frozen weight costs no product.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator

import numpy as np

from minilora import runtime
from minilora.ops.backend.blocks import for_blocks

# Products below this many multiply-adds run whole: handing half to the pool costs more than it
# saves (docs/performance.md#what-the-engine-does).
SPLIT_MIN_MACS = 1 << 24
# A split product is cut into this many blocks at most (enough for 2 or 4 threads; more cost
# time on 2 cores), and into blocks of MIN_BLOCK_MACS at least.
MAX_PRODUCT_BLOCKS = 4
MIN_BLOCK_MACS = 1 << 23

_recorder: list | None = None  # inside record_products(): every product's (a.shape, b.shape)


def _recording_matmul(a: np.ndarray, b: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    _recorder.append((a.shape, b.shape))
    return np.matmul(a, b, out=out)


# The product of a fused kernel's block, called as ``products.matmul``: np.matmul itself (no cost
# per block), or inside record_products() the version that also records the shapes.
matmul = np.matmul


@contextlib.contextmanager
def record_products() -> Iterator[list[tuple[tuple[int, ...], tuple[int, ...]]]]:
    """Collect the (a.shape, b.shape) of every product computed inside, whole or per block."""
    global _recorder, matmul
    previous = _recorder, matmul
    _recorder, matmul = [], _recording_matmul
    try:
        yield _recorder
    finally:
        _recorder, matmul = previous


def note_product(a_shape: tuple[int, ...], b_shape: tuple[int, ...]) -> None:
    """Deprecated: record a product a kernel computed with plain np.matmul. Compute it with
    ``products.matmul`` instead, which is counted where it runs."""
    warnings.warn("ops.backend.note_product is deprecated; compute block products with "
                  "ops.backend.products.matmul", DeprecationWarning, stacklevel=2)
    if _recorder is not None:
        _recorder.append((tuple(a_shape), tuple(b_shape)))


def block_size(length: int, macs: int) -> int:
    """Rows (or columns) per block of a split product of ``macs`` multiply-adds, cut along an
    axis of ``length``.

    A function of the shape alone, never of the thread count: BLAS rounds a row differently
    depending on where it falls in a call (OpenBLAS's Haswell sgemm works in tiles of 24 rows,
    and the rows of a call's narrower last tile round differently; its SkylakeX small-matrix
    kernels differ by shape too), so only the same calls with the same shapes give the same bits.
    Cut into fixed blocks, a product makes the same calls on 1, 2 or 8 threads.
    """
    parts = max(1, min(MAX_PRODUCT_BLOCKS, length, macs // MIN_BLOCK_MACS))
    return -(-length // parts)


def mm(a: np.ndarray, b: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """a: (..., n, k) @ b: (..., k, m) [+ bias: (m,)] -> (..., n, m), batch axes broadcast as in
    ``np.matmul``. Inside ``runtime.parallel`` a large product runs as fixed blocks (of a stack's
    matrices, or of the longer of the result's two sides) shared by the engine's threads, each
    block adding the bias as soon as it is computed, on its own thread."""
    if _recorder is not None:
        _recorder.append((a.shape, b.shape))
    if not runtime.splits_products() or a.ndim < 2 or b.ndim < 2:
        return _plus(np.matmul(a, b), bias)
    n, k, m = a.shape[-2], a.shape[-1], b.shape[-1]
    batch = () if a.ndim == b.ndim == 2 else np.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    macs = math.prod(batch) * n * k * m
    if macs < SPLIT_MIN_MACS:
        return _plus(np.matmul(a, b), bias)
    out = np.empty((*batch, n, m), dtype=np.result_type(a, b))
    if a.ndim == b.ndim > 2 and a.shape[0] == b.shape[0] > 1:
        def work(lo, hi):  # split the leading batch axis: each block a stack of whole products
            _plus(np.matmul(a[lo:hi], b[lo:hi], out=out[lo:hi]), bias)

        for_blocks(work, a.shape[0], block_size(a.shape[0], macs))
    elif m > n:
        def work(lo, hi):  # split the columns: each block packs all of a but only its part of b
            _plus(np.matmul(a, b[..., lo:hi], out=out[..., lo:hi]),
                  None if bias is None else bias[lo:hi])

        for_blocks(work, m, block_size(m, macs))
    else:
        def work(lo, hi):  # split the rows: each block packs all of b but only its part of a
            _plus(np.matmul(a[..., lo:hi, :], b, out=out[..., lo:hi, :]), bias)

        for_blocks(work, n, block_size(n, macs))
    return out


def _plus(out: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    if bias is not None:
        out += bias
    return out


def swap(x: np.ndarray) -> np.ndarray:
    """The last two axes exchanged (a view): ``x^T`` for a matrix, per batch for a stack."""
    return np.swapaxes(x, -1, -2)
