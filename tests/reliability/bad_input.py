"""Bad user input through the API, case by case, and the one table of docs/reliability.md.

``API_CASES`` are the mistakes a program can make calling minilora (the command line's are in
tests/test_cli.py, ``_mistakes``). Each runs in a workspace (``make_workspace``: data files, a tiny
base, a LoRA run on it, and the same adapter beside other bases) with the workspace as the current
directory, so messages read as a user would see them.

    python -m tests.reliability.bad_input > table.md

prints the table of docs/reliability.md: every input, the error it gets (the actual message, from
running it) and the test that checks it, for both the API cases and the command line's.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

import numpy as np

from minilora import (
    ConfigError,
    DataError,
    FileFormatError,
    ShapeError,
    TargetModuleError,
)
from minilora.data import TextDataset, load_dataset
from minilora.lora import LoRAConfig, apply_lora, load_lora_state_dict
from minilora.models import GPT, GPTConfig
from minilora.train import TrainConfig, load_run, read_checkpoint, runs, train
from tests.reliability import crash

CONFIG = TrainConfig(batch_size=2, max_iters=4, eval_interval=2, eval_iters=1, warmup_iters=1,
                     seed=3)
LORA = LoRAConfig(r=2, lora_alpha=4, target_modules=("c_attn", "c_proj"))
TINY = {**crash.MODEL, "dropout": 0.0}


@contextlib.contextmanager
def _cd(path):
    """contextlib.chdir, which Python 3.10 lacks."""
    previous = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def make_workspace(ws: Path) -> Path:
    ws.mkdir(parents=True, exist_ok=True)
    (ws / "corpus.txt").write_text(crash.corpus_text())
    (ws / "empty.txt").write_bytes(b"")
    (ws / "latin1.txt").write_bytes("caf\xe9 au lait ".encode("latin-1") * 50)
    (ws / "short.txt").write_text("a short text")
    with _cd(ws):
        runs.pretrain("corpus.txt", "base", TINY, CONFIG, quiet=True, threads=1)
        runs.finetune("base", "corpus.txt", "lora", CONFIG, LORA, quiet=True, threads=1)
        other = TrainConfig(**{**CONFIG.to_dict(), "seed": 4})
        runs.pretrain("corpus.txt", "other-base", TINY, other, quiet=True, threads=1)
        runs.pretrain("corpus.txt", "wide-base", {**TINY, "n_embd": 32}, CONFIG, quiet=True,
                      threads=1)
        for where, base in (("moved", "other-base"), ("wide", "wide-base")):
            shutil.copytree("lora", f"{where}/lora")  # its base is ../base: now another model
            shutil.copytree(base, f"{where}/base")
        shutil.copytree("lora", "orphan/lora")  # and no ../base at all
    return ws


def _model(n_embd: int = 16) -> GPT:
    vocab = read_checkpoint("base").model_config.vocab_size
    return GPT(GPTConfig(vocab_size=vocab, **{**TINY, "n_embd": n_embd}), seed=CONFIG.seed)


def _data() -> TextDataset:
    return load_dataset("corpus.txt", tokenizer=None)


def _rank_4_model() -> GPT:
    model = load_run("base").model
    apply_lora(model, LoRAConfig(r=4, lora_alpha=8, target_modules=("c_attn", "c_proj")), rng=0)
    return model


def _resume_nothing():
    train(_model(), _data(), CONFIG, "nothing", resume=True, quiet=True, threads=1)


# id -> (the input, what to call, the error class, a part of the message)
API_CASES = {
    "data-missing": ("`load_dataset` of a file that does not exist",
                     lambda: load_dataset("nope.txt"), DataError, "nope.txt: file does not exist"),
    "data-empty": ("`load_dataset` of an empty file", lambda: load_dataset("empty.txt"),
                   DataError, "empty.txt: file is empty"),
    "data-not-utf8": ("`load_dataset` of Latin-1 text", lambda: load_dataset("latin1.txt"),
                      DataError, "not UTF-8 text: byte 0xe9 at byte offset 3"),
    "data-directory": ("`load_dataset` of a directory", lambda: load_dataset("base"), DataError,
                       "is a directory"),
    "data-unknown-builtin": ("`load_dataset(\"builtin:nope\")`",
                             lambda: load_dataset("builtin:nope"), ConfigError,
                             "unknown built-in corpus"),
    "data-shorter-than-a-block": (
        "`train` on a text shorter than `block_size + 1` tokens (`out_dir` not created)",
        lambda: train(_model(), load_dataset("short.txt"), CONFIG, "o-short", quiet=True),
        DataError, "fewer than block_size + 1 = 17"),
    "lr-negative": ("`TrainConfig(lr=-1)`", lambda: TrainConfig(lr=-1), ConfigError,
                    "TrainConfig.lr must be a finite number >= 0, got -1"),
    "lr-zero": ("`TrainConfig(lr=0)`", lambda: TrainConfig(lr=0), ConfigError,
                "TrainConfig.lr must be > 0"),
    "lr-non-numeric": ("`TrainConfig(lr=\"fast\")`", lambda: TrainConfig(lr="fast"), ConfigError,
                       "got 'fast'"),
    "lr-nan": ("`TrainConfig(lr=float(\"nan\"))`", lambda: TrainConfig(lr=float("nan")),
               ConfigError, "got nan"),
    "min-lr-above-lr": ("`TrainConfig(lr=0.01, min_lr=0.1)`",
                        lambda: TrainConfig(lr=0.01, min_lr=0.1), ConfigError,
                        "min_lr (0.1) must not exceed lr (0.01)"),
    "batch-size-zero": ("`TrainConfig(batch_size=0)`", lambda: TrainConfig(batch_size=0),
                        ConfigError, "batch_size must be a positive integer"),
    "max-iters-negative": ("`TrainConfig(max_iters=-5)`", lambda: TrainConfig(max_iters=-5),
                           ConfigError, "max_iters must be a non-negative integer"),
    "max-iters-float": ("`TrainConfig(max_iters=2.5)`", lambda: TrainConfig(max_iters=2.5),
                        ConfigError, "got 2.5"),
    "on-nonfinite-unknown": ("`TrainConfig(on_nonfinite=\"ignore\")`",
                             lambda: TrainConfig(on_nonfinite="ignore"), ConfigError,
                             "must be one of ['raise', 'skip']"),
    "n-embd-vs-n-head": ("`GPTConfig(n_embd=30, n_head=4)`",
                         lambda: GPTConfig(vocab_size=10, n_embd=30, n_head=4), ConfigError,
                         "n_embd (30) must be divisible by n_head (4)"),
    "n-layer-zero": ("`GPTConfig(n_layer=0)`", lambda: GPTConfig(vocab_size=10, n_layer=0),
                     ConfigError, "n_layer must be a positive integer, got 0"),
    "n-layer-string": ("`GPTConfig(n_layer=\"2\")`",
                       lambda: GPTConfig(vocab_size=10, n_layer="2"), ConfigError, "got '2'"),
    "dropout-one": ("`GPTConfig(dropout=1.0)`", lambda: GPTConfig(vocab_size=10, dropout=1.0),
                    ConfigError, "dropout must be a number in [0, 1)"),
    "lora-r-zero": ("`LoRAConfig(r=0)`", lambda: LoRAConfig(r=0), ConfigError,
                    "r must be a positive integer, got 0"),
    "lora-alpha-negative": ("`LoRAConfig(lora_alpha=-1)`", lambda: LoRAConfig(lora_alpha=-1),
                            ConfigError, "lora_alpha must be a finite number > 0"),
    "unknown-target-module": ("`apply_lora` with `target_modules=[\"c_atn\"]` (model unchanged)",
                              lambda: apply_lora(_model(), LoRAConfig(target_modules=("c_atn",))),
                              TargetModuleError, "'c_atn' matches no module"),
    "adapter-of-another-rank": (
        "`load_lora_state_dict` of a rank-2 adapter into a rank-4 model (model unchanged)",
        lambda: load_lora_state_dict(_rank_4_model(), {
            k: v for k, v in read_checkpoint("lora").weights.items()}),
        ShapeError, "an adapter of rank 2, not 4"),
    "adapter-on-another-base": (
        "`load_run` of an adapter whose base directory now holds another model",
        lambda: load_run("moved/lora"), FileFormatError, "weights fingerprint differs"),
    "adapter-on-another-architecture": (
        "`load_run` of an adapter whose base is now a model of another width",
        lambda: load_run("wide/lora"), FileFormatError, "has a different architecture"),
    "adapter-without-its-base": (
        "`load_run` of an adapter whose base is gone",
        lambda: load_run("orphan/lora"),
        FileFormatError, "base model"),
    "state-dict-of-another-config": (
        "`load_state_dict` of a 16-wide model's weights into a 32-wide one (model unchanged)",
        lambda: _model(32).load_state_dict(read_checkpoint("base").weights), ShapeError,
        "the model expects"),
    "resume-another-config": (
        "`train(..., resume=True)` of a 32-wide model from a 16-wide run's checkpoint",
        lambda: train(_model(32), _data(), CONFIG, "base", resume=True, quiet=True),
        FileFormatError, "a checkpoint of another model"),
    "resume-other-settings": (
        "`train(..., resume=True)` with other training settings than the checkpoint's",
        lambda: train(_model(), _data(), TrainConfig(**{**CONFIG.to_dict(), "lr": 0.5}), "base",
                      resume=True, quiet=True),
        FileFormatError, "made with other training settings"),
    "resume-nothing": ("`train(..., resume=True)` on a directory without a checkpoint "
                       "(not created)", _resume_nothing, ConfigError,
                       "--resume: nothing holds no checkpoint to resume from"),
    "resume-nothing-runs": ("`runs.resume` of a directory that does not exist",
                            lambda: runs.resume("nothing"), ConfigError,
                            "no checkpoint to resume from"),
    "resume-without-out-dir": ("`train(..., resume=True)` without `out_dir`",
                               lambda: train(_model(), _data(), CONFIG, None, resume=True),
                               ConfigError, "resume=True needs out_dir"),
    "fresh-run-over-a-run": ("`train` (not resuming) into a directory that holds a run",
                             lambda: train(_model(), _data(), CONFIG, "base", quiet=True),
                             ConfigError, "already holds a run"),
}


def files_under(ws: Path) -> dict[str, bytes]:
    """Every file in the workspace and its bytes: to see that a refused call wrote nothing."""
    return {str(p.relative_to(ws)): p.read_bytes() for p in sorted(ws.rglob("*")) if p.is_file()}


def run_case(case: str, ws: Path) -> tuple[type, str]:
    """(error class, message) of the case, run in ``ws``; AssertionError if it did not raise."""
    _, call, _, _ = API_CASES[case]
    with _cd(ws):
        try:
            call()
        except Exception as e:  # the error under test, whatever it is
            return type(e), " ".join(str(e).replace(str(ws.resolve()) + os.sep, "").split())
    raise AssertionError(f"{case}: no error")


API_TEST = "test_a_mistake_through_the_api"
CLI_TEST = "test_a_mistake_is_one_line_exit_code_2_and_nothing_half_written"


def api_row_end(case: str, kind: type, message: str) -> str:
    """The end of the docs table's row for an API case: what tests/test_bad_input.py looks for."""
    return (f"`{kind.__name__}`: `{message}`".replace("|", "\\|")
            + f" | [test_bad_input.py](../tests/reliability/test_bad_input.py#{API_TEST})"
            f" `{case}` |")


