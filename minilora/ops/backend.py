"""Where the heavy array work goes: matrix products.

Every matmul in the engine, forward or backward, goes through :func:`mm`, so the way products are
computed (plain ``np.matmul`` here) can be tuned in one place without touching any op.
"""

from __future__ import annotations

import numpy as np


def mm(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a: (..., n, k) @ b: (..., k, m) -> (..., n, m), batch axes broadcast as in ``np.matmul``."""
    return np.matmul(a, b)


def swap(x: np.ndarray) -> np.ndarray:
    """The last two axes exchanged (a view): ``x^T`` for a matrix, per batch for a stack."""
    return np.swapaxes(x, -1, -2)
