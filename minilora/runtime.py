"""How minilora uses the machine: the engine's threads, the step's threading policy, glibc's malloc.

[`parallel`][] is the one switch: inside it, BLAS runs on one thread and the engine's own small
pool shares out large products and the blocks of the fast kernels (``minilora.ops.backend``). It is
scoped: the previous BLAS thread count is restored on exit. [`step_threading`][] picks, for a
training step of a given size, between that and letting BLAS thread the products itself; the
training loop and the benchmark use it. [`tune_malloc`][] is process-wide and only the
``minilora`` command calls it; a program may. Why each choice, with the measurements:
docs/performance.md#what-the-engine-does.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

from threadpoolctl import threadpool_limits

_pool: ThreadPoolExecutor | None = None
_threads = 1
_splitting = False  # inside parallel() without blas=True: products run as fixed blocks
malloc_tuned = False  # set by tune_malloc()


@contextlib.contextmanager
def parallel(threads: int | None = None, blas: bool = False) -> Iterator[None]:
    """Scoped multi-threading for the engine: one BLAS thread, the work shared over ``threads``.

    threads: how many to use (default: the number of CPUs). The previous BLAS thread count and
    the previous setting are restored on exit, so minilora changes nothing outside this block.
    blas: instead, let BLAS thread every product itself and run the engine's kernels on one
    thread. Faster when every product is small (see [`step_threading`][]), slower otherwise.
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


SMALL_STEP_MACS = 1 << 26  # below this, a step's largest product is "small": see step_threading


def step_threading(largest_product: int, threads: int | None = None):
    """[`parallel`][] as a step of this size runs fastest: ``largest_product`` is the
    multiply-adds of the step's largest matrix product (tokens x in x out of its widest layer).

    A step whose products are all small (under 64M multiply-adds) lets BLAS thread them: their
    kernels last about what handing half to a sleeping thread costs. A larger step runs on the
    engine's threads, whose fixed blocks also give the same bits on any number of threads. The
    choice is made for the whole step: mixing the two was slower.
    """
    return parallel(threads, blas=lets_blas_thread(largest_product))


def parallel_for(largest_product: int, threads: int | None = None):
    """Deprecated name of [`step_threading`][] (it chooses a threading policy; it is no loop)."""
    warnings.warn("minilora.runtime.parallel_for is deprecated; use step_threading",
                  DeprecationWarning, stacklevel=2)
    return step_threading(largest_product, threads)


def lets_blas_thread(largest_product: int) -> bool:
    """Whether [`step_threading`][] hands a step with this largest product to BLAS's threads."""
    return largest_product < SMALL_STEP_MACS


def threads() -> int:
    """How many threads products use right now (1 outside [`parallel`][])."""
    return _threads


def splits_products() -> bool:
    """Whether large products run as fixed blocks on the engine's threads: inside
    [`parallel`][] (on any number of threads, one included), not with ``blas=True``."""
    return _splitting


def run_split(work, n: int) -> None:
    """Call ``work(start, stop)`` on ``threads()`` contiguous parts of ``range(n)`` in parallel."""
    parts = min(_threads, n)
    if _pool is None or parts <= 1:
        work(0, n)
        return
    bounds = [n * i // parts for i in range(parts + 1)]  # plain integers: np.linspace costs more
    futures = [_pool.submit(work, lo, hi) for lo, hi in itertools.pairwise(bounds[1:])]
    work(0, bounds[1])  # the calling thread takes the first part
    for f in futures:
        f.result()


def tune_malloc(mmap_threshold: int = 1 << 30, trim_threshold: int = 1 << 31) -> bool:
    """Keep freed array memory in the process instead of handing it back to the OS (glibc only).

    A training step frees and re-allocates the same large arrays every time; by default glibc maps
    each one afresh and unmaps it when freed, so every step page-faults all of its memory again.

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


_MOVED_TO_BLOCKS = ("for_blocks", "for_each", "rows_per_block", "sum_in_order", "BLOCK_ELEMENTS",
                    "MIN_BLOCK_ELEMENTS", "MIN_BLOCKS")


def __getattr__(name: str):
    """The kernels' blocking helpers moved to ``minilora.ops.backend.blocks``: old names warn."""
    if name in _MOVED_TO_BLOCKS:
        from minilora.ops.backend import blocks

        warnings.warn(f"minilora.runtime.{name} moved to minilora.ops.backend.blocks.{name}",
                      DeprecationWarning, stacklevel=2)
        return getattr(blocks, name)
    raise AttributeError(f"module 'minilora.runtime' has no attribute {name!r}")
