"""Where the heavy array work goes: matrix products, and how they are counted.

Every matmul in the engine, forward or backward, goes through :func:`mm` (or, inside a fused
kernel's blocks, is announced with :func:`note_product`). By default that is plain ``np.matmul``.
Inside ``minilora.runtime.parallel`` (which the training loop and the benchmark enter), BLAS is
limited to one thread and each large product is split into row blocks computed by the engine's
thread pool instead (NumPy releases the GIL inside BLAS). See ``minilora.runtime`` for why.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import numpy as np

from minilora import runtime

# Products below this many multiply-adds run on one thread: handing half to the pool costs
# ~150-200 us, measured on 2 cores; at 12.6M MACs splitting lost (81 vs 88 GFLOP/s), at 37.7M it won
# (115-137 vs 93).
SPLIT_MIN_MACS = 1 << 24

_recorder: list | None = None  # when a list, every product's (a.shape, b.shape) is appended


@contextlib.contextmanager
def record_products() -> Iterator[list[tuple[tuple[int, ...], tuple[int, ...]]]]:
    """Collect the (a.shape, b.shape) of every product computed inside: how the benchmark counts
    a step's FLOPs, and how the tests see that a frozen weight costs no product."""
    global _recorder
    previous, _recorder = _recorder, []
    try:
        yield _recorder
    finally:
        _recorder = previous


def note_product(a_shape: tuple[int, ...], b_shape: tuple[int, ...]) -> None:
    """Record a product that a fused kernel computes itself (inside worker threads)."""
    if _recorder is not None:
        _recorder.append((tuple(a_shape), tuple(b_shape)))


def mm(a: np.ndarray, b: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """a: (..., n, k) @ b: (..., k, m) [+ bias: (m,)] -> (..., n, m), batch axes broadcast as in
    ``np.matmul``. A split product adds the bias to each block as soon as it is computed, on the
    block's own thread, rather than in one more pass over the whole result afterwards."""
    if _recorder is not None:
        _recorder.append((a.shape, b.shape))
    threads = runtime.threads()
    if threads == 1 or a.ndim < 2 or b.ndim < 2:
        return _plus(np.matmul(a, b), bias)
    n, k, m = a.shape[-2], a.shape[-1], b.shape[-1]
    batch = () if a.ndim == b.ndim == 2 else np.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    if math.prod(batch) * n * k * m < SPLIT_MIN_MACS:
        return _plus(np.matmul(a, b), bias)
    out = np.empty((*batch, n, m), dtype=np.result_type(a, b))
    if a.ndim == b.ndim > 2 and a.shape[0] == b.shape[0] >= threads:
        def work(lo, hi):  # split the leading batch axis: each block a stack of whole products
            _plus(np.matmul(a[lo:hi], b[lo:hi], out=out[lo:hi]), bias)

        runtime.run_split(work, a.shape[0])
    else:
        def work(lo, hi):  # split the rows of the product
            _plus(np.matmul(a[..., lo:hi, :], b, out=out[..., lo:hi, :]), bias)

        runtime.run_split(work, n)
    return out


def _plus(out: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    if bias is not None:
        out += bias
    return out


def swap(x: np.ndarray) -> np.ndarray:
    """The last two axes exchanged (a view): ``x^T`` for a matrix, per batch for a stack."""
    return np.swapaxes(x, -1, -2)
