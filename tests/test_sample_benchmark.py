"""benchmarks/sample.py runs at its small size and prints tokens per second (timed nowhere here:
the figure is the benchmark's to report, not a test's to assert)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "sample.py"


def test_the_sampling_benchmark_runs_at_its_small_size(tmp_path):
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(SCRIPT), "--small", "--uncached", "--rounds", "1",
                           "--new-tokens", "12", "--json", str(tmp_path / "s.json")],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "cached: " in done.stdout and "tokens/s after a prefill of" in done.stdout
    assert "the same tokens: yes" in done.stdout
    report = json.loads((tmp_path / "s.json").read_text())
    assert report["new_tokens"] == 12 and report["cached"]["tokens_per_s"] > 0
