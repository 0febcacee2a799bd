"""Crash safety: a run killed with SIGKILL at any moment loses nothing.

Each test kills a tiny training run again and again (at random times, and inside the moments a crash
would hurt: half-way through writing a file, between writing and renaming it, half-way through a
metrics line; see crash.py), checks what is on disk after every kill, resumes, and finally compares
the finished run with one that was never interrupted. The two planted bugs at the end prove that
these checks can fail.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from minilora.io import read_jsonl
from minilora.train import read_checkpoint
from tests.reliability import crash
from tests.reliability.conftest import COUNTS

FULL_KILLS = 15
LORA_KILLS = 8
CLI_KILLS = 3


@pytest.fixture(scope="module")
def ctx():
    return crash.forkserver()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text(crash.corpus_text())
    return path


@pytest.fixture(scope="module")
def full_reference(tmp_path_factory, corpus):
    return crash.reference("full", tmp_path_factory.mktemp("ref") / "full", corpus, None)


@pytest.fixture(scope="module")
def lora_reference(tmp_path_factory, corpus, full_reference):
    return crash.reference("lora", tmp_path_factory.mktemp("ref") / "lora", corpus,
                           full_reference)


def test_killed_full_runs_always_leave_a_loadable_checkpoint_and_resume_bit_identically(
        ctx, corpus, full_reference, tmp_path):
    tally = crash.kill_chain(ctx, "full", tmp_path / "run", corpus, None, FULL_KILLS,
                             random.Random(1))
    assert tally.failures == []
    assert tally.kills == FULL_KILLS and tally.checkpoint_loads + tally.no_checkpoint_yet == \
        FULL_KILLS
    seen = crash.PHASES if Path("/proc/self/fd").is_dir() else ("mid-write", "fsync")
    assert all(tally.by_phase[p] >= 1 for p in seen), tally.by_phase  # mid-line needs /proc
    assert tally.temp_files_seen >= 1  # some kills really landed inside a checkpoint write
    assert crash.compare(tmp_path / "run", full_reference) == []
    count(tally)


def test_killed_lora_runs_resume_to_the_same_adapter_bit_for_bit(ctx, corpus, full_reference,
                                                                  lora_reference, tmp_path):
    tally = crash.kill_chain(ctx, "lora", tmp_path / "run", corpus, full_reference, LORA_KILLS,
                             random.Random(2))
    assert tally.failures == []
    assert tally.kills == LORA_KILLS
    assert crash.compare(tmp_path / "run", lora_reference) == []
    assert read_checkpoint(tmp_path / "run").meta["kind"] == "lora"
    count(tally)


# ---- the same through the command a user runs ------------------------------------------------

CLI_ARGS = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16",
            "--dropout", "0.1", "--batch-size", "4", "--max-iters", "300", "--eval-interval", "3",
            "--eval-iters", "2", "--warmup-iters", "4", "--lr", "3e-3", "--min-lr", "3e-4",
            "--seed", "5", "--threads", "1", "--quiet"]


def minilora(*args) -> subprocess.Popen:
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "minilora.cli", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_minilora_train_killed_then_resumed_equals_an_uninterrupted_run(corpus, tmp_path):
    ref, out = tmp_path / "ref", tmp_path / "run"
    done = minilora("train", "--data", str(corpus), "--out", str(ref), *CLI_ARGS)
    assert done.wait(120) == 0, done.stderr.read()
    rng = random.Random(3)
    iters = []
    for kill in range(CLI_KILLS + 1):
        args = ["--resume"] if kill else ["--data", str(corpus), *CLI_ARGS]
        resume = ["--quiet", "--threads", "1"] if kill else []
        proc = minilora("train", "--out", str(out), *args, *resume)
        if kill == CLI_KILLS:
            assert proc.wait(120) == 0, proc.stderr.read()
            break
        deadline = time.monotonic() + 60
        start = read_checkpoint(out).meta["iter"] if kill else -1
        # Killed while training, not while importing: a few checkpoints on (counted, not timed,
        # so a fast machine cannot finish the run first), then anywhere in the next iterations.
        past = start + 3 * rng.randint(0, 8)
        while not _checkpoint_past(out, past):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.002)
        time.sleep(rng.uniform(0.0, 0.02))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        iters.append(read_checkpoint(out).meta["iter"])
    assert iters == sorted(iters) and iters[-1] < 300  # all killed mid-run, never going back
    got, want = read_checkpoint(out), read_checkpoint(ref)
    assert all(np.array_equal(got.weights[k], want.weights[k]) for k in want.weights)
    assert all(np.array_equal(got.optim_arrays[k], want.optim_arrays[k])
               for k in want.optim_arrays)
    records = [(r["iter"], r["val_loss"]) for r in read_jsonl(out / "metrics.jsonl")]
    assert records == [(r["iter"], r["val_loss"]) for r in read_jsonl(ref / "metrics.jsonl")]
    COUNTS["kills survived"] += CLI_KILLS
    COUNTS["kills at random"] += CLI_KILLS


def count(tally: crash.Tally) -> None:
    """Add a chain's kills to the figures printed at the end of the session."""
    COUNTS["kills survived"] += tally.kills
    for phase, n in tally.by_phase.items():
        COUNTS["kills at random" if phase == "random" else f"kills {phase}"] += n
    COUNTS["kills that left a temporary file"] += tally.temp_files_seen


def _checkpoint_past(out, it: int) -> bool:
    try:
        return read_checkpoint(out).meta["iter"] > it
    except Exception:  # not there yet
        return False


# ---- the checks fail on a broken implementation ----------------------------------------------

def test_the_crash_check_catches_a_checkpoint_written_in_place(ctx, corpus, tmp_path):
    tally = crash.kill_chain(ctx, "full", tmp_path / "run", corpus, None, 3, random.Random(4),
                             mutant="non-atomic", phases=("mid-write",))
    assert any("does not load" in f for f in tally.failures), tally


def test_the_crash_check_catches_a_resume_that_keeps_newer_metrics(ctx, corpus, full_reference,
                                                                   tmp_path):
    tally = crash.kill_chain(ctx, "full", tmp_path / "run", corpus, None, 4, random.Random(5),
                             mutant="keep-metrics", phases=("fsync",))
    problems = tally.failures + crash.compare(tmp_path / "run", full_reference)
    assert any("repeats" in p for p in problems), problems
