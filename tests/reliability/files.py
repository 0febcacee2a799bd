"""Good run directories to damage, the damage, and the loaders every damaged file goes through.

``make_runs`` trains a tiny base and a LoRA adapter on it once per module. ``forge`` writes a
checkpoint whose checksum is right but whose content is hostile (anyone can compute a SHA-256: the
checksum finds accidents, the checks behind it find intent). ``LOADERS`` are the public ways
minilora reads a checkpoint; ``refused`` runs one and says what happened, counting the file.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np

from minilora import FileFormatError, MiniLoRAError, cli, io
from minilora.lora import LoRAConfig, apply_lora
from minilora.models import GPT
from minilora.optim import AdamW, param_groups
from minilora.train import RunDir, TrainConfig, load_run, read_checkpoint, runs
from tests.reliability import crash
from tests.reliability.conftest import COUNTS

CONFIG = TrainConfig(batch_size=2, max_iters=4, eval_interval=2, eval_iters=1, warmup_iters=1,
                     seed=3)
LORA = LoRAConfig(r=2, lora_alpha=4, target_modules=("c_attn", "c_proj"))


def make_runs(root: Path) -> Path:
    """root/{corpus.txt, base, lora}: a finished full run and a finished LoRA run on it."""
    data = root / "corpus.txt"
    data.write_text(crash.corpus_text())
    runs.pretrain(data, root / "base", crash.MODEL, CONFIG, quiet=True, threads=1)
    runs.finetune(root / "base", data, root / "lora", CONFIG, LORA, quiet=True, threads=1)
    return root


def parts(run: Path) -> tuple[dict, dict]:
    """(tensors, JSON metadata) of the checkpoint in ``run``: copies to damage."""
    path = run / "checkpoint.safetensors"
    return io.load_tensors(path), json.loads(io.load_metadata(path)["minilora"])


def forge(good: Path, out: Path, tensors: dict | None = None, meta=None,
          raw_meta: str | None = None) -> Path:
    """``out``: a copy of the run ``good`` whose checkpoint holds ``tensors`` and ``meta`` (by
    default the good ones), written with a correct checksum. Returns ``out``."""
    good_tensors, good_meta = parts(good)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    shutil.copy(good / "metrics.jsonl", out / "metrics.jsonl")
    text = raw_meta if raw_meta is not None else json.dumps(
        good_meta if meta is None else meta, allow_nan=True)
    io.save_tensors(out / "checkpoint.safetensors", good_tensors if tensors is None else tensors,
                    {"minilora": text})
    return out


def write_bytes(good: Path, out: Path, data: bytes) -> Path:
    """``out``: a copy of ``good`` whose checkpoint file is ``data``."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    shutil.copy(good / "metrics.jsonl", out / "metrics.jsonl")
    (out / "checkpoint.safetensors").write_bytes(data)
    return out


# ---- the loaders ---------------------------------------------------------------------------

def restore_target(good: Path):
    """(model, optimizer, rngs, config) built as the training loop builds them to resume the run
    in ``good``: what RunDir.restore loads into."""
    meta = read_checkpoint(good).meta
    config = TrainConfig.from_dict(meta["train_config"])
    if meta["kind"] == "lora":
        model = load_run(good.parent / "base").model
        apply_lora(model, LoRAConfig.from_dict(meta["lora_config"]), rng=model.rng)
    else:
        model = GPT(read_checkpoint(good).model_config, seed=config.seed)
    model.train()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = AdamW(param_groups(named, config.weight_decay), lr=config.lr,
                      betas=(config.beta1, config.beta2))
    rngs = (np.random.default_rng(1), np.random.default_rng(2), model.rng)
    return model, optimizer, rngs, config


def snapshot(model, optimizer, rngs) -> tuple:
    return ({k: v.copy() for k, v in model.state_dict().items()},
            copy.deepcopy(optimizer.state_dict()), [r.bit_generator.state for r in rngs])


def same(a: tuple, b: tuple) -> bool:
    (wa, oa, ra), (wb, ob, rb) = a, b
    return (wa.keys() == wb.keys() and all(np.array_equal(wa[k], wb[k]) for k in wa)
            and oa["meta"] == ob["meta"] and oa["arrays"].keys() == ob["arrays"].keys()
            and all(np.array_equal(oa["arrays"][k], ob["arrays"][k]) for k in oa["arrays"])
            and ra == rb)


def _restore(run: Path, good: Path) -> None:
    """RunDir.restore into a model, optimizer and generators; refused means all unchanged."""
    model, optimizer, rngs, config = restore_target(good)
    before = snapshot(model, optimizer, rngs)
    try:
        RunDir(run).restore(model, optimizer, rngs, config)
    except MiniLoRAError:
        if not same(before, snapshot(model, optimizer, rngs)):
            raise AssertionError("a refused checkpoint changed the model, optimizer or "
                                 "generators") from None
        raise


def _cli(run: Path, good: Path) -> None:
    """``minilora generate --model RUN``: exit 2 and one line when refused."""
    import contextlib
    import io as stdio
    err, out = stdio.StringIO(), stdio.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        code = cli.main(["generate", "--model", str(run), "--max-new-tokens", "2"])
    if code == 0:
        return
    lines = err.getvalue().splitlines()
    if code != 2 or len(lines) != 1 or not lines[0].startswith("minilora: error: "):
        raise AssertionError(f"exit {code}, stderr {err.getvalue()!r}")
    raise FileFormatError(lines[0])  # the line, to check what it names


LOADERS = {
    "read_checkpoint": lambda run, good: read_checkpoint(run),
    "load_run": lambda run, good: load_run(run),
    "restore": _restore,
    "resume": lambda run, good: runs.resume(run, quiet=True, threads=1),
    "cli": _cli,
}


def refused(loader: str, run: Path, good: Path, what: str = "damaged files") -> str | None:
    """Run ``loader`` on ``run``: the FileFormatError message if refused, None if accepted.

    Any other exception fails the test, as does a message that does not name the file.
    """
    COUNTS[what] += 1
    try:
        LOADERS[loader](run, good)
    except FileFormatError as e:
        message = str(e)
        if str(run) not in message:
            raise AssertionError(f"{loader}: the message does not name {run}: {message}") \
                from None
        return message
    return None
