"""Kill a training run at random and at chosen moments, and check that nothing is lost.

Shared by tests/reliability/test_crash.py (a bounded number of kills) and soak.py (many). Runs go in
child processes of a multiprocessing *forkserver*: the server imports minilora once, so a child
starts in milliseconds, and ``Process.kill()`` is a real SIGKILL: no ``finally``, no ``atexit``, no
flush. Both the children and the reference run use one thread, so results can be compared bit for
bit.

Fault injection (test-only, in the child, no hook in minilora): ``slow_disk`` makes the child's
file writes slow where a crash would hurt, and reports each such moment to the parent so that it can
kill the child *inside* it:

- ``mid-write``: half of a file written through ``os.fdopen`` (how ``io.atomic_write`` writes the
  checkpoint and the rewritten metrics log), the other half not yet;
- ``fsync``: a file (or, after a rename, its directory) written but not yet flushed to disk, i.e.
  between writing a temporary file and renaming it into place, between appending a metrics record
  and writing its checkpoint, and between the rename and the directory's fsync;
- ``mid-line``: half of a metrics line appended (``os.write`` split in two), which a SIGKILL on a
  real system can also leave: a torn last line.

``mutant`` plants a bug the checks must catch (tests/reliability/test_crash.py proves they do):
``"non-atomic"`` overwrites the checkpoint in place instead of renaming a temporary file;
``"keep-metrics"`` makes resume keep the metrics records newer than its checkpoint.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from minilora import io
from minilora.lora import LoRAConfig
from minilora.train import TrainConfig, load_run, read_checkpoint, runs

PHASES = ("mid-write", "fsync", "mid-line")
DELAY_S = 0.02  # how long each slow moment lasts: the parent's window to kill inside it

MODEL = {"n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 16, "dropout": 0.1}
# a checkpoint every 2 steps: as many writes to kill in as steps
CONFIG = TrainConfig(batch_size=4, max_iters=30, eval_interval=2, eval_iters=2, warmup_iters=4,
                     lr=3e-3, min_lr=3e-4, seed=7)
LORA = LoRAConfig(r=2, lora_alpha=4, lora_dropout=0.1, target_modules=("c_attn", "c_proj"))
LORA_CONFIG = TrainConfig(batch_size=4, max_iters=20, eval_interval=2, eval_iters=2,
                          warmup_iters=2, lr=3e-3, min_lr=3e-4, seed=11)


def corpus_text() -> str:
    """A few KB of deterministic text: enough for block_size 16 in both splits."""
    rng = random.Random(0)
    words = "the cat sat on a mat while one dog ran after two red birds in the warm sun".split()
    return " ".join(rng.choice(words) for _ in range(900)) + ".\n"


# ---- the child ---------------------------------------------------------------------------------

def _report(counter, kind, phase: str) -> None:
    kind.value = PHASES.index(phase)  # one writer (this child); the parent reads counter, then kind
    counter.value += 1
    time.sleep(DELAY_S)


class _SlowFile:
    """A file object whose ``write`` stops half-way for a while (a slow disk)."""

    def __init__(self, f, report):
        self._f, self._report = f, report

    def write(self, data):
        half = len(data) // 2
        n = self._f.write(data[:half])
        self._f.flush()
        self._report("mid-write")
        return n + self._f.write(data[half:])

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        self._f.__enter__()
        return self

    def __exit__(self, *exc):
        return self._f.__exit__(*exc)


def slow_disk(counter, kind) -> None:
    """Install the slow moments described in the module docstring (in this process only)."""
    def report(phase):
        _report(counter, kind, phase)

    real_fdopen, real_fsync, real_write = os.fdopen, os.fsync, os.write

    def fdopen(fd, *args, **kwargs):
        return _SlowFile(real_fdopen(fd, *args, **kwargs), report)

    def fsync(fd):
        report("fsync")
        real_fsync(fd)

    def write(fd, data):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            target = ""
        if not target.endswith(os.sep + "metrics.jsonl") or len(data) < 2:
            return real_write(fd, data)
        half = len(data) // 2
        n = real_write(fd, data[:half])
        report("mid-line")
        return n + real_write(fd, data[half:])

    os.fdopen, os.fsync, os.write = fdopen, fsync, write


def _non_atomic_write(path, data: bytes) -> None:
    """The bug the crash test must catch: the checkpoint overwritten in place."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _keep_metrics(self, it, last_eval=None):
    """The bug: resume keeps every metrics record, even those newer than its checkpoint."""
    return [r for r in self.read_metrics() if r["iter"] <= it]


