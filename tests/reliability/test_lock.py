"""One writer per run directory: a second run on a directory in use is refused, naming the process
that holds it, before it does any work; a lock left by a killed run does not stay stuck.

RunLock itself (same process, live holder, killed holder, missing directory) is tested in
tests/test_io.py; these tests go through the training runs and the ``minilora`` command.
"""

from __future__ import annotations

import contextlib
import io as stdio
import os
import signal
import subprocess
import sys
import time

import pytest

from minilora import RunLockedError, cli
from minilora.train import read_checkpoint, runs
from tests.reliability import crash

ARGS = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16",
        "--batch-size", "4", "--eval-interval", "5", "--eval-iters", "1", "--warmup-iters", "2",
        "--threads", "1", "--quiet"]


def run_cli(*argv) -> tuple[int, str]:
    err = stdio.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(stdio.StringIO()):
        code = cli.main(list(argv))
    return code, err.getvalue()


def start_run(tmp_path, max_iters: int):
    """A `minilora train` in another process, past its first checkpoint."""
    data, out = tmp_path / "corpus.txt", tmp_path / "run"
    data.write_text(crash.corpus_text())
    proc = subprocess.Popen([sys.executable, "-m", "minilora.cli", "train", "--data", str(data),
                             "--out", str(out), "--max-iters", str(max_iters), *ARGS],
                            env={**os.environ, "OPENBLAS_NUM_THREADS": "1"},
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (out / "checkpoint.safetensors").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(0.01)
    return proc, data, out


@pytest.fixture
def live_run(tmp_path):
    proc, data, out = start_run(tmp_path, 100_000)
    yield proc, data, out
    proc.kill()
    proc.wait()


def test_a_second_run_on_a_directory_in_use_is_refused_naming_the_holder(live_run):
    proc, data, out = live_run
    message = f"{out} is in use by process {proc.pid}"
    for argv in (["train", "--data", str(data), "--out", str(out), *ARGS],  # a fresh run
                 ["train", "--out", str(out), "--resume", "--quiet"],
                 ["train", "--data", str(data), "--init-from", str(out), "--out", str(out),
                  "--lora-r", "2", "--quiet"]):
        code, err = run_cli(*argv)
        assert code == 2 and err.count("\n") == 1 and message in err, err
    with pytest.raises(RunLockedError, match=str(proc.pid)):
        runs.resume(out, quiet=True)
    assert proc.poll() is None  # the first run goes on


def test_a_lock_left_by_a_killed_run_is_taken_over_and_the_run_finishes(tmp_path):
    proc, _, out = start_run(tmp_path, 150)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (out / "run.lock").read_text().strip() == str(proc.pid)  # stale, still on disk
    assert read_checkpoint(out).meta["iter"] < 150
    code, err = run_cli("train", "--out", str(out), "--resume", "--quiet", "--threads", "1")
    assert code == 0, err
    assert read_checkpoint(out).meta["iter"] == 150
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.safetensors", "metrics.jsonl"]
