"""What each ``minilora`` subcommand does (the parser is in ``minilora.cli``).

Each ``cmd_*`` takes the parsed arguments, prints what it did on stdout and returns the exit code.
A user mistake is raised as a :class:`minilora.MiniLoRAError`; ``cli.main`` turns it into one line,
``minilora: error: ...``, and exit code 2.
"""

from __future__ import annotations

import dataclasses
import math
import re
import sys
from pathlib import Path

import numpy as np

from minilora.configs import naming_fields
from minilora.errors import ConfigError, DataError, MiniLoRAError
from minilora.models import GPTConfig
from minilora.train import TrainConfig
from minilora.train.checkpoint import CHECKPOINT, METRICS

_MODEL_FLAGS = ("n_layer", "n_head", "n_embd", "block_size", "dtype")
_TRAIN_FLAGS = {f.name for f in dataclasses.fields(TrainConfig)} - {"on_nonfinite"}
_LORA_FLAGS = ("lora_alpha", "lora_dropout", "target_modules", "use_rslora", "lora_targets")
# a config field the command line sets, and the flag that sets it
_FLAG_OF = {**{("TrainConfig", n): n for n in _TRAIN_FLAGS},
            **{("GPTConfig", n): n for n in (*_MODEL_FLAGS, "dropout")},
            **{("LoRAConfig", n): n for n in _LORA_FLAGS}, ("LoRAConfig", "r"): "lora_r",
            ("LoRAConfig", "target_slices"): "lora_targets",
            ("GPT", "lora_targets"): "lora_targets"}


def _lora_targets(args) -> dict:
    """target_modules (and target_slices) from --target-modules and --lora-targets."""
    from minilora.models import GPT

    names = args.target_modules or ("" if args.lora_targets else "c_attn,c_proj")
    targets = tuple(t.strip() for t in names.split(",") if t.strip())
    if not args.lora_targets:
        return {"target_modules": targets}
    roles = GPT.lora_targets(args.lora_targets)
    modules = roles["target_modules"] + tuple(t for t in targets
                                              if t not in roles["target_modules"])
    return {**roles, "target_modules": modules}


def _given(args, names) -> dict:
    """The flags among ``names`` that the user set (0 and 0.0 are set; None and False are not)."""
    return {n: getattr(args, n) for n in names
            if getattr(args, n, None) is not None and getattr(args, n) is not False}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _as_flag(owner: str, field: str) -> str | None:
    """How the command line names a config field: by its flag (``--lr``), where it has one."""
    flag = _FLAG_OF.get((owner, field))
    return None if flag is None else _flag(flag)


