"""Fixtures shared by the whole suite."""

from __future__ import annotations

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from minilora.ops import backend


@pytest.fixture(autouse=True, scope="session")
def one_blas_thread():
    """Tests use small products: OpenBLAS's threads only contend for the cores there (measured
    ~5 ms per small product on a busy 2-core machine), so the suite runs BLAS on one thread."""
    with threadpool_limits(1, user_api="blas"):
        yield


@pytest.fixture
def mm_calls() -> list[tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """Every matrix product the ops compute from here on, as (a.shape, b.shape, out.shape).

    Every product goes through ``backend.mm`` or, inside a fast kernel's blocks,
    ``backend.products.matmul``; ``backend.record_products`` sees both. Counting them shows which
    products a backward pass really runs: for a frozen weight, the one that would give its
    gradient must not be among them.
    """
    with backend.record_products() as products:
        yield _WithOutputs(products)


class _WithOutputs(list):
    """A live view of recorded (a.shape, b.shape) pairs, each with the product's shape added."""

    def __init__(self, products):
        super().__init__()
        self._products = products

    def _rows(self):
        return [(a, b, (*np.broadcast_shapes(a[:-2], b[:-2]), a[-2], b[-1]))
                for a, b in self._products]

    def __len__(self):
        return len(self._products)

    def __getitem__(self, i):
        return self._rows()[i]

    def __iter__(self):
        return iter(self._rows())


@pytest.fixture
def graph_nodes(monkeypatch) -> list[int]:
    """One entry for every graph node made from here on: empty after code that builds none."""
    from minilora.tensor import Node

    made: list[int] = []
    init = Node.__init__

    def counting_init(self, *args, **kwargs):
        made.append(1)
        init(self, *args, **kwargs)

    monkeypatch.setattr(Node, "__init__", counting_init)
    return made
