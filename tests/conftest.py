"""Fixtures shared by the whole suite."""

from __future__ import annotations

import importlib
import pkgutil

import pytest
from threadpoolctl import threadpool_limits

import minilora.ops
from minilora.ops import backend


@pytest.fixture(autouse=True, scope="session")
def one_blas_thread():
    """Tests use small products: OpenBLAS's threads only contend for the cores there (measured
    ~5 ms per small product on a busy 2-core machine), so the suite runs BLAS on one thread."""
    with threadpool_limits(1, user_api="blas"):
        yield


@pytest.fixture
def mm_calls(monkeypatch) -> list[tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """Every matrix product the ops compute from here on, as (a.shape, b.shape, out.shape).

    All matmuls go through ``minilora.ops.backend.mm`` (imported by name into each op module), so
    counting them shows which products a backward pass really runs: for a frozen weight, the one
    that would give its gradient must not be among them.
    """
    calls = []
    real = backend.mm

    def counting_mm(a, b):
        out = real(a, b)
        calls.append((a.shape, b.shape, out.shape))
        return out

    for info in pkgutil.iter_modules(minilora.ops.__path__, "minilora.ops."):
        module = importlib.import_module(info.name)
        if getattr(module, "mm", None) is real:
            monkeypatch.setattr(module, "mm", counting_mm)
    return calls
