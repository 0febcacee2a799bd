"""The two references a step is measured against, each taking its turn with the steps: NumPy
doing the step's products (the limit) and the same model in PyTorch (the peer)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from minilora.bench.step import LORA, BenchConfig
from minilora.errors import BenchmarkError

# OpenBLAS's threads spin for ~0.11 s after a threaded product (measured: a process sleeping
# 0.1 s after one used 100 ms of CPU, 0.4 s after one 112 ms); the benchmark waits them out.
OPENBLAS_SPIN_S = 0.15


class NumpyLimit:
    """NumPy's own float32 matmul doing exactly the products of a step: the limit.

    Each distinct shape runs at its best of BLAS's own threads and one BLAS thread (on a busy
    machine BLAS threads lose badly on small products, and the limit should be the best NumPy
    can do), picked once by timing both. [`seconds`][] then computes all of the step's
    products back to back on fresh contiguous arrays, so that the benchmark can take it in turn
    with the steps and the machine's drift stays out of the ratio.
    """

    def __init__(self, products, threads: int, min_seconds: float = 0.05):
        counts: dict[tuple, int] = {}
        for sa, sb in products:
            counts[(sa, sb)] = counts.get((sa, sb), 0) + 1
        rng = np.random.default_rng(0)
        self.threads = threads
        self._by_threads: dict[int, list] = {1: [], threads: []}  # BLAS threads -> (a, b, count)
        for (sa, sb), count in counts.items():
            a = rng.standard_normal(sa, dtype=np.float32)
            b = rng.standard_normal(sb, dtype=np.float32)
            seconds = {}
            for limit in self._by_threads:
                with threadpool_limits(limit, user_api="blas"):
                    seconds[limit] = _seconds_per_call(lambda a=a, b=b: np.matmul(a, b),
                                                       min_seconds)
            self._by_threads[min(seconds, key=seconds.get)].append((a, b, count))

    @property
    def uses_blas_threads(self) -> bool:
        """Whether some product runs on BLAS's own threads (which then spin for a while)."""
        return self.threads > 1 and bool(self._by_threads[self.threads])

    def seconds(self) -> float:
        """Seconds NumPy takes for all the products of one step."""
        t0 = time.perf_counter()
        for limit, products in self._by_threads.items():
            with threadpool_limits(limit, user_api="blas"):
                for a, b, count in products:
                    for _ in range(count):
                        np.matmul(a, b)
        return time.perf_counter() - t0


def busy_wait(seconds: float) -> None:
    """Wait without sleeping: a virtual machine left idle is slow to wake up again (measured:
    config A's first step after a 0.15 s sleep took 94 ms, against 70 after a busy wait)."""
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        pass


def _seconds_per_call(fn, min_seconds: float) -> float:
    fn()
    reps, elapsed = 0, 0.0
    t0 = time.perf_counter()
    while elapsed < min_seconds or reps < 3:
        fn()
        reps += 1
        elapsed = time.perf_counter() - t0
    return elapsed / reps


def torch_peer_path() -> tuple[Path | None, str]:
    """Where ``benchmarks/torch_peer.py`` is, or (None, why it cannot run)."""
    if importlib.util.find_spec("torch") is None:
        return None, "PyTorch is not installed (pip install torch)"
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "torch_peer.py"
    if not path.exists():
        return None, f"the PyTorch peer lives in the source tree ({path.name} not found)"
    return path, ""


class TorchPeer:
    """The PyTorch peer in a process of its own (``benchmarks/torch_peer.py``), stepping on
    request so that its steps alternate with ours. A context manager."""

    def __init__(self, path: Path, cfg: BenchConfig, warmup: int, threads: int):
        self._proc = subprocess.Popen(
            [sys.executable, str(path), json.dumps(asdict(cfg)), json.dumps(LORA), str(warmup),
             str(threads)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        self._expect("ready")

    def step_pair(self) -> dict[str, float]:
        """One full and one LoRA step of the peer: {"full": seconds, "lora": seconds}."""
        self._proc.stdin.write("step\n")
        self._proc.stdin.flush()
        return json.loads(self._expect(None))

    def _expect(self, word: str | None) -> str:
        line = self._proc.stdout.readline().strip()
        if not line or (word is not None and line != word):
            self.close()
            raise BenchmarkError(f"{self._proc.args[1]}: the PyTorch peer stopped (exit code "
                                 f"{self._proc.returncode}) instead of answering "
                                 f"{word or 'a step'}")
        return line

    def close(self) -> None:
        if self._proc.stdin and not self._proc.stdin.closed:
            self._proc.stdin.close()
        self._proc.wait()

    def __enter__(self) -> TorchPeer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