def child(kind_of_run: str, out: str, data: str, base: str | None, counter, kind,
          slow: bool, mutant: str | None = None) -> None:
    """Start (or, if ``out`` holds a checkpoint, resume) a run: ``full`` pretrains, ``lora``
    fine-tunes ``base`` with LoRA. Runs in a forkserver child."""
    if mutant == "non-atomic":
        import minilora.io.tensors
        minilora.io.tensors.write_atomic_bytes = _non_atomic_write
    elif mutant == "keep-metrics":
        from minilora.train.rundir import RunDir
        RunDir.metrics_until = _keep_metrics
    if slow:
        slow_disk(counter, kind)
    if (Path(out) / "checkpoint.safetensors").exists():
        runs.resume(out, quiet=True, threads=1)
    elif kind_of_run == "full":
        runs.pretrain(data, out, MODEL, CONFIG, quiet=True, threads=1)
    else:
        runs.finetune(base, data, out, LORA_CONFIG, LORA, quiet=True, threads=1)


# ---- the parent --------------------------------------------------------------------------------

def forkserver() -> mp.context.BaseContext:
    """The forkserver context, its server started with minilora imported and one BLAS thread."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    saved = os.environ.get("OPENBLAS_NUM_THREADS")
    os.environ["OPENBLAS_NUM_THREADS"] = "1"  # inherited by the server and every child
    try:
        from multiprocessing import forkserver as fs
        fs.ensure_running()
    finally:
        if saved is None:
            del os.environ["OPENBLAS_NUM_THREADS"]
        else:
            os.environ["OPENBLAS_NUM_THREADS"] = saved
    return ctx


def reference(kind_of_run: str, out: Path, data: Path, base: Path | None) -> Path:
    """The same run, never interrupted (in this process, one thread)."""
    if kind_of_run == "full":
        runs.pretrain(data, out, MODEL, CONFIG, quiet=True, threads=1)
    else:
        runs.finetune(base, data, out, LORA_CONFIG, LORA, quiet=True, threads=1)
    return out


@dataclass
class Tally:
    """What a chain of kills did and found."""

    kills: int = 0
    by_phase: dict = field(default_factory=lambda: {p: 0 for p in (*PHASES, "random")})
    temp_files_seen: int = 0      # kills that left a half-written temporary file behind
    torn_lines_seen: int = 0      # kills that left a torn last metrics line behind
    checkpoint_loads: int = 0     # times the checkpoint on disk loaded after a kill
    no_checkpoint_yet: int = 0    # kills before the first checkpoint (the run restarts)
    stale_locks: int = 0          # kills that left run.lock behind (with the dead process's PID)
    chains: int = 0               # chains finished and compared with the uninterrupted run
    failures: list = field(default_factory=list)

    def add(self, other: Tally) -> None:
        self.kills += other.kills
        for k, v in other.by_phase.items():
            self.by_phase[k] += v
        self.temp_files_seen += other.temp_files_seen
        self.torn_lines_seen += other.torn_lines_seen
        self.checkpoint_loads += other.checkpoint_loads
        self.no_checkpoint_yet += other.no_checkpoint_yet
        self.stale_locks += other.stale_locks
        self.failures += other.failures


def _kill_plan(rng: random.Random, what: str) -> tuple[str, float | int]:
    """('random', seconds) or (phase, how many slow moments of any kind to let pass first)."""
    if what == "random":
        return what, rng.uniform(0.0, 0.8)
    return what, rng.randint(1, 25)


def _wait_and_kill(proc, counter, kind, plan, timeout: float = 60.0) -> str | None:
    """Kill ``proc`` as ``plan`` says; the phase it was killed in, or None if it finished."""
    what, arg = plan
    deadline = time.monotonic() + timeout
    start = time.monotonic()
    while proc.is_alive():
        if time.monotonic() > deadline:
            proc.kill()
            raise TimeoutError("a training child did not finish")
        if what == "random":
            if time.monotonic() - start >= arg:
                proc.kill()
                proc.join()
                return "random"
        elif counter.value >= arg and PHASES[kind.value] == what:
            proc.kill()  # the child sleeps DELAY_S inside the moment: this lands there
            proc.join()
            return what
        elif counter.value >= arg:
            arg = counter.value + 1  # not the wanted kind yet: wait for the next moment
        time.sleep(0.0005)
    proc.join()
    return None


def _torn(path: Path) -> bool:
    raw = path.read_bytes() if path.exists() else b""
    return bool(raw) and not raw.endswith(b"\n")


ALL_PLANS = (*PHASES, "fsync", "random")  # fsync moments are where most of the writes stand


def kill_chain(ctx, kind_of_run: str, out: Path, data: Path, base: Path | None, kills: int,
               rng: random.Random, mutant: str | None = None, phases=ALL_PLANS) -> Tally:
    """Run, kill, check what is on disk, resume, ..., ``kills`` times; then let it finish."""
    tally = Tally()
    last_iter, attempts = -1, 0
    while True:
        counter, kind = ctx.RawValue("l", 0), ctx.RawValue("i", 0)
        proc = ctx.Process(target=child, args=(kind_of_run, str(out), str(data),
                                               str(base) if base else None, counter, kind,
                                               True, mutant))
        proc.start()
        if tally.kills >= kills:
            proc.join(120)
            if proc.exitcode != 0:
                tally.failures.append(f"the last run exited with {proc.exitcode}")
            return tally
        plan = _kill_plan(rng, phases[attempts % len(phases)])
        attempts += 1
        phase = _wait_and_kill(proc, counter, kind, plan)
        if phase is None:  # finished before the kill: start over from scratch to kill again
            if proc.exitcode != 0:
                tally.failures.append(f"a run exited with {proc.exitcode}")
                return tally
            for p in out.iterdir() if out.exists() else ():
                p.unlink()
            last_iter = -1
            continue
        tally.kills += 1
        tally.by_phase[phase] += 1
        tally.temp_files_seen += any(p.name.endswith(".tmp") for p in out.iterdir()) \
            if out.exists() else 0
        tally.torn_lines_seen += _torn(out / "metrics.jsonl")
        tally.stale_locks += (out / "run.lock").exists()  # the next run must take it over
        if not (out / "checkpoint.safetensors").exists():
            tally.no_checkpoint_yet += 1
            if last_iter >= 0:
                tally.failures.append(f"kill {tally.kills} ({phase}): the checkpoint vanished")
            continue
        try:
            it = read_checkpoint(out).meta["iter"]
            load_run(out)
            tally.checkpoint_loads += 1
        except Exception as e:  # the finding to report
            tally.failures.append(f"kill {tally.kills} ({phase}): the checkpoint does not load: "
                                  f"{type(e).__name__}: {e}")
            return tally
        if it < last_iter:
            tally.failures.append(f"kill {tally.kills} ({phase}): the checkpoint went back from "
                                  f"iteration {last_iter} to {it}")
        iters = [r["iter"] for r in io.read_jsonl(out / "metrics.jsonl")]
        if it not in iters:
            tally.failures.append(f"kill {tally.kills} ({phase}): metrics.jsonl lacks the "
                                  f"record of the checkpoint's iteration {it}")
        if len(set(iters)) != len(iters):
            tally.failures.append(f"kill {tally.kills} ({phase}): metrics.jsonl repeats "
                                  f"iterations {iters}")
        last_iter = it


def compare(out: Path, ref: Path) -> list[str]:
    """What differs between a killed-and-resumed run and the uninterrupted one: the final weights
    and optimizer state (bit for bit), and the metrics log (whole lines, no repeated iteration,
    the same evaluations bit for bit)."""
    problems = []
    leftovers = sorted(p.name for p in out.iterdir() if p.name not in
                       ("checkpoint.safetensors", "metrics.jsonl"))
    if leftovers:  # temporary files of killed writes, a lock file: the finished run removes them
        problems.append(f"left behind: {leftovers}")
    got, want = read_checkpoint(out), read_checkpoint(ref)
    for what, a, b in (("weights", got.weights, want.weights),
                       ("optimizer state", got.optim_arrays, want.optim_arrays)):
        if a.keys() != b.keys():
            problems.append(f"{what}: different names")
            continue
        diff = [k for k in a if a[k].dtype != b[k].dtype or not np.array_equal(a[k], b[k])]
        if diff:
            problems.append(f"{what} not bit-identical: {diff[:3]}")
    for key in ("iter", "rng", "optimizer", "skipped_steps"):
        if got.meta.get(key) != want.meta.get(key):
            problems.append(f"checkpoint {key} differs")
    raw = (out / "metrics.jsonl").read_bytes()
    if not raw.endswith(b"\n"):
        problems.append("metrics.jsonl ends in a torn line")
    records, expected = io.read_jsonl(out / "metrics.jsonl"), io.read_jsonl(ref / "metrics.jsonl")
    iters = [r["iter"] for r in records]
    if len(set(iters)) != len(iters):
        problems.append(f"metrics.jsonl repeats iterations: {iters}")
    keys = ("iter", "train_loss", "val_loss", "lr")
    if [[r[k] for k in keys] for r in records] != [[r[k] for k in keys] for r in expected]:
        problems.append("metrics.jsonl differs from the uninterrupted run's")
    return problems
