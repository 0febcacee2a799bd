"""The ``minilora`` command, run as a user runs it: in a subprocess, on tiny models.

Every command runs once for real (train in its four ways, merge, generate, eval, params, and the
demo on a tiny plan), and every user mistake the issue lists must print exactly one line,
``minilora: error: ...``, on stderr, exit with code 2, print no traceback and leave no checkpoint
behind. The subprocesses of the error cases run a few at a time (most of their time is importing).
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from minilora import cli
from minilora.io import load_tensors
from minilora.train import read_checkpoint
from minilora.train.checkpoint import CHECKPOINT, METRICS

ENV = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "MPLBACKEND": "Agg", "PYTHONUNBUFFERED": "1"}


def _default_sigint():
    """Give the child Ctrl-C's default meaning: a shell's background job (a test run started
    with '&', say) ignores SIGINT and a child inherits that, so Python would never raise
    KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "24",
        "--batch-size", "4", "--eval-iters", "2", "--threads", "1"]
FINETUNE = ["--max-iters", "12", "--eval-interval", "6", "--eval-iters", "2", "--batch-size", "4",
            "--threads", "1"]
COMMANDS = ("demo", "train", "merge", "export", "generate", "eval", "params", "bench",
            "check", "vectors")


def minilora(*args: str, cwd: Path, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "minilora.cli", *args], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return result.stdout


def corpus_text(n_words: int = 600) -> str:
    rng = np.random.default_rng(0)
    words = "the cat sat on a mat while one dog ran after two red birds".split()
    return " ".join(words[i] for i in rng.integers(len(words), size=n_words)) + ".\n"


class Work(os.PathLike):
    """A directory (``work / "base"``, ``cwd=work``) and what each command printed there."""

    def __init__(self, path: Path):
        self.path, self.outputs = path, {}

    def __truediv__(self, other) -> Path:
        return self.path / other

    def __fspath__(self) -> str:
        return str(self.path)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Work:
    """A directory with runs made by the CLI: a base, a full and a LoRA fine-tune, a merge."""
    d = Work(tmp_path_factory.mktemp("cli"))
    (d / "corpus.txt").write_text(corpus_text(), encoding="utf-8")
    d.outputs["base"] = ok(minilora("train", "--data", "builtin:world", "--out", "base", *TINY,
                                    "--max-iters", "30", "--eval-interval", "15", cwd=d))
    d.outputs["full"] = ok(minilora("train", "--data", "builtin:majority", "--init-from", "base",
                                    "--out", "full", *FINETUNE, cwd=d))
    d.outputs["lora"] = ok(minilora("train", "--data", "builtin:majority", "--init-from", "base",
                                    "--out", "lora", "--lora-r", "2", "--lora-dropout", "0.1",
                                    "--dropout", "0.1", "--target-modules", "c_attn,c_proj",
                                    *FINETUNE, cwd=d))
    d.outputs["merge"] = ok(minilora("merge", "--model", "lora", "--out", "merged", cwd=d))
    return d


# ---- every command, once ----------------------------------------------------------------------
def test_train_says_what_it_trains_each_evaluation_and_where_it_saved(work):
    lines = work.outputs["base"].splitlines()
    assert lines[0].startswith("pretraining a new GPT (1 layer x 16 (2 heads), block 24")
    assert "builtin:world" in lines[0] and "30 steps of batch 4" in lines[0]
    assert [line.split(":")[0] for line in lines[1:4]] == ["iter 0", "iter 15", "iter 30"]
    assert lines[-2].startswith("done: iter 30, train loss ")
    assert " ms/step (median, " in lines[-2] and lines[-2].endswith(" s in all the run's steps")
    assert lines[-1] == f"saved {Path('base') / CHECKPOINT} and {Path('base') / METRICS}"


def test_train_writes_a_checkpoint_and_one_metrics_line_per_evaluation(work):
    records = [json.loads(x) for x in (work / "base" / METRICS).read_text().splitlines()]
    assert [r["iter"] for r in records] == [0, 15, 30]
    assert set(records[-1]) == {"iter", "train_loss", "val_loss", "lr", "elapsed_s",
                                "tokens_per_s"}
    meta = read_checkpoint(work / "base").meta
    assert meta["kind"] == "full" and meta["iter"] == 30
    assert meta["data"]["source"] == "builtin:world"


