"""Timing the steps: full and LoRA in turn with the limit and the peer, on the engine's threads."""

from __future__ import annotations

import contextlib
import gc
import os
import time
from dataclasses import asdict

import numpy as np

from minilora import runtime
from minilora.bench.references import (
    OPENBLAS_SPIN_S,
    NumpyLimit,
    TorchPeer,
    busy_wait,
    torch_peer_path,
)
from minilora.bench.step import (
    CONFIGS,
    BenchConfig,
    analytic_flops,
    build,
    product_flops,
    train_step,
)
from minilora.ops import backend
from minilora.train.loop import largest_product
from minilora.train.memory import measure_step


def measure(cfg: BenchConfig, steps: int, warmup: int, threads: int | None,
            min_seconds: float = 3.0, peer: TorchPeer | None = None,
            checkpointing: bool = False) -> dict:
    """Time and size one config's training step in minilora, full and LoRA (and the peer's).

    At least ``steps`` timed steps each, and more until the full steps add up to ``min_seconds``
    (a small config's median over a few steps moves with the machine's noise).
    The two are timed in alternation, step by step, so that both see the same machine (a shared
    or virtual machine drifts by 10-20% over minutes); so are the limit ([`NumpyLimit`][])
    and the PyTorch ``peer``, if given: after each pair of our steps, NumPy does the same
    products, then the peer times a pair of steps of its own while we wait.
    Returns {"full": ..., "lora": ...}, each with "ms", "numpy_limit_ms" and, with a peer,
    "torch_ms" (medians). ``checkpointing`` adds "lora+ckpt", the LoRA step with activation
    checkpointing, timed in turn with the others (the peer has none).
    """
    threads = threads or os.cpu_count() or 1
    methods = ("full", "lora", "lora+ckpt") if checkpointing else ("full", "lora")
    runs = {method: build(cfg, method != "full") for method in methods}
    if checkpointing:
        runs["lora+ckpt"][0].gradient_checkpointing_enable()
    times: dict[str, list[float]] = {method: [] for method in runs}
    peer_times: dict[str, list[float]] = {method: [] for method in runs}
    limit_times: dict[str, list[float]] = {method: [] for method in runs}
    out, limits = {}, {}
    tokens = cfg.batch_size * cfg.block_size
    largest = largest_product(runs["full"][0], tokens)
    with runtime.step_threading(largest, threads):  # as the training loop does
        for method, (model, opt, x, y) in runs.items():
            train_step(model, opt, x, y)  # the optimizer state exists from here on
            with backend.record_products() as products:
                train_step(model, opt, x, y)
            out[method] = {"flops": product_flops(products)}
            limits[method] = NumpyLimit(products, threads)
        blas_threads_spin = any(limit.uses_blas_threads for limit in limits.values())
        while len(times["full"]) < warmup + steps or sum(times["full"][warmup:]) < min_seconds:
            for method, (model, opt, x, y) in runs.items():
                t0 = time.perf_counter()
                train_step(model, opt, x, y)
                times[method].append(time.perf_counter() - t0)
            for method, limit in limits.items():
                limit_times[method].append(limit.seconds())
            if blas_threads_spin:
                busy_wait(OPENBLAS_SPIN_S)  # until BLAS's threads stop spinning (see the constant)
            if peer is not None:
                for method, seconds in peer.step_pair().items():
                    peer_times[method].append(seconds)
        for method, (model, opt, x, y) in runs.items():
            out[method]["memory"] = measure_step(model, x, y, opt).as_dict()

    def median_ms(seconds: list[float]) -> float:  # the warm-up rounds are not counted
        return 1000 * float(np.median(seconds[warmup:]))

    for method, m in out.items():
        m["timed_steps"] = len(times[method]) - warmup
        m["largest_product"] = largest
        m["blas_threads"] = runtime.lets_blas_thread(largest)
        ms = median_ms(times[method])
        m.update(ms=ms, tokens_per_s=tokens / ms * 1000, gflops_per_s=m["flops"] / ms / 1e6,
                 numpy_limit_ms=median_ms(limit_times[method]))
        if peer is not None and peer_times[method]:
            m["torch_ms"] = median_ms(peer_times[method])
    return out


def run(names=("A",), steps: int = 5, warmup: int = 2, threads: int | None = None,
        compare: str | None = None, min_seconds: float = 3.0,
        checkpointing: bool = False) -> dict:
    """Measure each named config (full and LoRA, and LoRA with activation checkpointing if
    ``checkpointing``) and, if asked, the PyTorch peer."""
    threads = threads or os.cpu_count() or 1
    peer, note = torch_peer_path() if compare == "torch" else (None, "")
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
            measured = measure(cfg, steps, warmup, threads, min_seconds, torch_peer,
                               checkpointing)
        for method, m in measured.items():
            if method != "lora+ckpt":  # the formula counts no recomputed forward pass
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
