"""How the fast kernels cut their work: blocks fixed by the array's shape, shared by the threads.

A kernel hands [`for_blocks`][] a function of ``(start, stop)``; the blocks run on the engine's
threads (``runtime.run_split``), one thread outside ``runtime.parallel``. The blocks never depend on
the number of threads, so per-block partial sums added in block order ([`sum_in_order`][]) give
the same bits on 1 thread or 8.
"""

from __future__ import annotations

import numpy as np

from minilora import runtime

BLOCK_ELEMENTS = 1 << 19  # 2 MiB of float32 per temporary: L3-resident, few calls per thread
MIN_BLOCK_ELEMENTS = 1 << 17  # below this a block costs more to hand to a thread than it saves
MIN_BLOCKS = 4  # a large enough array is cut into at least this many blocks


def rows_per_block(n_rows: int, row_elements: int, target_elements: int = BLOCK_ELEMENTS) -> int:
    """How many of ``n_rows`` rows of ``row_elements`` make one block of a fused kernel.

    About ``target_elements`` per block, at least ``MIN_BLOCK_ELEMENTS``, and at least
    ``MIN_BLOCKS`` blocks when the array is large enough: smaller blocks spend their time in
    per-call overhead, larger ones leave too few to share (docs/performance.md, "What the engine
    does").
    The answer never depends on the number of threads, so neither do the bits of a per-block sum.
    """
    row_elements = max(1, row_elements)
    most = max(1, target_elements // row_elements)
    least = -(-MIN_BLOCK_ELEMENTS // row_elements)
    return min(most, max(least, -(-n_rows // MIN_BLOCKS)))


def for_each(work, items) -> None:
    """Call ``work(item)`` for every item, the items shared out in order between the threads."""
    items = list(items)

    def chunk(lo, hi):
        for item in items[lo:hi]:
            work(item)

    runtime.run_split(chunk, len(items))


def for_blocks(work, n: int, block: int) -> None:
    """Call ``work(start, stop)`` for the blocks ``[0, block), [block, 2 block), ...`` of
    ``range(n)``, the blocks shared out between the threads.

    Fused kernels use it so that their temporaries stay in cache (and small enough for malloc to
    reuse rather than map afresh).
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