def test_train_no_bias_makes_a_model_without_biases(work, capsys):
    """nanoGPT's default (bias=False), for comparing with its published runs."""
    code, _, err = _in_this_process(["train", "--data", "builtin:world", "--out",
                                     str(work / "nobias"), *TINY, "--max-iters", "2",
                                     "--no-bias", "--quiet", "--threads", "1"], capsys)
    assert code == 0, err
    ckpt = read_checkpoint(work / "nobias")
    assert ckpt.meta["model_config"]["bias"] is False
    assert not any(name.endswith(".bias") for name in ckpt.weights)
    code, _, err = _in_this_process(["train", "--data", "builtin:majority", "--init-from",
                                     str(work / "base"), "--out", str(work / "nb2"),
                                     "--no-bias"], capsys)
    assert code == 2 and "fixes the architecture (and the vocabulary); drop --no-bias" in err


def test_train_init_from_fine_tunes_every_parameter(work):
    assert "fine-tuning base in full" in work.outputs["full"]
    base, full = read_checkpoint(work / "base"), read_checkpoint(work / "full")
    assert full.meta["kind"] == "full" and set(full.weights) == set(base.weights)
    assert full.meta["init_from"] == str((work / "base").resolve())


def test_train_lora_r_saves_only_the_adapter_beside_a_reference_to_its_base(work):
    first = work.outputs["lora"].splitlines()[0]
    assert "with LoRA r=2, alpha 4 on c_attn, c_proj" in first and "trainable" in first
    ckpt = read_checkpoint(work / "lora")
    assert ckpt.meta["kind"] == "lora" and ckpt.meta["lora_config"]["r"] == 2
    assert ckpt.weights and all(n.endswith(("lora_A", "lora_B")) for n in ckpt.weights)
    assert ckpt.meta["base"]["path"] == os.path.join("..", "base")
    assert len(ckpt.meta["base"]["sha256"]) == 64


def test_train_pissa_with_loraplus_keeps_both_in_the_run(work, capsys):
    """--init-lora-weights pissa and --loraplus-lr-ratio reach the configs the run keeps."""
    code, _, err = _in_this_process(["train", "--data", "builtin:majority", "--init-from",
                                     str(work / "base"), "--out", str(work / "pissa"),
                                     "--lora-r", "2", "--init-lora-weights", "pissa",
                                     "--loraplus-lr-ratio", "8", *FINETUNE, "--quiet"], capsys)
    assert code == 0, err
    ckpt = read_checkpoint(work / "pissa")
    assert ckpt.meta["lora_config"]["init_lora_weights"] == "pissa"
    assert ckpt.meta["train_config"]["loraplus_lr_ratio"] == 8
    groups = ckpt.meta["optimizer"]["param_groups"]
    assert [g["lr"] / groups[0]["lr"] for g in groups if g["params"]] == [1.0, 8.0]


def test_merge_writes_a_plain_model_whose_logits_match(work):
    out = work.outputs["merge"]
    assert out.startswith(f"merged lora into {Path('merged') / CHECKPOINT}: a plain model")
    diff = float(out.rsplit("= ", 1)[1])
    assert diff < 1e-4
    merged = read_checkpoint(work / "merged")
    assert merged.meta["kind"] == "full" and not any("lora" in n for n in merged.weights)


def test_generate_continues_the_prompt_and_reads_escapes(work):
    out = ok(minilora("generate", "--model", "lora", "--prompt", "the cat\\nis",
                      "--max-new-tokens", "5", "--temperature", "0", "--threads", "1", cwd=work))
    assert out.startswith("the cat\nis") and len(out.rstrip("\n")) >= len("the cat\nis")
    # greedy: the merged model continues exactly as the adapter on its base does
    merged = ok(minilora("generate", "--model", "merged", "--prompt", "the cat\\nis",
                         "--max-new-tokens", "5", "--temperature", "0", "--threads", "1",
                         cwd=work))
    assert merged == out


