"""The tables ``minilora bench`` prints, and its entry point."""

from __future__ import annotations

import sys

from minilora.bench.measure import run


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f}"


def report(results: dict) -> str:
    """The tables ``minilora bench`` prints."""
    m = results["machine"]
    tuned = "tuned" if results.get("malloc_tuned") else "default"
    lines = [f"machine: {m['cpu']}, {m['cpus']} CPUs; threads {results['threads']}; numpy "
             f"{m['numpy']}; glibc malloc {tuned}; median step of at least {results['steps']} "
             f"(and {results['min_seconds']:g} s); full, LoRA, NumPy's products and PyTorch "
             "taken in turn"]
    lines.append("products threaded by: " + "; ".join(
        f"config {name} {'BLAS' if entry['full']['blas_threads'] else 'the engine'} (largest "
        f"{entry['full']['largest_product'] / 1e6:,.0f}M multiply-adds)"
        for name, entry in results["configs"].items()) + "; see runtime.step_threading")
    lines.append("")
    head = ("config", "method", "ms/step", "tokens/s", "GFLOP", "GFLOP/s", "of numpy peak",
            "torch ms", "minilora/torch", "peak MiB")
    rows = []
    for name, entry in results["configs"].items():
        for method in _methods(entry):
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
        if "lora+ckpt" in entry:
            ckpt = entry["lora+ckpt"]
            lines.append(f"  config {name}, LoRA with activation checkpointing / LoRA: step time "
                         f"{ckpt['ms'] / lora['ms']:.2f}; peak memory "
                         f"{ckpt['memory']['peak'] / lora['memory']['peak']:.2f}")
    lines += ["", "memory of one step, MiB (parameters | gradients | optimizer state | "
              "activations saved for backward | peak):"]
    for name, entry in results["configs"].items():
        for method in _methods(entry):
            mem = entry[method]["memory"]
            lines.append(f"  {name} {method:<4}  {_mib(mem['parameters'])} | "
                         f"{_mib(mem['gradients'])} | {_mib(mem['optimizer_state'])} | "
                         f"{_mib(mem['activations'])} | {_mib(mem['peak'])}")
    if results.get("torch_note"):
        lines += ["", f"PyTorch comparison skipped: {results['torch_note']}"]
    return "\n".join(lines)


def _methods(entry: dict) -> list[str]:
    return [m for m in ("full", "lora", "lora+ckpt") if m in entry]


def _table(head, rows) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:>{w}}}" for w in widths)
    return [fmt.format(*head), fmt.format(*("-" * w for w in widths)),
            *(fmt.format(*r) for r in rows)]


def main(args) -> int:
    """Entry point of ``minilora bench`` (args from the CLI parser)."""
    results = run(tuple(args.config or ("A",)), args.steps, args.warmup, args.threads,
                  args.compare, args.min_seconds,
                  getattr(args, "activation_checkpointing", False))
    print(report(results))
    if args.json:
        from minilora.io import save_json

        save_json(args.json, results)
    sys.stdout.flush()
    return 0