def table_rows(ws: Path, cli_work: Path | None = None) -> list[str]:
    """Markdown rows: | input | error: message | test |, the API's cases then the CLI's."""
    rows = []
    for case, (what, _, _, _) in API_CASES.items():
        kind, message = run_case(case, ws)
        rows.append(f"| {what} | {api_row_end(case, kind, message)}")
    if cli_work is not None:
        from minilora import cli
        from tests import test_cli
        for case, (args, _, _) in test_cli._mistakes().items():
            err = _cli_message(cli, args, cli_work)
            shown = " ".join(args).replace(" ".join(test_cli.TINY), "TINY")
            rows.append(f"| `minilora {shown}` | exit 2: `{err}` | "
                        f"[test_cli.py](../tests/test_cli.py#{CLI_TEST}) `{case}` |")
    return rows


def _cli_message(cli, args, work: Path) -> str:
    import io
    err = io.StringIO()
    with _cd(work), contextlib.redirect_stderr(err), \
            contextlib.redirect_stdout(io.StringIO()):
        try:
            cli.main(list(args))
        except SystemExit:
            pass
    text = err.getvalue().strip().replace(str(work.resolve()) + os.sep, "")
    return text.replace("|", "\\|")


def main() -> None:  # pragma: no cover - prints the docs table
    import tempfile

    from tests import test_cli

    class Factory:
        def __init__(self, root):
            self.root = root

        def mktemp(self, name):
            path = Path(self.root) / name
            path.mkdir()
            return path

    with tempfile.TemporaryDirectory() as tmp:
        ws = make_workspace(Path(tmp) / "ws")
        make_work = getattr(test_cli.work, "_get_wrapped_function", None)
        make_work = make_work() if make_work else test_cli.work.__pytest_wrapped__.obj
        work = make_work(Factory(tmp))
        test_cli._prepare_mistakes(work)
        print("TINY stands for `" + " ".join(test_cli.TINY) + "`.\n")
        print("| input | error (the actual message) | test |")
        print("| --- | --- | --- |")
        print("\n".join(table_rows(ws, Path(work))))


if __name__ == "__main__":  # pragma: no cover
    np.seterr(all="raise")
    main()