def _train_config(args) -> TrainConfig:
    given = _given(args, _TRAIN_FLAGS)
    if args.skip_nonfinite:
        given["on_nonfinite"] = "skip"
    if "warmup_iters" not in given and "max_iters" in given:  # a short run warms up for a tenth
        given["warmup_iters"] = min(TrainConfig().warmup_iters, given["max_iters"] // 10)
    return TrainConfig(**given)


def _say(text: str) -> None:
    """A line on stdout that does not break a progress bar on the terminal."""
    from tqdm import tqdm

    tqdm.write(text, file=sys.stdout)
    sys.stdout.flush()


def _eval_line(record: dict) -> str:
    speed = record.get("tokens_per_s")
    speed = f", {speed:,.0f} tokens/s" if speed else ""
    return (f"iter {record['iter']}: train loss {record['train_loss']:.4f}, val loss "
            f"{record['val_loss']:.4f}, lr {record['lr']:.3g}{speed}")


def cmd_train(args) -> int:
    from minilora.train import runs

    talk = {} if args.quiet else {"log": _say, "on_eval": lambda r: _say(_eval_line(r))}
    common = {"quiet": args.quiet, "threads": args.threads, **talk}
    try:
        if args.resume:
            settings = _given(args, (*_MODEL_FLAGS, "dropout", *_TRAIN_FLAGS, "lora_r",
                                     *_LORA_FLAGS, "data", "init_from", "skip_nonfinite",
                                     "no_bias"))
            if settings:
                raise ConfigError("--resume continues with the run's own settings; drop "
                                  + ", ".join(_flag(n) for n in settings))
            result = runs.resume(args.out, **common)
        else:
            config, model, lora = _new_run_settings(args)
            if model is not None:
                result = runs.pretrain(args.data, args.out, model, config, **common)
            else:
                result = runs.finetune(args.init_from, args.data, args.out, config, lora,
                                       dropout=args.dropout, **common)
    except KeyboardInterrupt:
        return _interrupted(Path(args.out))
    _print_result(result, Path(args.out))
    return 0


def _new_run_settings(args):
    """(TrainConfig, the new model's GPTConfig fields or None, LoRAConfig or None) from the
    flags, every one checked before any data is read; a bad one is named by its flag."""
    from minilora.lora import LoRAConfig

    if args.data is None:
        raise ConfigError("train: --data FILE or --data builtin:NAME is required "
                          "(or --resume to continue the run in --out)")
    if args.init_from is None and args.lora_r is not None:
        raise ConfigError("--lora-r needs --init-from DIR: LoRA adapts a trained base")
    if args.lora_r is None and _given(args, _LORA_FLAGS):
        raise ConfigError("LoRA settings need --lora-r (without it, training is full): "
                          + ", ".join(_flag(n) for n in _given(args, _LORA_FLAGS)))
    model = lora = None
    with naming_fields(_as_flag):
        config = _train_config(args)
        if args.init_from is None:
            model = _given(args, (*_MODEL_FLAGS, "dropout"))  # GPTConfig's defaults fill in
            if args.no_bias:
                model["bias"] = False
            GPTConfig(vocab_size=1, **model)  # check the architecture before any data
        elif _given(args, (*_MODEL_FLAGS, "no_bias")):
            raise ConfigError(f"--init-from {args.init_from} fixes the architecture; drop "
                              + ", ".join(_flag(n) for n in _given(args, (*_MODEL_FLAGS,
                                                                          "no_bias"))))
        elif args.lora_r is not None:
            lora = LoRAConfig(
                r=args.lora_r,
                lora_alpha=args.lora_alpha if args.lora_alpha is not None else 2 * args.lora_r,
                lora_dropout=args.lora_dropout if args.lora_dropout is not None else 0.0,
                use_rslora=args.use_rslora, **_lora_targets(args))
        if args.dropout is not None:
            GPTConfig(vocab_size=1, dropout=args.dropout)  # checks it
    return config, model, lora


def _print_result(result, out: Path) -> None:
    if math.isnan(result.ms_per_step):  # no step ran: --max-iters 0, or the run had finished
        print(f"iter {result.iters} (no training steps ran): train loss "
              f"{result.train_loss:.4f}, val loss {result.val_loss:.4f}; the run in {out} is "
              "complete")
    else:
        print(f"done: iter {result.iters}, train loss {result.train_loss:.4f}, val loss "
              f"{result.val_loss:.4f}; {result.ms_per_step:.1f} ms/step "
              f"({result.tokens_per_s:,.0f} tokens/s), {result.elapsed_s:.1f} s of training")
        print(f"saved {out / CHECKPOINT} and {out / METRICS}")
    if result.skipped_steps:
        print(f"skipped {result.skipped_steps} steps with non-finite numbers")


def _interrupted(out: Path) -> int:
    """Ctrl-C during training: say where the run can continue from (exit code 130, as a shell)."""
    from minilora.train import read_checkpoint

    try:
        it = read_checkpoint(out).meta["iter"]
    except (MiniLoRAError, OSError):
        print("minilora: interrupted before the first checkpoint; nothing to resume",
              file=sys.stderr)
    else:
        print(f"minilora: interrupted; the last checkpoint (iteration {it}) is in {out}: "
              f"continue with 'minilora train --out {out} --resume'", file=sys.stderr)
    return 130


def _load(model_dir):
    from minilora.data import tokenizer_from_dict
    from minilora.train import load_run

    run = load_run(model_dir)
    if run.tokenizer is None:
        raise DataError(f"{model_dir}: the run holds no tokenizer")
    return run, tokenizer_from_dict(run.tokenizer, source=str(model_dir))


_ESCAPES = {"n": "\n", "t": "\t", "\\": "\\"}


def unescape(text: str) -> str:
    """``\\n``, ``\\t`` and ``\\\\`` in a prompt typed on the command line become a newline, a
    tab and a backslash; every other character (any other backslash, any non-ASCII letter) is
    kept as it is."""
    return re.sub(r"\\([nt\\])", lambda m: _ESCAPES[m.group(1)], text)


def cmd_generate(args) -> int:
    if args.temperature < 0:
        raise ConfigError(f"--temperature must be >= 0, got {args.temperature:g}")
    run, tokenizer = _load(args.model)
    prompt = unescape(args.prompt)
    if not prompt:
        raise DataError("--prompt is empty")
    try:
        idx = tokenizer.encode(prompt)
    except DataError as e:
        raise DataError(f"--prompt: {e}") from None
    from minilora.runtime import parallel

    with parallel(args.threads):
        out = run.model.generate(idx[None, :], args.max_new_tokens,
                                 temperature=args.temperature, top_k=args.top_k, rng=args.seed)
    print(tokenizer.decode(out[0]))
    return 0


def cmd_eval(args) -> int:
    from minilora.data import load_dataset
    from minilora.runtime import parallel
    from minilora.train.evaluate import estimate_loss, task_accuracy
    from minilora.train.runs import DATA_SEED

    run, tokenizer = _load(args.model)
    data = load_dataset(args.data, tokenizer=tokenizer, seed=DATA_SEED)
    data.check_block_size(run.model.config.block_size)
    with parallel(args.threads):
        losses = estimate_loss(run.model, data, args.batch_size, args.eval_iters,
                               np.random.default_rng(args.seed))
        print(f"{args.data}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f} "
              f"({args.eval_iters} batches of {args.batch_size} x {run.model.config.block_size} "
              "tokens per split)")
        if data.task is not None:
            score = task_accuracy(run.model, tokenizer, data.task)
            print(f"{data.task.name}: exact match {score.accuracy:.1%} "
                  f"({score.correct}/{score.total} held-out prompts, greedy)")
    return 0


# float32 logits of a merged model differ from the unmerged ones by round-off (~1e-6 here);
# anything near these bounds means the merge is wrong, not inexact
_MERGE_TOLERANCE = {"float32": 1e-3, "float64": 1e-9}


def cmd_merge(args) -> int:
    from minilora.io import RunLock
    from minilora.lora import merge_and_unload
    from minilora.lora.model import tied_lora_layers
    from minilora.tensor import no_grad
    from minilora.train import load_run, write_checkpoint

    run = load_run(args.model)
    if run.meta["kind"] != "lora":
        raise ConfigError(f"merge: {args.model} is not a LoRA run (nothing to merge)")
    out = Path(args.out)
    if (out / CHECKPOINT).exists():
        raise ConfigError(f"merge: {out} already holds a model; choose another --out")
    model = run.model
    tied = tied_lora_layers(model)
    if tied:
        raise ConfigError(f"merge: the adapter on {sorted(tied)} is on a weight tied to "
                          f"{sorted({o for others in tied.values() for o in others})}: merged, it "
                          "would change those too, so the merged model would not be the adapted "
                          "one (PEFT merges it that way); keep this adapter unmerged")
    probe = np.random.default_rng(0).integers(0, model.config.vocab_size,
                                              (4, model.config.block_size))
    with no_grad():
        before = model(probe)[0].data
        merge_and_unload(model)
        after = model(probe)[0].data
    diff = float(np.max(np.abs(before.astype(np.float64) - after)))
    bound = _MERGE_TOLERANCE[model.config.dtype] * max(1.0, float(np.max(np.abs(before))))
    if not diff <= bound:
        raise MiniLoRAError(f"merge: merged and unmerged logits differ by {diff:.3g} (more than "
                            f"{bound:.3g}); nothing was written")
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        with RunLock(out):
            info = {k: run.meta[k] for k in ("tokenizer", "data") if k in run.meta}
            info["merged_from"] = str(Path(args.model).resolve())
            write_checkpoint(out / CHECKPOINT, model, info)
    except BaseException:
        if created and not any(out.iterdir()):
            out.rmdir()
        raise
    print(f"merged {args.model} into {out / CHECKPOINT}: a plain model with "
          f"{model.num_parameters():,} parameters; max |logits merged - unmerged| = {diff:.3g}")
    return 0


def cmd_params(args) -> int:
    from minilora.lora import LoRALayerCount

    out_f, in_f = args.shape
    c = LoRALayerCount("W", in_f, out_f, args.rank)
    frac = c.fraction
    as_ratio = f"1/{frac.denominator}" if frac.numerator == 1 else f"{frac}"
    print(f"weight W: {out_f:,} x {in_f:,} = {c.weight_params:,} parameters")
    print(f"LoRA, rank {args.rank}: A ({args.rank} x {in_f:,}) + B ({out_f:,} x {args.rank}) "
          f"= {args.rank} x ({in_f:,} + {out_f:,}) = {c.lora_params:,} trainable parameters")
    print(f"ratio: {c.lora_params:,} / {c.weight_params:,} = {as_ratio} "
          f"({c.lora_params / c.weight_params:.4%})")
    if c.lora_params >= c.weight_params:
        print(f"(rank {args.rank} saves nothing here: LoRA is smaller than W only while "
              f"r < in x out / (in + out) = {in_f * out_f / (in_f + out_f):.4g})")
    return 0


def cmd_demo(args) -> int:
    from minilora.demo import run_demo

    run_demo(args.out, quick=args.quick, seed=args.seed, quiet=args.quiet, threads=args.threads)
    return 0


def cmd_bench(args) -> int:
    from minilora.bench import main as bench_main

    return bench_main(args)
