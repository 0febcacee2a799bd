"""``minilora bench``: training-step speed and memory against the machine's limit and PyTorch.

For each named config it times full training steps (zero-grad, forward, loss, backward, AdamW
step) after warm-up, for full fine-tuning and for LoRA (r=8, alpha=16 on ``c_attn`` and
``c_proj``), and prints median ms/step, tokens/s, GFLOP/s and peak memory. Two references are
measured in the same run:

- the limit: NumPy's own float32 matmul throughput for exactly the products the step computes
  (recorded shape by shape), i.e. the time the step would take if it were nothing but BLAS;
- the peer (``--compare torch``): the same model trained in PyTorch on the CPU with the same
  number of threads. It lives in ``benchmarks/torch_peer.py`` of the source tree, never in the
  package; without PyTorch (or outside a source checkout) it is skipped with a note.

The steps and both references take turns (ours, NumPy's, PyTorch's, and again), one at a time, so
that the ratios do not depend on which of them ran while the machine was fast.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from minilora import runtime
from minilora.errors import BenchmarkError
from minilora.lora import LoRAConfig, apply_lora
from minilora.models import GPT, GPTConfig
from minilora.ops import backend
from minilora.ops.attention import attention_spans
from minilora.optim import AdamW, param_groups
from minilora.train.memory import measure_step


@dataclass(frozen=True)
class BenchConfig:
    n_layer: int
    n_head: int
    n_embd: int
    block_size: int
    batch_size: int
    vocab_size: int = 65

    def gpt(self) -> GPTConfig:
        return GPTConfig(vocab_size=self.vocab_size, block_size=self.block_size,
                         n_layer=self.n_layer, n_head=self.n_head, n_embd=self.n_embd)


CONFIGS = {
    "A": BenchConfig(4, 4, 128, 64, 12),  # nanoGPT's CPU config for tiny Shakespeare
    "B": BenchConfig(6, 6, 384, 256, 16),  # nanoGPT's Shakespeare model, a CPU-sized batch
}
# OpenBLAS's threads spin for ~0.11 s after a threaded product (measured: a process sleeping
# 0.1 s after one used 100 ms of CPU, 0.4 s after one 112 ms); the benchmark waits them out.
OPENBLAS_SPIN_S = 0.15
LORA = {"r": 8, "lora_alpha": 16, "target_modules": ("c_attn", "c_proj")}


def analytic_flops(cfg: BenchConfig, lora: bool) -> int:
    """Matmul FLOPs (2 per multiply-add) of one training step, counted from the architecture.

    Full: every product of the forward pass, then two of the same size in backward (dX and dW);
    causal attention computes only the row blocks' visible keys (``ops.attention.attention_spans``).
    LoRA: no dW for any frozen weight; the adapters' own products (4 per adapted layer backward,
    2 forward); and no dX into layer 0's c_attn, whose input depends on frozen weights only.
    """
    n, c, t, v = cfg.batch_size * cfg.block_size, cfg.n_embd, cfg.block_size, cfg.vocab_size
    linears = [(c, 3 * c), (c, c), (c, 4 * c), (4 * c, c)]  # (in, out): c_attn, attn.c_proj, mlp
    # q k^T and P v over all heads, for the query rows and keys each causal row block computes
    visible = sum((r1 - r0) * k1 for r0, r1, k1 in attention_spans(t, t, causal=True))
    attention = 2 * (2 * cfg.batch_size * visible * c)
    per_layer = sum(2 * n * i * o for i, o in linears) + attention
    forward = cfg.n_layer * per_layer + 2 * n * c * v  # + lm_head
    if not lora:
        return 3 * forward
    r = LORA["r"]
    adapted = [(c, 3 * c), (c, c), (4 * c, c)]  # c_attn, attn.c_proj, mlp.c_proj
    adapter_forward = sum(2 * n * r * (i + o) for i, o in adapted)
    adapter_backward = sum(2 * n * r * (2 * i + 2 * o) for i, o in adapted)  # G B, dB, dA, u A
    dx = sum(2 * n * i * o for i, o in linears)
    backward = cfg.n_layer * (dx + attention * 2 + adapter_backward) - 2 * n * c * 3 * c \
        - 2 * n * r * c + 2 * n * c * v  # layer 0's c_attn: no G W, no u A; lm_head: dX only
    return forward + cfg.n_layer * adapter_forward + backward


def product_flops(products) -> int:
    """FLOPs of recorded products [(a.shape, b.shape)]: 2 * batch * n * k * m each."""
    total = 0
    for sa, sb in products:
        batch = int(np.prod(np.broadcast_shapes(sa[:-2], sb[:-2])))
        total += 2 * batch * sa[-2] * sa[-1] * sb[-1]
    return total


def build(cfg: BenchConfig, lora: bool, seed: int = 0):
    """(model, optimizer, x, y) for one config, float32, dropout 0, weight decay 0.1."""
    model = GPT(cfg.gpt(), seed=seed)
    if lora:
        apply_lora(model, LoRAConfig(**LORA), rng=seed)
    opt = AdamW(param_groups(model.named_parameters(), 0.1), lr=1e-4)
    rng = np.random.default_rng(seed)
    x = rng.integers(0, cfg.vocab_size, (cfg.batch_size, cfg.block_size))
    y = rng.integers(0, cfg.vocab_size, (cfg.batch_size, cfg.block_size))
    return model, opt, x, y


def train_step(model, opt, x, y) -> None:
    opt.zero_grad()
    _, loss = model(x, y)
    loss.backward()
    opt.step()


class NumpyLimit:
    """NumPy's own float32 matmul doing exactly the products of a step: the limit.

    Each distinct shape runs at its best of BLAS's own threads and one BLAS thread (on a busy
    machine BLAS threads lose badly on small products, and the limit should be the best NumPy
    can do), picked once by timing both. :meth:`seconds` then computes all of the step's
    products back to back on fresh contiguous arrays, so that the benchmark can take it in turn
    with the steps and the machine's drift stays out of the ratio.
    """

    def __init__(self, products, threads: int, min_seconds: float = 0.05):
        from threadpoolctl import threadpool_limits

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

    def seconds(self) -> float:
        """Seconds NumPy takes for all the products of one step."""
        from threadpoolctl import threadpool_limits

        t0 = time.perf_counter()
        for limit, products in self._by_threads.items():
            with threadpool_limits(limit, user_api="blas"):
                for a, b, count in products:
                    for _ in range(count):
                        np.matmul(a, b)
        return time.perf_counter() - t0


def _busy_wait(seconds: float) -> None:
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


def measure(cfg: BenchConfig, steps: int, warmup: int, threads: int | None,
            min_seconds: float = 3.0, peer: TorchPeer | None = None) -> dict:
    """Time and size one config's training step in minilora, full and LoRA (and the peer's).

    At least ``steps`` timed steps each, and more until the full steps add up to ``min_seconds``
    (a small config's median over a few steps moves with the machine's noise).
    The two are timed in alternation, step by step, so that both see the same machine (a shared
    or virtual machine drifts by 10-20% over minutes); so are the limit (:class:`NumpyLimit`)
    and the PyTorch ``peer``, if given: after each pair of our steps, NumPy does the same
    products, then the peer times a pair of steps of its own while we wait.
    Returns {"full": ..., "lora": ...}, each with "ms", "numpy_limit_ms" and, with a peer,
    "torch_ms" (medians).
    """
    threads = threads or os.cpu_count() or 1
    runs = {method: build(cfg, method == "lora") for method in ("full", "lora")}
    times: dict[str, list[float]] = {method: [] for method in runs}
    peer_times: dict[str, list[float]] = {method: [] for method in runs}
    limit_times: dict[str, list[float]] = {method: [] for method in runs}
    out, limits = {}, {}
    with runtime.parallel(threads):
        for method, (model, opt, x, y) in runs.items():
            train_step(model, opt, x, y)  # the optimizer state exists from here on
            with backend.record_products() as products:
                train_step(model, opt, x, y)
            out[method] = {"flops": product_flops(products)}
            limits[method] = NumpyLimit(products, threads)
        i = 0
        while i < warmup + steps or sum(times["full"]) < min_seconds:
            for method, (model, opt, x, y) in runs.items():
                t0 = time.perf_counter()
                train_step(model, opt, x, y)
                if i >= warmup:
                    times[method].append(time.perf_counter() - t0)
            for method, limit in limits.items():
                seconds = limit.seconds()
                if i >= warmup:
                    limit_times[method].append(seconds)
            _busy_wait(OPENBLAS_SPIN_S)  # until BLAS's threads stop spinning (see the constant)
            if peer is not None:
                for method, seconds in peer.step_pair().items():
                    if i >= warmup:
                        peer_times[method].append(seconds)
            i += 1
        for method, (model, opt, x, y) in runs.items():
            out[method]["memory"] = measure_step(model, x, y, opt).as_dict()
    tokens = cfg.batch_size * cfg.block_size
    for method, m in out.items():
        m["timed_steps"] = len(times[method])
        ms = 1000 * float(np.median(times[method]))
        m.update(ms=ms, tokens_per_s=tokens / ms * 1000, gflops_per_s=m["flops"] / ms / 1e6,
                 numpy_limit_ms=1000 * float(np.median(limit_times[method])))
        if peer_times[method]:
            m["torch_ms"] = 1000 * float(np.median(peer_times[method]))
    return out


def _torch_peer_path() -> tuple[Path | None, str]:
    """Where ``benchmarks/torch_peer.py`` is, or (None, why it cannot run)."""
    if importlib.util.find_spec("torch") is None:
        return None, "PyTorch is not installed (pip install torch)"
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "torch_peer.py"
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


def run(names=("A",), steps: int = 5, warmup: int = 2, threads: int | None = None,
        compare: str | None = None, min_seconds: float = 3.0) -> dict:
    """Measure each named config (full and LoRA) and, if asked, the PyTorch peer."""
    threads = threads or os.cpu_count() or 1
    peer, note = _torch_peer_path() if compare == "torch" else (None, "")
    results = {"machine": machine(), "threads": threads, "steps": steps, "min_seconds": min_seconds,
               "malloc_tuned": runtime.malloc_tuned, "configs": {}}
    if compare == "torch" and peer is None:
        results["torch_note"] = note
    for name in names:
        cfg = CONFIGS[name]
        entry = {"config": asdict(cfg)}
        gc.collect()
        with contextlib.ExitStack() as stack:
            torch_peer = None if peer is None else \
                stack.enter_context(TorchPeer(peer, cfg, warmup, threads))
            measured = measure(cfg, steps, warmup, threads, min_seconds, torch_peer)
        for method, m in measured.items():
            m["analytic_flops"] = analytic_flops(cfg, method == "lora")
            entry[method] = m
        results["configs"][name] = entry
    return results


def machine() -> dict:
    import platform

    import scipy

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cpus": os.cpu_count(), "python": platform.python_version(),
            "numpy": np.__version__, "scipy": scipy.__version__}


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f}"


def report(results: dict) -> str:
    """The tables ``minilora bench`` prints."""
    m = results["machine"]
    tuned = "tuned" if results.get("malloc_tuned") else "default"
    lines = [f"machine: {m['cpu']}, {m['cpus']} CPUs; threads {results['threads']}; numpy "
             f"{m['numpy']}; glibc malloc {tuned}; median step of at least {results['steps']} "
             f"(and {results['min_seconds']:g} s), full and LoRA in alternation", ""]
    head = ("config", "method", "ms/step", "tokens/s", "GFLOP", "GFLOP/s", "of numpy peak",
            "torch ms", "minilora/torch", "peak MiB")
    rows = []
    for name, entry in results["configs"].items():
        for method in ("full", "lora"):
            r = entry[method]
            torch_ms = r.get("torch_ms")
            rows.append((name, method, f"{r['ms']:.1f}", f"{r['tokens_per_s']:,.0f}",
                         f"{r['flops'] / 1e9:.2f}", f"{r['gflops_per_s']:.1f}",
                         f"{r['numpy_limit_ms'] / r['ms']:.2f}",
                         "-" if torch_ms is None else f"{torch_ms:.1f}",
                         "-" if torch_ms is None else f"{r['ms'] / torch_ms:.2f}",
                         _mib(r["memory"]["peak"])))
    lines += _table(head, rows)
    lines += ["", "LoRA / full:"]
    for name, entry in results["configs"].items():
        full, lora = entry["full"], entry["lora"]
        torch_part = ""
        if full.get("torch_ms") and lora.get("torch_ms"):
            torch_part = f"; PyTorch {lora['torch_ms'] / full['torch_ms']:.2f}"
        lines.append(f"  config {name}: step time {lora['ms'] / full['ms']:.2f} (matmul FLOPs "
                     f"alone {lora['flops'] / full['flops']:.2f}{torch_part}); peak memory "
                     f"{lora['memory']['peak'] / full['memory']['peak']:.2f}")
    lines += ["", "memory of one step, MiB (parameters | gradients | optimizer state | "
              "activations saved for backward | peak):"]
    for name, entry in results["configs"].items():
        for method in ("full", "lora"):
            mem = entry[method]["memory"]
            lines.append(f"  {name} {method:<4}  {_mib(mem['parameters'])} | "
                         f"{_mib(mem['gradients'])} | {_mib(mem['optimizer_state'])} | "
                         f"{_mib(mem['activations'])} | {_mib(mem['peak'])}")
    if results.get("torch_note"):
        lines += ["", f"PyTorch comparison skipped: {results['torch_note']}"]
    return "\n".join(lines)


def _table(head, rows) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:>{w}}}" for w in widths)
    return [fmt.format(*head), fmt.format(*("-" * w for w in widths)),
            *(fmt.format(*r) for r in rows)]


def main(args) -> int:
    """Entry point of ``minilora bench`` (args from the CLI parser)."""
    results = run(tuple(args.config or ("A",)), args.steps, args.warmup, args.threads,
                  args.compare, args.min_seconds)
    print(report(results))
    if args.json:
        from minilora.io import save_json

        save_json(args.json, results)
    sys.stdout.flush()
    return 0
