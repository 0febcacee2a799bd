"""How minilora uses the machine: threads for the engine's kernels, and glibc's malloc.

:func:`parallel` is the one switch: inside it, BLAS runs on one thread and the engine's own small
pool shares out large products (``ops.backend.mm``) and the blocks of fused kernels (GELU, layer
norm, attention, the LoRA adapter, the optimizer's update). It is scoped: the previous BLAS thread
count is restored on exit. A step whose products are all small does better with BLAS's own
threads; :func:`parallel_for` picks one or the other for a step of a given size, and the training
loop and the benchmark use it. :func:`tune_malloc` is process-wide and only the ``minilora``
command calls it; a program may.

Measured on a 2-core machine:

- OpenBLAS's own threads cost ~5 ms per *small* product when the cores are busy (they spin and
  contend); single-threaded, small products are cheap.
- On its own, a large product is faster with OpenBLAS's two threads (170-185 GFLOP/s against
  90-180 for two single-threaded halves), but in a training step its threads keep spinning after
  each call and halve the speed of the attention, GELU and layer-norm kernels that follow (config
  B, full step: 2.46 s with BLAS threads, 2.05 s with our split, the products as fast in both).
"""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from threadpoolctl import threadpool_limits

_pool: ThreadPoolExecutor | None = None
_threads = 1
_splitting = False  # inside parallel() without blas=True: products run as fixed row blocks
malloc_tuned = False  # set by tune_malloc()


@contextlib.contextmanager
def parallel(threads: int | None = None, blas: bool = False) -> Iterator[None]:
    """Scoped multi-threading for the engine: one BLAS thread, the work shared over ``threads``.

    threads: how many to use (default: the number of CPUs). The previous BLAS thread count and
    the previous setting are restored on exit, so minilora changes nothing outside this block.
    blas: instead, let BLAS thread every product itself and run the engine's kernels on one
    thread. Faster when every product is small (see :func:`parallel_for`), slower otherwise.
    """
    global _pool, _threads, _splitting
    threads = max(1, int(threads or os.cpu_count() or 1))
    previous = (_pool, _threads, _splitting)
    pool = ThreadPoolExecutor(threads - 1, thread_name_prefix="minilora-mm") \
        if threads > 1 and not blas else None
    with threadpool_limits(threads if blas else 1, user_api="blas"):
        _pool, _threads, _splitting = pool, 1 if blas else threads, not blas
        try:
            yield
        finally:
            _pool, _threads, _splitting = previous
            if pool is not None:
                pool.shutdown()


SMALL_STEP_MACS = 1 << 26  # below this, a step's largest product is "small": see parallel_for


def parallel_for(largest_product: int, threads: int | None = None):
    """:func:`parallel` as a step of this size runs fastest: ``largest_product`` is the
    multiply-adds of the step's largest matrix product (tokens x in x out of its widest layer).

    A step whose products are all small (under 64M multiply-adds) lets BLAS thread them: their
    kernels last 0.1-0.5 ms, about what handing half to a sleeping thread costs (72-200 us), and
    OpenBLAS's threads spin between calls instead of sleeping. Measured on an AVX-512 machine:
    config A of the benchmark 9-13% faster per step (full and LoRA), and mixing the two (BLAS's
    threads for the small products of a large model) made config B 4-6% slower, so the choice is
    made for the whole step.
    """
    return parallel(threads, blas=lets_blas_thread(largest_product))


def lets_blas_thread(largest_product: int) -> bool:
    """Whether :func:`parallel_for` hands a step with this largest product to BLAS's threads."""
    return largest_product < SMALL_STEP_MACS


def threads() -> int:
    """How many threads products use right now (1 outside :func:`parallel`)."""
    return _threads


def splits_products() -> bool:
    """Whether large products run as fixed row blocks on the engine's threads: inside
    :func:`parallel` (on any number of threads, one included), not with ``blas=True``."""
    return _splitting


