"""The crash soak: many more kills than the suite makes, for the figures in docs/reliability.md.

    python tests/reliability/soak.py --kills 300 [--lora-kills 100] [--seed 0] [--json FILE]

Chains of kills (see crash.py) on a full run and on a LoRA run, each chain finished and compared bit
for bit with the uninterrupted run. Prints one summary (and writes it as JSON); exits 1 if anything
was lost. Mostly sleeps (each kill waits for a slow moment), so it is light on the CPU.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.reliability import crash

CHAIN = 20  # kills per chain before the run is let finish and compared


def soak(kind: str, kills: int, seed: int, ctx, root: Path, data: Path, base) -> crash.Tally:
    ref = crash.reference(kind, root / f"ref-{kind}", data, base)
    total, rng, n = crash.Tally(), random.Random(seed), 0
    compared = 0
    while total.kills < kills:
        out = root / f"{kind}-{n}"
        tally = crash.kill_chain(ctx, kind, out, data, base, min(CHAIN, kills - total.kills), rng)
        problems = crash.compare(out, ref) if not tally.failures else []
        tally.failures += [f"chain {n}: {p}" for p in problems]
        total.add(tally)
        compared += 1
        n += 1
        print(f"{kind}: {total.kills}/{kills} kills, {len(total.failures)} failures", flush=True)
        if tally.failures:
            break
    total.chains = compared
    return total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=300)
    parser.add_argument("--lora-kills", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()
    ctx = crash.forkserver()
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = root / "corpus.txt"
        data.write_text(crash.corpus_text())
        full = soak("full", args.kills, args.seed, ctx, root, data, None)
        lora = soak("lora", args.lora_kills, args.seed + 1, ctx, root, data, root / "ref-full")
    summary = {}
    for name, t in (("full", full), ("lora", lora)):
        summary[name] = {"kills": t.kills, "by_phase": t.by_phase, "chains_compared": t.chains,
                         "checkpoint_loads": t.checkpoint_loads,
                         "killed_before_first_checkpoint": t.no_checkpoint_yet,
                         "temp_files_left_by_a_kill": t.temp_files_seen,
                         "torn_metrics_lines_left_by_a_kill": t.torn_lines_seen,
                         "stale_locks_taken_over": t.stale_locks, "failures": t.failures}
    summary["seconds"] = round(time.monotonic() - t0, 1)
    print(json.dumps(summary, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    return 1 if full.failures or lora.failures else 0


if __name__ == "__main__":
    sys.exit(main())
