"""Time a change: training steps of two versions of minilora, interleaved in one process.

    python benchmarks/before_after.py BEFORE_DIR [--after AFTER_DIR] [--config A --config B]
                                      [--rounds 12] [--steps 3] [--threads N] [--check]

BEFORE_DIR and AFTER_DIR are source trees (a checkout, or ``git archive REV | tar -x -C DIR``);
AFTER_DIR defaults to this one. Each tree's ``minilora`` package is copied under another name
(``minilora_before``, ``minilora_after``) so that both load in this process. Then, round after
round, each version times ``--steps`` training steps of each config, full and LoRA, in turn, inside
its own threading policy, exactly as ``minilora bench`` builds and steps them: both versions see the
same machine at the same moments. It prints the medians and after/before per config and method.
``--check`` times nothing: one step of each, and the two versions' losses side by side.
"""

from __future__ import annotations

import argparse
import importlib
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent


def load_as(tree: Path, name: str, into: Path):
    """The ``minilora`` package of ``tree``, copied into ``into`` as package ``name``."""
    target = into / name
    shutil.copytree(tree / "minilora", target)
    for path in target.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        path.write_text(re.sub(r"\bminilora\b(?=[. ]|$)", name, text, flags=re.MULTILINE),
                        encoding="utf-8")
    return importlib.import_module(name)


def threading_for(pkg, largest: int, threads: int | None):
    runtime = pkg.runtime
    policy = getattr(runtime, "step_threading", None) or runtime.parallel_for  # older trees
    return policy(largest, threads)


def setup(pkg, config: str, lora: bool):
    step = importlib.import_module(f"{pkg.__name__}.bench.step")
    loop = importlib.import_module(f"{pkg.__name__}.train.loop")
    cfg = step.CONFIGS[config]
    model, opt, x, y = step.build(cfg, lora)
    largest = loop.largest_product(model, cfg.batch_size * cfg.block_size)
    return step.train_step, (model, opt, x, y), largest


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("before", type=Path)
    p.add_argument("--after", type=Path, default=HERE)
    p.add_argument("--config", action="append", choices=("A", "B"))
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--steps", type=int, default=3, help="timed steps per version and turn")
    p.add_argument("--threads", type=int)
    p.add_argument("--check", action="store_true", help="one step each, no timing")
    args = p.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="minilora-before-after-"))
    sys.path.insert(0, str(tmp))
    versions = {"before": load_as(args.before, "minilora_before", tmp),
                "after": load_as(args.after, "minilora_after", tmp)}
    for pkg in versions.values():
        pkg.runtime.tune_malloc()  # as the minilora command does (process-wide)
    cases = [(c, m) for c in args.config or ["A", "B"] for m in ("full", "lora")]
    runs = {(v, c, m): setup(pkg, c, m == "lora") for v, pkg in versions.items() for c, m in cases}
    times: dict = {key: [] for key in runs}
    for key, (train_step, state, largest) in runs.items():  # warm-up: optimizer state, caches
        with threading_for(versions[key[0]], largest, args.threads):
            train_step(*state)
            if args.check:
                _, loss = state[0](state[2], state[3])
                print(f"{key}: loss after one step {loss.item():.6f}")
    if args.check:
        return 0
    for _ in range(args.rounds):
        for key, (train_step, state, largest) in runs.items():
            with threading_for(versions[key[0]], largest, args.threads):
                for _ in range(args.steps):
                    t0 = time.perf_counter()
                    train_step(*state)
                    times[key].append(time.perf_counter() - t0)
    print(f"{args.rounds} rounds x {args.steps} steps, medians (ms); before: {args.before}")
    for c, m in cases:
        before = 1000 * statistics.median(times[("before", c, m)])
        after = 1000 * statistics.median(times[("after", c, m)])
        print(f"config {c} {m:4s}: before {before:8.1f}  after {after:8.1f}  "
              f"after/before {after / before:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