def test_generate_hands_a_small_models_decoding_to_blas_threads(work, capsys, monkeypatch):
    """A new token is one row through every weight, products too small for the engine to split
    with profit: generate threads them as training threads a step of batch 1 (BLAS's own)."""
    from threadpoolctl import threadpool_info

    from minilora import runtime
    from minilora.models import GPT

    seen, next_logits = [], GPT.next_logits

    def spy(self, idx, cache=None):
        blas = max(lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas")
        seen.append((runtime.splits_products(), runtime.threads(), blas))
        return next_logits(self, idx, cache)

    monkeypatch.setattr(GPT, "next_logits", spy)
    monkeypatch.chdir(work)
    code, out, err = _in_this_process(["generate", "--model", "base", "--prompt", "the cat",
                                       "--max-new-tokens", "3", "--threads", "2"], capsys)
    assert code == 0 and out.startswith("the cat"), err
    assert seen and all(s == (False, 1, 2) for s in seen), seen


def test_unescape_keeps_anything_that_is_not_an_escape():
    from minilora.commands import unescape

    assert unescape("a\\nb\\tc\\\\n") == "a\nb\tc\\n"
    assert unescape("café \\x41 \\u00e9") == "café \\x41 \\u00e9"


def test_eval_prints_the_losses_and_the_task_exact_match(work):
    out = ok(minilora("eval", "--model", "lora", "--data", "builtin:majority", "--eval-iters",
                      "2", "--batch-size", "4", "--threads", "1", cwd=work))
    first, second = out.splitlines()
    assert first.startswith("builtin:majority: train loss ") and "val loss" in first
    assert second.startswith("majority: exact match ") and "/200 held-out prompts" in second


@pytest.mark.parametrize(("shape", "rank", "lines"), [
    ("4096x4096", "4", ["weight W: 4,096 x 4,096 = 16,777,216 parameters",
                        "LoRA, rank 4: A (4 x 4,096) + B (4,096 x 4) = 4 x (4,096 + 4,096) "
                        "= 32,768 trainable parameters",
                        "ratio: 32,768 / 16,777,216 = 1/512 (0.1953%)"]),
    ("3x3", "1", ["weight W: 3 x 3 = 9 parameters",
                  "LoRA, rank 1: A (1 x 3) + B (3 x 1) = 1 x (3 + 3) = 6 trainable parameters",
                  "ratio: 6 / 9 = 2/3 (66.6667%)"]),
])
def test_params_prints_the_parameter_arithmetic(shape, rank, lines, tmp_path):
    out = ok(minilora("params", "--shape", shape, "--rank", rank, cwd=tmp_path))
    assert out.splitlines() == lines


def test_python_dash_m_minilora_is_the_command(tmp_path):
    """``python -m minilora`` runs the same main: the same output, the same exit code 2."""
    args = ["params", "--shape", "3x3", "--rank", "1"]
    as_module = subprocess.run([sys.executable, "-m", "minilora", *args], cwd=tmp_path, env=ENV,
                               capture_output=True, text=True, timeout=60)
    assert as_module.returncode == 0 and as_module.stdout == ok(minilora(*args, cwd=tmp_path))
    bad = subprocess.run([sys.executable, "-m", "minilora", "params", "--rank", "0"],
                         cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.startswith("minilora: error: params: ")


def test_ctrl_c_then_resume_gives_the_run_that_never_stopped(work):
    args = ["train", "--data", "corpus.txt", *TINY, "--dropout", "0.1", "--max-iters", "200",
            "--eval-interval", "10", "--quiet"]
    proc = subprocess.Popen([sys.executable, "-m", "minilora.cli", *args, "--out", "stopped"],
                            cwd=work, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=_default_sigint)
    metrics, deadline = work / "stopped" / METRICS, time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:  # the first checkpoint after 0
        if metrics.exists() and metrics.read_text().count("\n") >= 3:  # iter 10 saved
            proc.send_signal(signal.SIGINT)
            break
        time.sleep(0.005)
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the run finished before it could be interrupted (a very fast machine)")
    stopped_at = read_checkpoint(work / "stopped").meta["iter"]
    assert 10 <= stopped_at < 200
    assert proc.returncode == 130
    assert err.strip() == (f"minilora: interrupted; the last checkpoint (iteration {stopped_at}) "
                           "is in stopped: continue with 'minilora train --out stopped --resume'")

    out = ok(minilora("train", "--out", "stopped", "--resume", "--threads", "1", cwd=work))
    assert out.startswith(f"resuming stopped at iteration {stopped_at} of 200")
    ok(minilora(*args, "--out", "whole", cwd=work))
    a, b = load_tensors(work / "stopped" / CHECKPOINT), load_tensors(work / "whole" / CHECKPOINT)
    assert sorted(a) == sorted(b)
    assert all(a[k].tobytes() == b[k].tobytes() for k in a)


def test_resuming_a_finished_run_says_it_is_complete(work):
    out = ok(minilora("train", "--out", "full", "--resume", "--quiet", cwd=work))
    assert out.strip().endswith("the run in full is complete")


def _tensors_equal(a: Path, b: Path) -> bool:
    """Every tensor of the two checkpoints (the weights and the optimizer state), bit for bit."""
    x, y = load_tensors(a / CHECKPOINT), load_tensors(b / CHECKPOINT)
    return sorted(x) == sorted(y) and all(x[k].tobytes() == y[k].tobytes() for k in x)


def test_a_pissa_loraplus_run_resumed_equals_the_run_that_never_stopped(work, capsys):
    """Resuming factors the base again (the same W_res, bit for bit) and keeps LoRA+'s groups."""
    how = ["--init-from", str(work / "base"), "--lora-r", "2", "--init-lora-weights", "pissa",
           "--loraplus-lr-ratio", "8", "--data", "builtin:majority", "--eval-interval", "4",
           "--eval-iters", "2", "--batch-size", "4", "--threads", "1", "--quiet"]
    for args in (["--out", str(work / "pl-whole"), "--max-iters", "8", *how],
                 ["--out", str(work / "pl-cut"), "--max-iters", "4", "--lr-decay-iters", "8",
                  *how],
                 ["--out", str(work / "pl-cut"), "--resume", "--max-iters", "8", "--quiet",
                  "--threads", "1"]):
        code, _, err = _in_this_process(["train", *args], capsys)
        assert code == 0, err
    assert _tensors_equal(work / "pl-whole", work / "pl-cut")


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_extending_a_finished_run_equals_a_run_that_had_the_steps_from_the_start(kind, work,
                                                                                 capsys):
    """--resume --max-iters 24 on a run that ended at 12 is the run made with --max-iters 24
    --lr-decay-iters 12 (the schedule keeps its end; min_lr after it), weights and AdamW state
    bit for bit, dropout and all."""
    how = ["--init-from", str(work / "base"), "--lora-r", "2", "--lora-dropout", "0.1"] \
        if kind == "lora" else [*TINY[:8]]
    args = ["train", "--data", str(work / "corpus.txt"), *how, "--dropout", "0.1",
            "--warmup-iters", "2", "--eval-interval", "6", "--batch-size", "4", "--eval-iters",
            "2", "--threads", "1", "--quiet"]
    short, long = work / f"short-{kind}", work / f"long-{kind}"
    assert _in_this_process([*args, "--max-iters", "12", "--out", str(short)], capsys)[0] == 0
    code, out, err = _in_this_process(["train", "--out", str(short), "--resume", "--max-iters",
                                       "24", "--threads", "1"], capsys)
    assert code == 0, err
    assert out.startswith(f"resuming {short} at iteration 12 of 24 (extended from 12; lr 0.0001 "
                          "after iteration 12)")
    assert _in_this_process([*args, "--max-iters", "24", "--lr-decay-iters", "12", "--out",
                             str(long)], capsys)[0] == 0
    assert _tensors_equal(short, long)
    assert read_checkpoint(short).meta["train_config"] == read_checkpoint(long).meta["train_config"]
    # and extending it once more is a plain resume from then on
    assert _in_this_process(["train", "--out", str(short), "--resume", "--quiet"], capsys)[0] == 0


def test_a_moved_base_is_named_and_found_with_base(work, capsys):
    moved = work / "moved-lora"
    shutil.copytree(work / "lora", moved / "runs" / "lora")
    shutil.copytree(work / "base", moved / "elsewhere" / "base")
    run = str(moved / "runs" / "lora")
    gen = ["generate", "--model", run, "--prompt", "the cat", "--max-new-tokens", "5",
           "--temperature", "0", "--threads", "1"]
    code, _, err = _in_this_process(gen, capsys)
    recorded = (moved / "runs" / "base").resolve()
    assert code == 2 and f"that is {recorded}, and it was {(work / 'base').resolve()} when the " \
        "run started; if it moved, give its new place with --base DIR" in err
    code, out, err = _in_this_process([*gen, "--base", str(moved / "elsewhere" / "base")], capsys)
    assert code == 0, err
    assert out == ok(minilora(*gen[:2], "lora", *gen[3:], cwd=work))  # the adapter's own output
    # resumed with --base, the run records where its base is now
    code, _, err = _in_this_process(["train", "--out", run, "--resume", "--max-iters", "14",
                                     "--base", str(moved / "elsewhere" / "base"), "--quiet",
                                     "--threads", "1"], capsys)
    assert code == 0, err
    assert read_checkpoint(run).meta["base"]["path"] == os.path.join("..", "..", "elsewhere",
                                                                      "base")
    assert _in_this_process(gen, capsys)[0] == 0  # found without --base from now on


def test_tokenizer_byte_makes_a_model_that_reads_any_text(work, capsys):
    out = work / "bytes"
    code, _, err = _in_this_process(["train", "--data", str(work / "corpus.txt"), "--out",
                                     str(out), *TINY, "--max-iters", "2", "--tokenizer", "byte",
                                     "--quiet"], capsys)
    assert code == 0, err
    ckpt = read_checkpoint(out)
    assert ckpt.meta["tokenizer"] == {"type": "byte"} and ckpt.model_config.vocab_size == 256
    code, text, err = _in_this_process(["generate", "--model", str(out), "--prompt", "Äé 日本",
                                        "--max-new-tokens", "3", "--threads", "1"], capsys)
    assert code == 0 and text.startswith("Äé 日本"), err
    (work / "umlauts.txt").write_text("Über alles, café noir. " * 60, encoding="utf-8")
    code, _, err = _in_this_process(["train", "--data", str(work / "umlauts.txt"), "--init-from",
                                     str(out), "--out", str(work / "bytes-ft"), *FINETUNE[:2],
                                     "--quiet", "--threads", "1"], capsys)
    assert code == 0, err  # the text the character base could not read


def test_bench_refuses_a_missing_pytorch_before_it_starts(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr("minilora.bench.references.torch_peer_path",
                        lambda: (None, "PyTorch is not installed (pip install torch)"))
    _block_benchmark(monkeypatch)
    code, out, err = _in_this_process(["bench", "--compare", "torch"], capsys)
    assert (code, out) == (2, "")
    assert err == "minilora: error: --compare torch: PyTorch is not installed (pip install torch)\n"
    code, _, err = _in_this_process(["bench", "--json", str(tmp_path)], capsys)
    assert code == 2 and err.endswith(": is a directory\n")


def test_generate_streams_tokens_and_keeps_them_on_ctrl_c(work):
    """The tokens appear as they are made; Ctrl-C stops, keeps them, ends the line, exit 130."""
    proc = subprocess.Popen([sys.executable, "-m", "minilora.cli", "generate", "--model", "base",
                             "--prompt", "the cat", "--max-new-tokens", "1000000", "--threads",
                             "1"], cwd=work, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, preexec_fn=_default_sigint)
    seen, deadline = b"", time.monotonic() + 120
    os.set_blocking(proc.stdout.fileno(), False)
    while proc.poll() is None and time.monotonic() < deadline and len(seen) < 40:
        seen += proc.stdout.read() or b""
        time.sleep(0.01)
    assert len(seen) >= 40, "no tokens streamed while generating"  # long before a million
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    text = (seen + out).decode()
    assert proc.returncode == 130 and err.decode().strip() == "minilora: interrupted"
    assert text.startswith("the cat") and text.endswith("\n") and len(text) > 40


def test_text_streamer_prints_exactly_what_generate_returns(work, capsys):
    """The streamed text is the decoded sequence, a character split across byte tokens held
    back until it is whole."""
    from minilora.data import ByteTokenizer
    from minilora.models import TextStreamer

    tokenizer = ByteTokenizer()
    streamer = TextStreamer(tokenizer)
    ids = tokenizer.encode("a é 日")
    streamer.put(ids[None, :2])
    printed = []
    for i in ids[2:]:
        streamer.put(np.array([i]))
        printed.append(capsys.readouterr().out)
    streamer.end()
    assert "".join(printed) + capsys.readouterr().out == "a é 日\n"
    assert printed[-3:] == ["", "", "日"]  # three bytes, one character
    run = read_checkpoint(work / "base")
    model = __import__("minilora").train.load_run(work / "base").model
    out = model.generate(run.tokenizer.encode("the")[None, :], 12, rng=3,
                         streamer=TextStreamer(run.tokenizer))
    assert capsys.readouterr().out == run.tokenizer.decode(out[0]) + "\n"


# ---- help ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_examples(command, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert f"usage: minilora {command}" in out
    assert "example" in out and f"minilora {command}" in out.split("example", 1)[1]


def test_the_installed_entry_point_lists_every_command(tmp_path):
    exe = shutil.which("minilora", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("the minilora entry point is not installed beside this python")
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, env=ENV, cwd=tmp_path,
                         timeout=60)
    assert out.returncode == 0
    assert all(c in out.stdout for c in COMMANDS) and "minilora demo" in out.stdout


# ---- user mistakes: one line, exit code 2, nothing half-written -------------------------------
def _prepare_mistakes(work: Work) -> None:
    """The bad files, and the LoRA run beside a base that is another model and beside none."""
    (work / "empty.txt").write_bytes(b"")
    (work / "latin1.txt").write_bytes("caf\xe9 au lait ".encode("latin-1") * 50)
    (work / "short.txt").write_text("a short text", encoding="utf-8")
    (work / "odd.txt").write_text("Über alles " * 100, encoding="utf-8")
    (work / "other").mkdir()
    shutil.copytree(work / "lora", work / "other" / "lora")
    shutil.copytree(work / "full", work / "other" / "base")  # same architecture, other weights
    shutil.copytree(work / "lora", work / "orphan" / "lora")
    (work / "emptydir").mkdir()


def _mistakes() -> dict[str, tuple[list[str], str, str | None]]:
    """id -> (arguments, a part of the message, the --out that must not hold a checkpoint)."""
    new = ["train", "--data", "corpus.txt", *TINY, "--max-iters", "2"]
    lora = ["train", "--data", "builtin:majority", "--init-from", "base", "--lora-r", "2",
            "--max-iters", "2", "--threads", "1"]
    return {
        "missing-file": (["train", "--data", "nope.txt", "--out", "o1", *TINY],
                         "nope.txt: file does not exist", "o1"),
        "empty-file": (["train", "--data", "empty.txt", "--out", "o2", *TINY],
                       "empty.txt: file is empty", "o2"),
        "not-utf8": (["train", "--data", "latin1.txt", "--out", "o3", *TINY],
                     "not UTF-8 text: byte 0xe9", "o3"),
        "n-embd-vs-n-head": (["train", "--data", "corpus.txt", "--out", "o4", "--n-embd", "30",
                              "--n-head", "4"], "--n-embd (30) must be divisible by --n-head (4)",
                             "o4"),
        "block-longer-than-data": (["train", "--data", "short.txt", "--out", "o5", *TINY],
                                   "fewer than block_size + 1 = 25", "o5"),
        "block-longer-than-data-builtin": ([*new[:2], "builtin:majority", *new[3:], "--out",
                                            "o5b", "--block-size", "500000"], "block_size", "o5b"),
        "unknown-target-module": ([*lora, "--out", "o6", "--target-modules", "c_atn"],
                                  "'c_atn' matches no module", "o6"),
        "base-missing": ([*lora[:4], "no-such-run", *lora[5:], "--out", "o7"],
                         "no-such-run", "o7"),
        "base-is-a-lora-run": ([*lora[:4], "lora", *lora[5:], "--out", "o8"],
                               "it is a LoRA run; merge it first", "o8"),
        "data-the-base-cannot-read": ([*lora[:2], "odd.txt", *lora[3:], "--out", "o9"],
                                      "'Ü' (U+00DC, first at position 0, 100 times)", "o9"),
        "adapter-on-another-base": (["generate", "--model", "other/lora", "--prompt", "a"],
                                    "weights fingerprint differs", None),
        "adapter-without-its-base": (["merge", "--model", "orphan/lora", "--out", "o10"],
                                     "the adapter's base model is missing: the run records it "
                                     "as '../base' from the run, that is ", "o10"),
        "moved-base-named-wrongly": (["generate", "--model", "orphan/lora", "--base", "nowhere"],
                                     "--base nowhere: not a minilora run directory nor a Hugging "
                                     "Face model directory", None),
        "base-of-a-full-run": (["generate", "--model", "base", "--base", "base"],
                               "base is a full model, it has no base", None),
        "base-without-resume": ([*new, "--out", "o28", "--base", "base"], "--base needs --resume",
                                "o28"),
        "init-from-a-file": ([*lora[:4], "corpus.txt", *lora[5:], "--out", "o29"],
                             "corpus.txt: a file, not a run directory", "o29"),
        "underscore-flag": (["train", "--out", "o30", "--lora_r", "4"],
                            "train: unrecognized arguments: --lora_r 4; did you mean --lora-r? "
                            "(see 'minilora train --help')", "o30"),
        "extend-to-before-the-checkpoint": (["train", "--out", "full", "--resume", "--max-iters",
                                             "3"], "--max-iters 3: the run in full is at "
                                                   "iteration 12 already", None),
        "tokenizer-with-init-from": ([*lora, "--out", "o31", "--tokenizer", "byte"],
                                     "drop --tokenizer", "o31"),
        "tokenizer-with-resume": (["train", "--out", "full", "--resume", "--tokenizer", "byte"],
                                  "drop --tokenizer", None),
        "unknown-tokenizer": ([*new, "--out", "o32", "--tokenizer", "bpe"],
                              "invalid choice: 'bpe'", "o32"),
        "neither-run-nor-hf": (["generate", "--model", "emptydir"],
                               "emptydir: neither a minilora run directory", None),
        "export-full-run-as-peft": (["export", "--model", "base", "--out", "o33", "--format",
                                     "peft"], "is a full run, with no adapter", "o33"),
        "export-lora-run-as-hf": (["export", "--model", "lora", "--out", "o34", "--format", "hf"],
                                  "is a LoRA run; write its adapter with --format peft", "o34"),
        "bench-json-nowhere": (["bench", "--json", "nowhere/x.json"],
                               "--json nowhere/x.json: the directory nowhere does not exist",
                               None),
        "resume-another-base": (["train", "--out", "other/lora", "--resume"],
                                "weights fingerprint differs", None),
        "resume-nothing": (["train", "--out", "o11", "--resume"], "no checkpoint to resume from",
                           "o11"),
        "resume-with-settings": (["train", "--out", "lora", "--resume", "--lr", "1"],
                                 "--resume continues with the run's own settings; drop --lr",
                                 None),
        "lora-r-without-init-from": ([*new, "--out", "o12", "--lora-r", "4"],
                                     "--lora-r needs --init-from", "o12"),
        "lora-flag-without-lora-r": ([*new, "--out", "o13", "--lora-alpha", "8"],
                                     "need --lora-r", "o13"),
        "pissa-niter": ([*lora, "--out", "o40", "--init-lora-weights", "pissa_niter_4"],
                        "--init-lora-weights='pissa_niter_4' (PEFT's randomized SVD", "o40"),
        "loraplus-ratio-zero": ([*lora, "--out", "o41", "--loraplus-lr-ratio", "0"],
                                "--loraplus-lr-ratio must be a finite number > 0", "o41"),
        "negative-lr": ([*new, "--out", "o14", "--lr", "-1"], "--lr must be", "o14"),
        "zero-lr": ([*new, "--out", "o15", "--lr", "0"], "--lr must be > 0", "o15"),
        "non-numeric-lr": ([*new, "--out", "o16", "--lr", "fast"], "expected a number, got 'fast'",
                           "o16"),
        "nan-lr": ([*new, "--out", "o16b", "--lr", "nan"], "expected a finite number", "o16b"),
        "zero-batch-size": ([*new, "--out", "o17", "--batch-size", "0"],
                            "--batch-size: expected a positive integer, got 0", "o17"),
        "negative-max-iters": ([*new, "--out", "o18", "--max-iters", "-5"],
                               "--max-iters: expected an integer >= 0", "o18"),
        "non-integer-n-layer": ([*new, "--out", "o19", "--n-layer", "2.5"],
                                "--n-layer: expected a positive integer", "o19"),
        "negative-weight-decay": ([*new, "--out", "o20", "--weight-decay", "-0.1"],
                                  "--weight-decay must be", "o20"),
        "dropout-one": ([*new, "--out", "o21", "--dropout", "1"], "--dropout must be", "o21"),
        "zero-lora-alpha": ([*lora, "--out", "o22", "--lora-alpha", "0"], "--lora-alpha", "o22"),
        "min-lr-above-lr": ([*new, "--out", "o23", "--min-lr", "0.1", "--lr", "0.01"],
                            "--min-lr (0.1) must not exceed --lr (0.01)", "o23"),
        "out-holds-a-run": ([*new[:-2], "--max-iters", "2", "--out", "base"],
                            "already holds a run", None),
        "architecture-with-init-from": ([*lora, "--out", "o24", "--n-layer", "3"],
                                        "fixes the architecture (and the vocabulary); drop "
                                        "--n-layer", "o24"),
        "no-data": (["train", "--out", "o25"], "--data", "o25"),
        "merge-a-full-run": (["merge", "--model", "base", "--out", "o26"], "not a LoRA run",
                             "o26"),
        "merge-into-a-run": (["merge", "--model", "lora", "--out", "merged"],
                             "already holds a model", None),
        "generate-not-a-run": (["generate", "--model", "no-such-run"], "no checkpoint here",
                               None),
        "generate-unknown-char": (["generate", "--model", "base", "--prompt", "ÄÖ"],
                                  "--prompt: ", None),
        "generate-negative-temperature": (["generate", "--model", "base", "--temperature", "-1"],
                                          "--temperature must be >= 0", None),
        "eval-missing-data": (["eval", "--model", "base", "--data", "nope.txt"],
                              "nope.txt: file does not exist", None),
        "params-bad-shape": (["params", "--shape", "4096", "--rank", "4"], "expected OUTxIN",
                             None),
        "params-zero-rank": (["params", "--shape", "3x3", "--rank", "0"],
                             "--rank: expected a positive integer", None),
        "unknown-command": (["fine-tune"], "invalid choice: 'fine-tune'", None),
        "unknown-flag": (["train", "--out", "o27", "--learning-rate", "1"],
                         "unrecognized arguments: --learning-rate", "o27"),
        "demo-out-is-a-file": (["demo", "--quick", "--out", "corpus.txt/x"], "corpus.txt",
                               None),
        "zero-grad-accum": ([*new, "--out", "o-accum", "--grad-accum", "0"],
                            "--grad-accum: expected a positive integer, got 0", "o-accum"),
        "grad-accum-with-resume": (["train", "--out", "full", "--resume", "--grad-accum", "4"],
                                   "--resume continues with the run's own settings; drop "
                                   "--grad-accum", None),
    }


# the list, each run in a process of its own; the other mistakes run in this process
# (cli.main, the same code after the interpreter starts), which takes milliseconds, not seconds
IN_A_PROCESS = ("missing-file", "empty-file", "not-utf8", "n-embd-vs-n-head",
                "block-longer-than-data", "unknown-target-module", "base-missing",
                "adapter-on-another-base", "resume-nothing", "lora-r-without-init-from",
                "negative-lr", "zero-lr", "non-numeric-lr", "zero-batch-size")


@pytest.fixture(scope="module")
def mistakes(work) -> dict[str, subprocess.CompletedProcess]:
    _prepare_mistakes(work)
    cases = _mistakes()
    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = {k: pool.submit(minilora, *cases[k][0], cwd=work) for k in IN_A_PROCESS}
    return {k: f.result() for k, f in futures.items()}


def _no_benchmark(*args, **kwargs):
    raise AssertionError("the benchmark ran: a mistake must be found before it starts")


def _block_benchmark(monkeypatch) -> None:
    """A test of ``minilora bench`` that gets past its checks fails at once, timing nothing."""
    monkeypatch.setattr(importlib.import_module("minilora.bench.report"), "run", _no_benchmark)


def _in_this_process(args: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = cli.main(args)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("case", list(_mistakes()))
def test_a_mistake_is_one_line_exit_code_2_and_nothing_half_written(case, mistakes, work, capsys,
                                                                    monkeypatch):
    args, message, out = _mistakes()[case]
    if case in mistakes:
        r = mistakes[case]
        code, stdout, stderr = r.returncode, r.stdout, r.stderr
    else:
        monkeypatch.chdir(work)
        _block_benchmark(monkeypatch)
        code, stdout, stderr = _in_this_process(args, capsys)
    assert code == 2, (stdout, stderr)
    assert "Traceback" not in stderr
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("minilora: error: "), stderr
    assert message in lines[0]
    assert stdout == ""
    if out is not None:
        assert not (work / out / CHECKPOINT).exists()
        assert not (work / out).exists(), f"{out} was created: {list((work / out).iterdir())}"


def test_a_bad_setting_is_named_by_its_flag_where_it_is_checked():
    """The configs' own checks say --n-embd and --lora-r inside naming_fields, their field names
    outside it: no message is rewritten afterwards."""
    from minilora.commands import _as_flag
    from minilora.configs import naming_fields
    from minilora.errors import ConfigError
    from minilora.lora import LoRAConfig
    from minilora.models import GPTConfig

    with naming_fields(_as_flag):
        with pytest.raises(ConfigError, match=r"^--n-embd \(30\) must be divisible by --n-head"):
            GPTConfig(n_embd=30, n_head=4)
        with pytest.raises(ConfigError, match=r"^--lora-r must be a positive integer, got 0$"):
            LoRAConfig(r=0)
        with pytest.raises(ConfigError, match=r"^LoRAConfig\.bias must be one of"):
            LoRAConfig(bias="some")  # no flag sets it: its field name
    with pytest.raises(ConfigError, match=r"^GPTConfig\.n_embd \(30\) must be divisible by n_head"):
        GPTConfig(n_embd=30, n_head=4)


def test_train_use_dora_trains_and_saves_the_magnitude_and_merges(work, capsys):
    """--use-dora: the adapter holds lora_magnitude_vector (one per output row), a resume and a
    merge read it; on an embedding it is a one-line error, exit 2."""
    out = work / "dora"
    code, stdout, err = _in_this_process(["train", "--data", "builtin:majority", "--init-from",
                                          str(work / "base"), "--out", str(out), "--lora-r", "2",
                                          "--use-dora", *FINETUNE], capsys)
    assert code == 0, err
    assert "with DoRA r=2" in stdout.splitlines()[0]
    ckpt = read_checkpoint(out)
    assert ckpt.meta["lora_config"]["use_dora"] is True
    magnitudes = [n for n in ckpt.weights if n.endswith(".lora_magnitude_vector")]
    assert magnitudes and all(ckpt.weights[n].ndim == 1 for n in magnitudes)
    code, stdout, err = _in_this_process(["merge", "--model", str(out), "--out",
                                          str(work / "dora-merged")], capsys)
    assert code == 0, err
    code, _, err = _in_this_process(["train", "--data", "builtin:majority", "--init-from",
                                     str(work / "base"), "--out", str(work / "dora-wte"),
                                     "--lora-r", "2", "--use-dora", "--target-modules", "wte"],
                                    capsys)
    assert code == 2 and "DoRA on an Embedding is not implemented" in err and \
        err.count("\n") == 1
    assert not (work / "dora-wte").exists()


def test_params_use_dora_counts_the_magnitude_too(capsys):
    """4096x4096 at rank 4: LoRA's 32,768 plus m's 4,096 = 36,864, 9/4096 of the weight."""
    code, out, err = _in_this_process(["params", "--shape", "4096x4096", "--rank", "4",
                                       "--use-dora"], capsys)
    assert code == 0, err
    assert "DoRA, rank 4: A (4 x 4,096) + B (4,096 x 4) + m (4,096) = 4 x (4,096 + 4,096) + " \
        "4,096 = 36,864 trainable parameters" in out
    assert "36,864 / 16,777,216 = 9/4096" in out
