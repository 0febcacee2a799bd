"""Peak resident memory of a training step, minilora against PyTorch, each in a process of its own.

    python benchmarks/peak_memory.py --steps 3                  # config C: full, LoRA, LoRA+ckpt
    python benchmarks/peak_memory.py --config B --steps 3 --json peak.json

How it measures, exactly: for each side (minilora, torch) and method (full fine-tuning; LoRA r=8,
alpha=16 on c_attn and c_proj; that LoRA with activation checkpointing), this script starts a
fresh Python process (itself, with ``--child``) and waits for it with ``os.wait4``. The child
imports its side's libraries, builds the model of ``minilora bench``'s config (float32, dropout 0,
AdamW with weight decay 0.1; the PyTorch model is ``benchmarks/torch_peer.py``'s), and takes
``--steps`` training steps (zero-grad, forward, loss, backward, AdamW), each on the same batch.
The figure is the child's peak resident set: ``ru_maxrss`` of the rusage ``wait4`` returns for
that child alone, in KiB (Linux). The child also reports its own ``VmHWM`` (the same peak, read
from /proc/self/status just before it exits) and its ``VmRSS`` after the imports and after the
build, so that the table can show what the step adds above the model. The peak therefore holds
the interpreter and each side's libraries (PyTorch's are larger than NumPy's and SciPy's), the
parameters, the optimizer state from the first step on, the gradients and the step's activations.

minilora's child runs as ``minilora train`` does: glibc malloc tuned (``runtime.tune_malloc``, as
the ``minilora`` command sets it; ``--malloc default`` leaves glibc alone) and the step threading
of ``runtime.step_threading``; it computes the loss with ``skip_logits=True`` (the fused final
layer norm + lm_head + cross-entropy). PyTorch's runs ``torch.set_num_threads(threads)``; its
checkpointing is ``torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)`` per block.
The step times printed beside the peaks are each side's median, in processes that did not
alternate: indicative only (``minilora bench`` times speed properly).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

HERE = Path(__file__).resolve().parent
METHODS = ("full", "lora", "lora+ckpt")
SIDES = ("minilora", "torch")


def status_kib(field: str) -> int:
    """A ``Vm...`` line of /proc/self/status, in KiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def child(side: str, method: str, config: str, steps: int, threads: int, malloc: str,
          peer_args: dict) -> dict:
    """Build and train in this process; the facts as a dict (printed as one JSON line).
    peer_args: the config and LoRA settings as JSON objects, for the PyTorch side."""
    import numpy as np

    lora, ckpt = method != "full", method == "lora+ckpt"
    if side == "minilora":
        from minilora import bench, runtime
        from minilora.train.loop import largest_product

        after_imports = status_kib("VmRSS")
        if malloc == "tuned":
            runtime.tune_malloc()
        cfg = bench.CONFIGS[config]
        model, opt, x, y = bench.build(cfg, lora)
        if ckpt:
            model.gradient_checkpointing_enable()
        after_build = status_kib("VmRSS")
        largest = largest_product(model, cfg.batch_size * cfg.block_size)

        def step():
            with runtime.step_threading(largest, threads):
                bench.train_step(model, opt, x, y)
    else:
        import torch
        from torch.utils.checkpoint import checkpoint

        sys.path.insert(0, str(HERE))
        import torch_peer

        after_imports = status_kib("VmRSS")
        torch.set_num_threads(threads)
        cfg = SimpleNamespace(**peer_args["config"])  # minilora is not imported on this side
        model, opt = torch_peer.build(cfg, lora, peer_args["lora"])
        if ckpt:
            class Checkpointed(torch.nn.Module):
                def __init__(self, block):
                    super().__init__()
                    self.block = block

                def forward(self, x):
                    return checkpoint(self.block, x, use_reentrant=False)

            for i, block in enumerate(model.h):
                model.h[i] = Checkpointed(block)
        rng = np.random.default_rng(0)
        x = torch.from_numpy(rng.integers(0, cfg.vocab_size, (cfg.batch_size, cfg.block_size)))
        y = torch.from_numpy(rng.integers(0, cfg.vocab_size, (cfg.batch_size, cfg.block_size)))
        after_build = status_kib("VmRSS")

        def step():
            opt.zero_grad(set_to_none=True)
            model(x, y).backward()
            opt.step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"side": side, "method": method, "after_imports_kib": after_imports,
            "after_build_kib": after_build, "vmhwm_kib": status_kib("VmHWM"),
            "step_s": sorted(times)[len(times) // 2]}


def measure(side: str, method: str, config: str, steps: int, threads: int, malloc: str) -> dict:
    """Run one child and return its facts plus ``ru_maxrss_kib`` from ``os.wait4``."""
    import minilora
    from minilora.bench.step import CONFIGS, LORA

    peer_args = json.dumps({"config": asdict(CONFIGS[config]), "lora": LORA})
    # the children import the same minilora as this process (a source tree, not an install)
    paths = [str(Path(minilora.__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--child", side,
                             method, "--config", config, "--steps", str(steps), "--threads",
                             str(threads), "--malloc", malloc, "--peer-args", peer_args],
                            stdout=subprocess.PIPE, text=True, env=env)
    out = proc.stdout.read()
    proc.stdout.close()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"peak_memory: the {side} {method} child exited with "
                         f"{proc.returncode}")
    facts = json.loads(out.strip().splitlines()[-1])
    facts["ru_maxrss_kib"] = usage.ru_maxrss
    return facts


def table(results: list[dict]) -> str:
    mib = 1024
    head = ("side", "method", "peak MiB (ru_maxrss)", "VmHWM MiB", "after imports",
            "after build", "peak - imports", "step s (indicative)")
    rows = [(r["side"], r["method"], f"{r['ru_maxrss_kib'] / mib:,.0f}",
             f"{r['vmhwm_kib'] / mib:,.0f}", f"{r['after_imports_kib'] / mib:,.0f}",
             f"{r['after_build_kib'] / mib:,.0f}",
             f"{(r['ru_maxrss_kib'] - r['after_imports_kib']) / mib:,.0f}",
             f"{r['step_s']:.2f}") for r in results]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:>{w}}}" for w in widths)
    lines = [fmt.format(*head), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*row) for row in rows]
    peak = {(r["side"], r["method"]): r["ru_maxrss_kib"] for r in results}
    lines.append("")
    for method in METHODS:
        if ("minilora", method) in peak and ("torch", method) in peak:
            ratio = peak["minilora", method] / peak["torch", method]
            lines.append(f"{method}: minilora / PyTorch peak {ratio:.2f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="C", help="a config of minilora bench (default: C)")
    p.add_argument("--steps", type=int, default=3, help="training steps in each child")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--sides", default=",".join(SIDES))
    p.add_argument("--malloc", choices=("tuned", "default"), default="tuned")
    p.add_argument("--json", metavar="FILE")
    p.add_argument("--child", nargs=2, metavar=("SIDE", "METHOD"), help=argparse.SUPPRESS)
    p.add_argument("--peer-args", default="{}", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        facts = child(*args.child, args.config, args.steps, args.threads, args.malloc,
                      json.loads(args.peer_args))
        print(json.dumps(facts), flush=True)
        return 0
    results = []
    for method in args.methods.split(","):
        for side in args.sides.split(","):  # one child at a time: each has the machine alone
            results.append(measure(side, method, args.config, args.steps, args.threads,
                                   args.malloc))
    print(f"config {args.config}, {args.steps} steps a child, {args.threads} threads, minilora's "
          f"malloc {args.malloc}; peak = ru_maxrss of each child from os.wait4")
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