def run_split(work, n: int) -> None:
    """Call ``work(start, stop)`` on ``_threads`` contiguous blocks of ``range(n)`` in parallel."""
    parts = min(_threads, n)
    if _pool is None or parts <= 1:
        work(0, n)
        return
    bounds = [n * i // parts for i in range(parts + 1)]  # integers: np.linspace costs ~15 us
    futures = [_pool.submit(work, lo, hi) for lo, hi in itertools.pairwise(bounds[1:])]
    work(0, bounds[1])  # the calling thread takes the first block
    for f in futures:
        f.result()


def for_each(work, items) -> None:
    """Call ``work(item)`` for every item, the items shared out in order between the threads."""
    items = list(items)

    def chunk(lo, hi):
        for item in items[lo:hi]:
            work(item)

    run_split(chunk, len(items))


def for_blocks(work, n: int, block: int) -> None:
    """Call ``work(start, stop)`` for the blocks ``[0, block), [block, 2 block), ...`` of
    ``range(n)``, the blocks shared out between the threads.

    Fused elementwise kernels use it so that their temporaries stay in cache (and small enough for
    malloc to reuse rather than map afresh). The blocks do not depend on the number of threads, so
    per-block partial sums, added in block order, give the same bits on 1 thread or 8.
    """
    block = max(1, int(block))
    for_each(lambda start: work(start, min(start + block, n)), range(0, n, block))


def sum_in_order(parts: dict, empty: np.ndarray) -> np.ndarray:
    """The sum of per-block partial sums ({block start: array}) added in block order, so the
    bits do not depend on which thread finished first; ``empty`` if there were no blocks."""
    keys = sorted(parts)
    if not keys:
        return empty
    total = parts[keys[0]].copy()
    for key in keys[1:]:
        total += parts[key]
    return total


BLOCK_ELEMENTS = 1 << 19  # 2 MiB of float32 per temporary: L3-resident, few calls per thread
MIN_BLOCK_ELEMENTS = 1 << 17  # below this a block costs more to hand to a thread than it saves
MIN_BLOCKS = 4  # a large enough array is cut into at least this many blocks


def rows_per_block(n_rows: int, row_elements: int, target_elements: int = BLOCK_ELEMENTS) -> int:
    """How many of ``n_rows`` rows of ``row_elements`` make one block of a fused kernel.

    About ``target_elements`` per block, at least ``MIN_BLOCK_ELEMENTS``, and at least
    ``MIN_BLOCKS`` blocks when the array is large enough. Measured on 2 cores: at config B's sizes,
    2^15-element blocks (an L2 cache) spent their time in per-call overhead and the lock each
    NumPy call takes, and barely used the second thread; 2^19 ran GELU, layer norm and attention
    2-3x faster; 2^21 left too few blocks to share. At config A's sizes, handing 2^15-element
    blocks of layer norm to a second thread made it twice as slow as one thread. The answer never
    depends on the number of threads, so neither do the bits of a per-block sum.
    """
    row_elements = max(1, row_elements)
    most = max(1, target_elements // row_elements)
    least = -(-MIN_BLOCK_ELEMENTS // row_elements)
    return min(most, max(least, -(-n_rows // MIN_BLOCKS)))


def tune_malloc(mmap_threshold: int = 1 << 30, trim_threshold: int = 1 << 31) -> bool:
    """Keep freed array memory in the process instead of handing it back to the OS (glibc only).

    A training step frees and re-allocates the same large arrays every time; by default glibc maps
    each one afresh and unmaps it when freed, so every step page-faults all of its memory again.
    Measured on config B of the benchmark (2-core machine): ~42,000 page faults per step, and
    ~1.4x the CPU time per full step and ~1.6x per LoRA step, before this call; ~0 after.

    Process-wide and not undoable (it fixes glibc's otherwise adaptive thresholds), so the library
    never calls it on its own: the ``minilora`` command does, and a program may. Returns True if
    the settings took effect.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to tune
        return False
    global malloc_tuned
    m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
    malloc_tuned = bool(mallopt(m_mmap_threshold, int(mmap_threshold))) and \
        bool(mallopt(m_trim_threshold, int(trim_threshold)))
    return malloc_tuned
